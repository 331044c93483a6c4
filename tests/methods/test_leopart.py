"""Leopart: crop geometry and roi_align correspondence, foreground mask, views, loss wiring, a short run."""

import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from bench.config import BackboneConfig
from bench.errors import BenchError
from methods.build import build_method
from methods.base import Schedule
from methods.common.geometry import box_intersection, boxes_in_crop
from methods.common.sinkhorn import swav_sinkhorn
from methods.leopart import LeopartViews, LeopartViewSpec, _roi_boxes, foreground_mask


def _leopart(backbone: str = "vit_tiny_d4_p8", **cfg):
    torch.manual_seed(0)
    return build_method("leopart", cfg, BackboneConfig(name=backbone),
                        Schedule(total_steps=10, steps_per_epoch=5, epochs=2))


def test_boxes_in_crop_by_hand():
    region = torch.tensor([[10.0, 20.0, 20.0, 40.0]])
    crop = torch.tensor([[0.0, 0.0, 40.0, 80.0]])  # resized to 64×64: x ×1.6, y ×0.8
    assert boxes_in_crop(region, crop, (64, 64)).tolist() == [[16.0, 16.0, 32.0, 32.0]]
    flipped = boxes_in_crop(region, crop, (64, 64), torch.tensor([True]))
    assert flipped.tolist() == [[32.0, 16.0, 48.0, 32.0]]


def test_roi_align_of_two_crops_reads_the_same_source_positions():
    """A 'coordinate image' (channels = source x, y of each pixel centre) cut into two crops and pooled to tokens;
    roi_align over the boxes' intersection must read the intersection's cell centres from both crops."""
    size, patch, r = 96, 8, 4
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    coords = torch.stack([xs, ys]).float()  # 2×H×W
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(20):
        boxes, maps = [], []
        for side in (64, 32):
            w, h = (int(v) for v in torch.randint(40, 90, (2,), generator=g))
            x0, y0 = int(torch.randint(0, size - w + 1, (1,), generator=g)), int(torch.randint(0, size - h + 1, (1,), generator=g))
            crop = TF.resized_crop(coords, y0, x0, h, w, [side, side], antialias=False)
            maps.append(F.avg_pool2d(crop[None], patch))  # 1×2×g×g token "features"
            boxes.append(torch.tensor([[float(x0), float(y0), float(x0 + w), float(y0 + h)]]))
        inter = box_intersection(boxes[0], boxes[1])
        if (inter[0, 2] - inter[0, 0]) < 16 or (inter[0, 3] - inter[0, 1]) < 16:
            continue
        expect_x = inter[0, 0] + (torch.arange(r) + 0.5) * (inter[0, 2] - inter[0, 0]) / r
        expect_y = inter[0, 1] + (torch.arange(r) + 0.5) * (inter[0, 3] - inter[0, 1]) / r
        for (bx, m, side) in zip(boxes, maps, (64, 32)):
            roi = boxes_in_crop(inter, bx, (side, side)) / patch
            out = roi_align(m, _roi_boxes(roi), r, aligned=True)[0]  # 2×r×r
            # bilinear reads between token centres are exact on a linear ramp; within half a token of the crop
            # border roi_align clamps to the edge token, so allow half a token in source pixels there
            tol_x = 0.5 * patch * float(bx[0, 2] - bx[0, 0]) / side + 0.5
            tol_y = 0.5 * patch * float(bx[0, 3] - bx[0, 1]) / side + 0.5
            assert (out[0] - expect_x[None, :]).abs().max() <= tol_x
            assert (out[1] - expect_y[:, None]).abs().max() <= tol_y
            assert (out[0] - expect_x[None, :]).abs().mean() < 1.5
            checked += 1
    assert checked >= 10


def test_foreground_mask_keeps_the_top_mass_and_drops_small_components():
    a = torch.full((6, 6), 0.1)
    a[0:2, 0:2] = 10.0  # a 4-token blob
    a[4, 4] = a[4, 5] = 6.0  # a 2-token component: removed
    a[0:3, 5] = 6.0  # a 3-token component: kept
    attn = torch.stack([2 * a, torch.zeros(6, 6)]).reshape(1, 2, 36)  # head mean = a
    # blur off (σ → 0): keep tokens whose ascending cumulative share exceeds 1 − 0.9, i.e. every 6 and 10
    m = foreground_mask(attn, (6, 6), threshold=0.9, sigma=1e-3)[0, 0]
    expect = torch.zeros(6, 6)
    expect[0:2, 0:2] = 1
    expect[0:3, 5] = 1
    assert torch.equal(m, expect)
    # at 60 % of the mass only the 10s survive (cumulative share of the rest: 32.7 / 72.7 < 0.4)
    m = foreground_mask(attn, (6, 6), threshold=0.6, sigma=1e-3)[0, 0]
    expect = torch.zeros(6, 6)
    expect[0:2, 0:2] = 1
    assert torch.equal(m, expect)
    # the reference's blur (σ 0.6, kernel 7) keeps the blob's centre
    m = foreground_mask(attn, (6, 6))[0, 0]
    assert m[0:2, 0:2].all() and m.sum() < 36


def test_views_overlap_every_global_crop_and_are_never_flipped():
    spec = LeopartViewSpec(n_global=2, global_size=64, n_local=4, local_size=32, global_scale=(0.25, 1.0),
                           local_scale=(0.05, 0.25), flip_p=0.0)
    tr = LeopartViews(spec)
    img = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)
    for seed in range(10):
        torch.manual_seed(seed)
        s = tr(img)
        assert [v.shape[-1] for v in s["views"]] == [64, 64, 32, 32, 32, 32] and not s["flips"].any()
        b = s["boxes"]
        for v in range(1, 6):
            for gi in range(min(v, 2)):
                inter = box_intersection(b[gi:gi + 1], b[v:v + 1])[0]
                area = (inter[2] - inter[0]).clamp_min(0) * (inter[3] - inter[1]).clamp_min(0)
                assert area > (0.02 if v < 2 else 0.01) * 96 * 96


def test_loss_equals_the_hand_assembled_swapped_prediction_on_identical_crops():
    """Two global crops with the same full-image box and roi_size = token grid make roi_align the identity: the loss
    is then the mean token cross-entropy between the teacher's Sinkhorn codes of crop c and crop 1−c's student."""
    m = _leopart(loss_mask="all", roi_size=8, n_local=0, queue_length=0)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(3, 3, 64, 64, generator=g) for _ in range(2)]
    batch = {"views": views, "boxes": torch.tensor([[0.0, 0.0, 96.0, 96.0]]).repeat(3, 2, 1),
             "flips": torch.zeros(3, 2, dtype=torch.bool), "size": torch.tensor([[96, 96]] * 3)}
    out = m(batch, 0)
    with torch.no_grad():
        expect = 0.0
        for c in range(2):
            _, t_scores, _ = m.teacher(views[c])
            codes = swav_sinkhorn(t_scores.reshape(-1, t_scores.shape[-1]), 0.05, 3)
            _, s_scores, _ = m.student(views[1 - c])
            logp = F.log_softmax(s_scores.reshape(-1, s_scores.shape[-1]) / 0.1, dim=-1)
            expect += float(-(codes * logp).sum(-1).mean())
    assert abs(float(out["loss"].detach()) - expect / 2) < 1e-4


def test_step_normalises_prototypes_updates_the_teacher_and_scales_backbone_lr():
    m = _leopart(queue_length=256, loss_mask="fg", backbone_lr_scale=0.1)  # the reference's 1e-5 / 1e-4
    with torch.no_grad():
        m.student.prototypes.weight.mul_(3.0)
    from bench.data.views import collate_views

    tr = LeopartViews(m.view_spec())
    torch.manual_seed(0)
    batch = collate_views([tr(torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)) for _ in range(4)])
    out = m(batch, 0)
    assert torch.allclose(m.student.prototypes.weight.norm(dim=1), torch.ones(300), atol=1e-5)
    assert 0 < out["fg_fraction"] < 1
    assert int(m.queues[0].pushed) == 4 * 10 and not m.queues[0].full
    groups = m.param_groups()
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == [0.1, 1.0]
    backbone_ids = {id(p) for p in m.student.backbone.parameters()}
    for grp in groups:
        assert all((id(p) in backbone_ids) == (grp["lr_scale"] == 0.1) for p in grp["params"])
    opt = torch.optim.SGD([p for grp in groups for p in grp["params"]], lr=0.1)
    before = m.teacher.head.mlp[0].weight.clone()
    out["loss"].backward()
    opt.step()
    m.after_step(0)
    s_w, t_w = m.student.head.mlp[0].weight, m.teacher.head.mlp[0].weight
    assert torch.allclose(t_w, 0.99 * before + 0.01 * s_w, atol=1e-6)


def test_bad_config_is_a_bench_error():
    with pytest.raises(BenchError, match="loss_mask"):
        _leopart(loss_mask="everything")
    with pytest.raises(BenchError, match="ViT"):
        _leopart(backbone="resnet18")


def test_short_pretraining_run_decreases_the_loss(tmp_path):
    from bench.pretrain import train_loop

    out = tmp_path / "run"
    train_loop({"method": "leopart", "method_cfg": {"queue_length": 0},
                "pretrain": {"epochs": 1, "steps_per_epoch": 12, "batch_size": 8, "log_every": 1, "lr": 1e-3,
                             "warmup_epochs": 0.0, "optimizer": "adamw", "checkpoint_every": 1000},
                "backbone": {}, "dataset": "synthetic", "dataset_cfg": {"num_train": 96, "num_val": 8},
                "seed": 0, "out_dir": str(out)})
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
