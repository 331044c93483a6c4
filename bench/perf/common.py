"""Shared parts of ``bench perf``: the environment line, a timer, and short-pretraining configs."""

from __future__ import annotations

import os
import platform
import time

import torch


def environment() -> dict:
    import ray
    import timm

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"torch": torch.__version__, "ray": ray.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "device": dev, "machine": platform.machine()}


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


LOG_EVERY = 5  # steps per throughput window


def _steady_images_per_s(out_dir: str, batch: int) -> float:
    """Images/s over the logged windows after the first (a fresh process's first steps pay one-off costs:
    allocator growth, lazy initialisation; those are start-up, not per-step overhead)."""
    from bench.pretrain import read_metrics

    rows = [r for r in read_metrics(out_dir) if r["step"] > LOG_EVERY and r["step"] % LOG_EVERY == 0]
    if not rows:
        return float("nan")
    seconds = sum(LOG_EVERY * batch / r["images_per_s"] for r in rows)
    return len(rows) * LOG_EVERY * batch / seconds


def _short_run(steps: int, batch: int, log_every: int) -> list[str]:
    """``--set`` overrides for a pretraining of exactly ``steps`` steps with no intermediate checkpoint."""
    return ["pretrain.epochs=1", f"pretrain.steps_per_epoch={steps}", f"pretrain.batch_size={batch}",
            "pretrain.checkpoint_every=100000", f"pretrain.log_every={log_every}"]


def _loop_cfg(method: str, steps: int, out_dir: str, batch: int) -> dict:
    from bench.config import load_config, to_dict

    cfg = load_config(None, _short_run(steps, batch, LOG_EVERY), {"run": {"methods": [method]}})
    return {"method": method, "method_cfg": to_dict(cfg.methods[method]), "pretrain": to_dict(cfg.pretrain_for(method)),
            "backbone": to_dict(cfg.backbone), "dataset": "synthetic", "dataset_cfg": to_dict(cfg.data["synthetic"]),
            "seed": 0, "out_dir": out_dir}


