"""ResNet dense features: layer4 at output stride 32, undilated, by default; ``output_stride`` 16 / 8 dilate."""

from __future__ import annotations

import pytest
import torch

from bench.backbones import create_backbone
from bench.errors import BenchError

# (output_stride, stride, widths of the four stages on a 64-px input)
STRIDES = [(0, 32, [16, 8, 4, 2]), (32, 32, [16, 8, 4, 2]), (16, 16, [16, 8, 4, 4]), (8, 8, [16, 8, 8, 8])]


@pytest.mark.parametrize("output_stride,stride,widths", STRIDES)
def test_resnet_feature_map_size_follows_output_stride(output_stride, stride, widths):
    assert len(STRIDES) == 4
    bb = create_backbone("resnet18", output_stride=output_stride).eval()
    assert bb.stride == stride
    with torch.no_grad():
        stages = bb.forward_stages(torch.zeros(1, 3, 64, 64))
        dense = bb.forward_dense(torch.zeros(1, 3, 64, 64))
    assert dense.shape == (1, 512, 64 // stride, 64 // stride)
    # layer1 stays at stride 4, layer2 at 8; dilation only replaces the strides of the later stages
    assert [s.shape[-1] for s in stages] == widths


def test_resnet50_dilated_at_16_as_leopart_probe_and_8_as_vice_trunk():
    for os_, side, dil in ((16, 14, 2), (8, 28, 4)):
        with torch.device("meta"):
            bb = create_backbone("resnet50", output_stride=os_)
            out = bb.forward_dense(torch.zeros(1, 3, 224, 224))
        assert bb.stride == os_ and out.shape == (1, 2048, side, side)
        # dilation, not stride: layer4's 3×3 convs have stride 1 and (after its first block, which keeps the
        # previous stage's dilation, as torchvision's replace_stride_with_dilation) dilation 2 at OS16, 4 at OS8
        convs = [m for m in bb.model.layer4.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert all(c.stride == (1, 1) for c in convs) and [c.dilation[0] for c in convs[1:]] == [dil] * 2


def test_bad_output_stride_is_one_clear_error():
    with pytest.raises(BenchError, match="backbone.output_stride"):
        create_backbone("resnet18", output_stride=4)
    with pytest.raises(BenchError, match="backbone.output_stride"):
        create_backbone("vit_tiny_d4_p8", output_stride=16)
    assert create_backbone("vit_tiny_d4_p8", output_stride=8).stride == 8
