"""``jitter_strength`` scales each method's reference colour jitter (brightness, contrast, saturation, hue)."""

import pytest
import torch

from bench.config import BackboneConfig
from methods.build import build_method
from methods.base import Schedule


REFERENCE = {  # the papers' colour jitter at strength 1
    "dino": (0.4, 0.4, 0.2, 0.1),
    "croc": (0.4, 0.4, 0.2, 0.1),
    "leopart": (0.8, 0.8, 0.8, 0.2),
    "vice": (0.8, 0.8, 0.8, 0.2),
}


@pytest.mark.parametrize("method", sorted(REFERENCE))
@pytest.mark.parametrize("strength", [1.0, 0.25, 0.0])
def test_jitter_strength_scales_the_reference_jitter(method, strength):
    torch.manual_seed(0)
    m = build_method(method, {"jitter_strength": strength}, BackboneConfig(), Schedule(2, 1, 2))
    assert m.view_spec().jitter == pytest.approx(tuple(strength * x for x in REFERENCE[method]))


@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_cpu_default_is_a_quarter_of_the_reference(method):
    m = build_method(method, {}, BackboneConfig(), Schedule(2, 1, 2))
    assert m.view_spec().jitter == pytest.approx(tuple(0.25 * x for x in REFERENCE[method]))
