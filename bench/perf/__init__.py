"""``bench perf``: benchmarks of the hot paths; results go to ``results/perf.json`` and ``results/perf.md``
(atomic writes), the GPU suite (``--gpu``) to ``results/perf-gpu.json`` and ``.md``.

Absolute times on a shared machine are noisy; ratios of two paths timed back to back in one process are not.
Every benchmark records what it compared and both figures; the environment (versions, threads, device) heads the
report. Run them on an idle machine for figures worth quoting.

    sinkhorn   methods/common/sinkhorn.py vs POT ``ot.sinkhorn`` at the methods' sizes, same iterations (micro)
    kmeans     the cluster task's k-means (torch) against scikit-learn: time and inertia (micro)
    ray        the pretraining loop through TorchTrainer (1 worker) vs called directly, per method (training)
    data       view-pipeline images/s vs training-step images/s, per method (training)
    headline   ``bench run --methods vice,clove,croc --tasks linseg`` wall time by phase; ``--profile`` adds
               per-op profiles of each method's step and of a linseg evaluation (headline)
    tune       one ``bench tune`` trial's wall time vs the same pretraining + evaluation called directly (tunecost)
    cost       step time vs crop size (64, 96, 128, 224) and batch size per method, CPU backbone (training)
    scaling    1 vs 2 Ray Train CPU workers at one global batch: scaling efficiency (training)
    loader     the loop with the views built in the training process vs in 1 DataLoader worker (training)
    --gpu      paper-scale bf16 steps (images/s, peak memory, MFU), view pipeline, linseg extraction (gpu)
"""

from __future__ import annotations

import os
import time

from bench import checkpoint as ckpt
from bench.errors import BenchError

ALL = ["sinkhorn", "kmeans", "ray", "data", "headline", "tune", "cost", "scaling", "loader"]


def run_perf(only: list[str], methods: list[str], out_prefix: str, tiny: bool = False, steps: int = 30,
             console=None, profile: bool = False) -> dict:
    from rich.console import Console

    from bench.perf.common import environment
    from bench.perf.report import to_markdown

    console = console or Console()
    unknown = [o for o in only if o not in ALL]
    if unknown:
        raise BenchError(f"--only: unknown benchmark {', '.join(unknown)}; valid: {', '.join(ALL)} "
                         f"(the GPU suite is --gpu)")
    if profile and "headline" not in only:
        raise BenchError("--profile profiles the headline benchmark: add headline to --only")
    folder = os.path.dirname(os.path.abspath(out_prefix))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"--out {out_prefix}: cannot create {folder} ({exc.strerror})") from None
    report = {"env": environment(), "results": {}}
    if os.path.exists(out_prefix + ".json"):
        # a partial re-run (--only) keeps the other benchmarks' results already in the file
        try:
            report["results"] = {k: v for k, v in ckpt.load_json(out_prefix + ".json").get("results", {}).items()
                                 if k in ALL}
        except (ValueError, OSError, AttributeError):
            pass
    console.print("environment: " + ", ".join(f"{k} {v}" for k, v in report["env"].items()))
    batch = 8 if tiny else 32
    for name in only:
        t = time.perf_counter()
        report["results"][name] = res = _run_one(name, methods, tiny, steps, batch, profile)
        console.print(f"[bold]{name}[/bold] ({time.perf_counter() - t:.0f}s): {res}")
    ckpt.save_json(report, out_prefix + ".json")
    ckpt.atomic_write_bytes(out_prefix + ".md", lambda fh: fh.write(to_markdown(report).encode()))
    console.print(f"wrote {out_prefix}.json and {out_prefix}.md")
    return report


def _run_one(name: str, methods: list[str], tiny: bool, steps: int, batch: int, profile: bool):
    from bench.perf import headline, micro, training, tunecost

    if name == "sinkhorn":
        return micro.bench_sinkhorn(tiny)
    if name == "kmeans":
        return micro.bench_kmeans(tiny)
    if name == "ray":
        return training.bench_ray(methods, 12 if tiny else steps, batch)
    if name == "data":
        return training.bench_data(methods, 8 if tiny else 64, batch)
    if name == "tune":
        return tunecost.bench_tune(methods, 3 if tiny else steps, batch, tiny)
    if name == "cost":
        if tiny:
            return training.bench_cost(methods, crops=(64, 96), batches=(4,), repeats=1)
        return training.bench_cost(methods)
    if name == "scaling":
        return training.bench_scaling(methods, 12 if tiny else steps, batch)
    if name == "loader":
        return training.bench_loader(methods, 12 if tiny else steps, batch)
    sets = ([] if not tiny else ["pretrain.epochs=1", "pretrain.steps_per_epoch=2", "pretrain.batch_size=8",
                                 "data.synthetic.num_train=32", "data.synthetic.num_val=8", "tasks.linseg.epochs=1"])
    return headline.bench_headline(methods, sets, profile=profile, profile_steps=2 if tiny else 5)
