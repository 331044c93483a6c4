"""The reference settings of issue 17 that the methods can now reach: CrOC's exact position distance, CLoVE's loss
in the caller's dtype, blur σ in pixel units, ViCE's DeepLabV3+ trunk, LARC and the warm-up start."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from bench.backbones import create_backbone
from bench.config import PretrainConfig, build
from bench.data.views import MultiCrop, MultiCropSpec
from bench.errors import BenchError
from bench.optim import LARC, build_optimizer
from bench.registry import METHODS
from methods.base import Schedule
from methods.clove.loss import CLoVELoss
from methods.croc.clustering import position_distance
from methods.vice.trunk import DeepLabV3Plus


# ---------------------------------------------------------------- CrOC: token–centroid position distance

def test_croc_seed_distance_to_its_own_position_is_exactly_zero_at_128_tokens():
    g = torch.Generator().manual_seed(0)
    positions = torch.rand(12, 128, 2, generator=g) * 224  # P×2N×2, 2N = 128 (cdist's matrix-product regime)
    seeds = torch.stack([torch.randperm(128, generator=g)[:5] for _ in range(12)])  # P×5
    centroids = torch.gather(positions, 1, seeds[..., None].expand(-1, -1, 2))
    d = position_distance(positions, centroids)
    own = torch.stack([d[p, seeds[p], torch.arange(5)] for p in range(12)])  # P×5: seed s to centroid s
    assert torch.count_nonzero(own) == 0
    ref = torch.cdist(positions.double(), centroids.double())
    ref = ref / ref.amax(dim=(1, 2), keepdim=True)
    assert torch.allclose(d.double(), ref, atol=1e-6)


# ---------------------------------------------------------------- CLoVE: the caller's dtype

def _clove_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    q = [F.normalize(torch.randn(2, 16, 4, 4, generator=g), dim=1) for _ in range(3)]
    k = [F.normalize(torch.randn(2, 16, 4, 4, generator=g), dim=1) for _ in range(2)]
    boxes = torch.tensor([[[0.0, 0.0, 64.0, 64.0], [8.0, 8.0, 72.0, 72.0], [16.0, 16.0, 48.0, 48.0]]] * 2)
    flips = torch.zeros(2, 3, dtype=torch.bool)
    q = [x.to(dtype).requires_grad_() for x in q]
    return q, [x.to(dtype) for x in k], boxes, flips


def test_clove_loss_keeps_the_callers_dtype_and_its_informative_part_in_bf16():
    loss_fn = CLoVELoss(pos_ratio=0.7, n_neg=5, margin=100.0)
    q32, k32, boxes, flips = _clove_inputs(torch.float32)
    l32, logs32 = loss_fn(q32, k32, boxes, flips, None)
    l32.backward()
    q16, k16, _, _ = _clove_inputs(torch.bfloat16)
    l16, logs16 = loss_fn(q16, k16, boxes, flips, None)
    l16.backward()
    assert l16.dtype == torch.bfloat16 and l32.dtype == torch.float32
    # the informative part λ·P − Neg (≈ 0.1 next to μ = 100) survives: in the logged terms and in the gradient
    inf32 = 2.0 * logs32["pos_term"] - logs32["neg_term"]
    inf16 = 2.0 * logs16["pos_term"] - logs16["neg_term"]
    assert abs(inf16 - inf32) < 0.05 * max(abs(inf32), 0.1)
    g32 = torch.cat([x.grad.flatten() for x in q32])
    g16 = torch.cat([x.grad.float().flatten() for x in q16])
    assert g32.norm() > 0 and F.cosine_similarity(g16, g32, dim=0) > 0.99


# ---------------------------------------------------------------- blur σ in pixel units

def test_blur_sigma_scaled_by_crop_side_or_in_pixels(monkeypatch):
    import bench.data.views as views

    seen: list[float] = []
    monkeypatch.setattr(views.F, "gaussian_blur", lambda img, k, s: seen.append(s[0]) or img)
    for ref_size in (224, 0):  # the same random draws, σ scaled by 96/224 (CPU default) or in pixels (reference)
        mc = MultiCrop(MultiCropSpec(blur_ref_size=ref_size))
        torch.manual_seed(3)
        mc._photometric(torch.zeros(3, 96, 96, dtype=torch.uint8), 1.0, 0.0, 96)
    assert len(seen) == 2 and 0.1 <= seen[1] <= 2.0
    assert seen[0] == pytest.approx(seen[1] * 96 / 224, rel=1e-12)


def test_method_defaults_keep_the_cpu_blur_scaling():
    for name, ref in (("dino", 224), ("clove", 224), ("croc", 224), ("leopart", 224), ("vice", 400)):
        cls = METHODS.get(name)
        assert build(cls.config_class, {}, f"methods.{name}").blur_ref_size == ref
    with pytest.raises(BenchError, match="blur_ref_size"):
        build(METHODS.get("dino").config_class, {"blur_ref_size": -1}, "methods.dino")


# ---------------------------------------------------------------- ViCE: DeepLabV3+ trunk

def test_vice_deeplabv3plus_trunk_shapes_rates_and_sync_bn():
    cls = METHODS.get("vice")
    cfg = build(cls.config_class, {"trunk": "deeplabv3plus", "decoder_norm": "bn", "fuse_convs": 2,
                                   "decoder_dim": 32, "view_size": 64}, "methods.vice")
    torch.manual_seed(0)
    m = cls(cfg, lambda: create_backbone("resnet18", output_stride=8), Schedule(4, 2, 2))
    assert isinstance(m.trunk, DeepLabV3Plus) and m.sync_bn
    rates = [b.dw.dilation[0] for b in m.trunk.aspp.branches]
    assert rates == [12, 24, 36]
    out = m.trunk(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 128, 16, 16)  # stride 4 before the loss's upsampling
    feats = m.eval().dense_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 128, 16, 16) and torch.allclose(feats.norm(dim=1), torch.ones(1, 16, 16), atol=1e-5)
    with pytest.raises(BenchError, match="output stride 8"):
        cls(cfg, lambda: create_backbone("resnet18"), Schedule(4, 2, 2))
    assert build(cls.config_class, {}, "methods.vice").trunk == "light"


# ---------------------------------------------------------------- LARC and the warm-up start

def test_larc_step_by_hand_with_weight_decay_on_bias_and_norm():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ‖w‖ = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))  # a "bias": LARC regularises and scales it too
    w.grad, b.grad = torch.tensor([0.6, 0.8]), torch.tensor([0.5])  # ‖g‖ = 1, 0.5
    groups = [{"params": [w]}, {"params": [b], "apply_wd": False}]
    opt = build_optimizer(groups, build(PretrainConfig, {"optimizer": "larc", "lr": 0.5, "weight_decay": 0.1},
                                        "pretrain"))
    assert isinstance(opt, LARC) and all(g["weight_decay"] == 0.1 for g in opt.param_groups)
    opt.step()
    ratio_w = 1e-3 * 5.0 / (1.0 + 5.0 * 0.1 + 1e-8)
    exp_w = torch.tensor([3.0, 4.0]) - 0.5 * ratio_w * (torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([3.0, 4.0]))
    ratio_b = 1e-3 * 1.0 / (0.5 + 0.1 + 1e-8)
    exp_b = torch.tensor([1.0]) - 0.5 * ratio_b * (0.5 + 0.1)
    assert torch.allclose(w.detach(), exp_w, atol=1e-7) and torch.allclose(b.detach(), exp_b, atol=1e-7)


def test_warmup_start_factor_starts_at_lr_over_100():
    from methods.common.schedules import cosine_schedule

    pcfg = build(PretrainConfig, {"lr": 1.0, "warmup_start_factor": 0.01}, "pretrain")
    lrs = cosine_schedule(pcfg.lr, pcfg.min_lr, 20, 5, start_warmup=pcfg.lr * pcfg.warmup_start_factor)
    assert lrs[0] == pytest.approx(0.01) and lrs[4] == pytest.approx(1.0)
    assert build(PretrainConfig, {}, "pretrain").warmup_start_factor == 0.0  # the CPU default warms up from 0
    assert math.isclose(cosine_schedule(1.0, 0.0, 20, 5)[0], 0.0)
