"""Regression guard for the CPU default: a few seeded in-process training steps of every method reproduce the
losses recorded before the methods were refactored (``loss_regression.json``, fp32 on CPU).

Each method is built from its default config on the default backbone (``vit_tiny_d4_p8``, random init, seed 0)
and trained for ``STEPS`` steps of ``BATCH`` synthetic images with its own ``pretrain_defaults`` (optimiser,
lr / weight-decay schedules, clipping) exactly as ``bench.pretrain.train_loop`` does. The recorded figures are the
loss of every step and the sum / absolute sum of the evaluation features of two fixed images afterwards.

Regenerate (only when a change is *meant* to move the CPU default, and say so in the commit):
``BENCH_REGEN_LOSS_FIXTURE=1 python -m pytest tests/methods/test_loss_regression.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bench.backbones import create_backbone
from bench.config import PretrainConfig, build, to_dict
from bench.data.synthetic import SyntheticConfig, SyntheticScenes
from bench.data.views import PretrainViews, build_view_transform, collate_views
from bench.optim import build_optimizer, clip_per_tensor, set_schedule
from bench.registry import METHODS
from methods.base import Schedule
from methods.common.schedules import cosine_schedule

FIXTURE = Path(__file__).with_name("loss_regression.json")
METHOD_NAMES = ["dino", "clove", "croc", "leopart", "vice"]
STEPS, SPE, BATCH, SEED = 6, 2, 4, 0
TOL = 1e-6  # relative to max(1, |value|): CLoVE's loss sits near its margin 100, where fp32's ulp is 7.6e-6


def run_steps(name: str) -> dict:
    cls = METHODS.get(name)
    cfg = build(cls.config_class, {}, f"methods.{name}")
    pdict = to_dict(PretrainConfig())
    pdict.update(cls.pretrain_defaults or {})
    pcfg = build(PretrainConfig, pdict, "pretrain")
    schedule = Schedule(total_steps=STEPS, steps_per_epoch=SPE, epochs=STEPS // SPE, world_size=1)
    torch.manual_seed(SEED)
    method = cls(cfg, lambda: create_backbone("vit_tiny_d4_p8"), schedule)
    views = PretrainViews(SyntheticScenes(SyntheticConfig(num_train=64, num_val=4), "train"),
                          build_view_transform(method.view_spec()))
    groups = method.param_groups()
    trainable = [p for g in groups for p in g["params"]]
    optimizer = build_optimizer(groups, pcfg)
    lrs = cosine_schedule(pcfg.lr, pcfg.min_lr, STEPS, int(pcfg.warmup_epochs * SPE))
    wds = cosine_schedule(pcfg.weight_decay, pcfg.weight_decay_end, STEPS)
    method.train()
    losses = []
    for step in range(STEPS):
        samples = []
        for i in range(BATCH):
            index = step * BATCH + i
            torch.manual_seed((SEED * 1_000_003) * 10_000_019 + index)
            samples.append(views[index])
        batch = collate_views(samples)
        batch["index"] = torch.arange(step * BATCH, (step + 1) * BATCH)
        set_schedule(optimizer, float(lrs[step]), float(wds[step]))
        out = method(batch, step)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if pcfg.clip_grad > 0:
            clip_per_tensor(trainable, pcfg.clip_grad)
        method.on_after_backward(step)
        optimizer.step()
        method.after_step(step)
        losses.append(float(out["loss"].detach()))
    method.eval()
    g = torch.Generator().manual_seed(123)
    images = torch.randn(2, 3, 64, 64, generator=g)
    feats = method.dense_features(images).float()
    return {"losses": losses, "feat_sum": float(feats.sum()), "feat_abs_sum": float(feats.abs().sum())}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(b))


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_cpu_default_losses_unchanged(name):
    assert len(METHOD_NAMES) == 5
    got = run_steps(name)
    if os.environ.get("BENCH_REGEN_LOSS_FIXTURE"):
        data = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
        data[name] = got
        FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        pytest.skip("fixture regenerated")
    want = json.loads(FIXTURE.read_text())[name]
    assert len(want["losses"]) == STEPS
    bad = [(i, g, w) for i, (g, w) in enumerate(zip(got["losses"], want["losses"])) if not _close(g, w)]
    assert not bad, f"{name}: losses moved (step, now, recorded): {bad}"
    assert _close(got["feat_abs_sum"], want["feat_abs_sum"]), f"{name}: feature |sum| {got['feat_abs_sum']} moved"
    # the plain sum of LayerNorm outputs sits near 0: compare it on the scale of the absolute sum
    assert abs(got["feat_sum"] - want["feat_sum"]) <= TOL * want["feat_abs_sum"], f"{name}: feature sum moved"
