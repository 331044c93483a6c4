"""Tune's cost per trial in ``bench perf``: a one-trial search against the same pretraining and evaluation called
directly in this process."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from bench.perf.common import _short_run


def bench_tune(methods: list[str], steps: int, batch: int, tiny: bool = False) -> list[dict]:
    """Tune's cost per trial: the first trial of a 1-trial search runs the method's configured values, so it
    does exactly the work of ``train_loop`` + ``evaluate_method`` called in this process on the same config.
    ``overhead_per_trial_s`` = trial wall (driver-side, actor start included) - direct wall."""
    import io

    from rich.console import Console

    from bench.config import load_config
    from bench.data import build_dataset
    from bench.evaluate import evaluate_method
    from bench.evaluate import eval_spec
    from bench.loopconfig import loop_config
    from bench.pretrain import train_loop
    from bench.raycluster import init_ray
    from bench.tune import TuneOptions, new_search

    init_ray()
    rows = []
    threads = torch.get_num_threads()
    for method in methods:
        tmp = tempfile.mkdtemp(prefix="bench-perf-tune-")
        try:
            sets = _short_run(steps, batch, log_every=1000000)
            if tiny:
                sets += ["data.synthetic.num_train=32", "data.synthetic.num_val=8", "tasks.linseg.epochs=1"]
            cfg = load_config(None, sets, {"run": {"methods": [method], "tasks": ["linseg"], "storage": tmp},
                                           "tracking": {"uri": f"sqlite:///{tmp}/mlruns.db"}})
            n = len(build_dataset("synthetic", cfg.data["synthetic"], "train"))
            out = os.path.join(tmp, "direct")
            t = time.perf_counter()
            train_loop(loop_config(cfg, method, cfg.pretrain_for(method), out, threads))
            evaluate_method(method, os.path.join(out, "final.pt"), ["linseg"], eval_spec(cfg, method, n), out,
                            threads=threads)
            direct_s = time.perf_counter() - t
            t = time.perf_counter()
            res = new_search(cfg, TuneOptions(method=method, task="linseg", trials=1, concurrent=1, asha=False,
                                              name="perf"), console=Console(file=io.StringIO()))
            search_s = time.perf_counter() - t
            trial = res["trials"][0]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        trial_s = trial["wall_s"] or float("nan")
        rows.append({"method": method, "steps": steps, "direct_s": direct_s, "trial_s": trial_s,
                     "trial_over_direct": trial_s / direct_s, "overhead_per_trial_s": trial_s - direct_s,
                     "search_s": search_s, "status": trial["status"]})
    return rows


