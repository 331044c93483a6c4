"""bench/tensorops.py: the faster resizes give F.interpolate's values (bit for bit on the channels-last path, to
float rounding for the matmul form) and its gradients."""

import pytest
import torch
from torch.nn import functional as F

from bench.tensorops import bilinear_weights, resize_bilinear, resize_bilinear_matmul

CASES = [((2, 3, 12, 12), (48, 48), False), ((2, 3, 12, 12), (48, 48), True), ((1, 4, 7, 9), (20, 13), False),
         ((1, 4, 7, 9), (20, 13), True), ((2, 5, 16, 10), (8, 5), False), ((1, 2, 1, 6), (3, 6), False)]


def test_case_list_is_not_empty():
    assert CASES


@pytest.mark.parametrize("shape,size,ac", CASES)
def test_matmul_resize_matches_interpolate_and_its_gradient(shape, size, ac):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape[0], shape[1], *size, dtype=torch.float64)
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=ac)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    out = resize_bilinear_matmul(x, size, ac)
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)


def test_bilinear_weights_rows_are_convex_combinations_of_two_neighbours():
    u = bilinear_weights(48, 12)
    assert torch.allclose(u.sum(1), torch.ones(48))
    assert ((u > 0).sum(1) <= 2).all()
    assert u[0, 0] == 1 and u[-1, -1] == 1  # edge clamping: the first and last outputs copy the edge inputs
    assert torch.allclose(u[2], torch.tensor([0.875, 0.125] + [0.0] * 10))  # src = (2 + 0.5) / 4 - 0.5 = 0.125


def test_channels_last_resize_is_bit_identical_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(4, 128, 16, 16, requires_grad=True)
    g = torch.randn(4, 128, 32, 32)
    ref = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    (gref,) = torch.autograd.grad(ref, x, g)
    out = resize_bilinear(x, (32, 32))
    (gout,) = torch.autograd.grad(out, x, g)
    assert torch.equal(out, ref) and torch.equal(gout, gref)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert resize_bilinear(x, (16, 16)) is x  # same size: no copy
