"""Running pretrainings with Ray Train from the driver: several at once when the cluster holds them (seeds side
by side), else one after the other in one worker group, with one live progress bar per pretraining."""

from __future__ import annotations

import os
import threading
import time

from bench.loopconfig import loop_config
from bench.runspec import Job


def concurrency(pcfgs: list) -> int:
    """Pretrainings to run at once for these pretrain configs: as many as the cluster's GPUs hold (workers ×
    1 GPU each), or its CPUs when ``cpus_per_worker`` is set; one otherwise (a pretraining then uses every CPU)."""
    if len(pcfgs) < 2:
        return 1
    import ray

    res = ray.cluster_resources()
    ks = []
    for p in pcfgs:
        if p.gpu:
            ks.append(int(res.get("GPU", 0)) // max(p.workers, 1))
        elif p.cpus_per_worker:
            ks.append(int(res.get("CPU", 1)) // (p.workers * p.cpus_per_worker))
        else:
            ks.append(1)
    return max(1, min(min(ks), len(pcfgs)))


def start_fit(cfgs: list, jobs: list[Job], pcfg, cpus: int, n_pretrain: int, run_dir: str):
    """Start one ``TorchTrainer.fit`` in a thread for ``jobs`` (``cfgs``: each job's bench config): one pretraining,
    or several one after the other in the same worker group (``bench.launch.train_sequence``). Returns (thread,
    box, total steps per job). ``box`` gets ``result`` or ``error`` and ``seconds`` (driver wall time) when the
    thread ends; ``wall0`` is its start as ``time.time()``, for the per-job times of a sequence."""
    from bench.launch import pretraining_trainer, train_sequence
    from bench.pretrain import plan_schedule, train_loop

    loops = [loop_config(c, j.method, c.pretrain_for(j.method), j.out_dir, cpus) for c, j in zip(cfgs, jobs)]
    for job in jobs:
        os.makedirs(job.out_dir, exist_ok=True)
    name = "-".join(f"{j.method}-s{j.seed}" for j in jobs)[:80]
    trainer = pretraining_trainer(loops[0] if len(jobs) == 1 else loops, storage=os.path.join(run_dir, "ray"),
                                  workers=pcfg.workers, cpus_per_worker=cpus, use_gpu=pcfg.gpu,
                                  name=f"{name}-{int(time.time())}", max_failures=pcfg.max_failures,
                                  worker=train_loop if len(jobs) == 1 else train_sequence)
    totals = [plan_schedule(c.pretrain_for(j.method), n_pretrain, pcfg.workers).total_steps
              for c, j in zip(cfgs, jobs)]
    box: dict = {"t0": time.perf_counter(), "wall0": time.time()}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - surfaced in the driver thread
            box["error"] = exc
        box["seconds"] = time.perf_counter() - box["t0"]

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    return thread, box, totals


def job_seconds(box: dict, results: list[dict]) -> list[float]:
    """Driver seconds of each job of one fit: from the previous job's end (or the fit's start) to this job's end,
    the last ending with the fit, so a sequence's group start and stop are charged to its first and last job (one
    job: the whole fit). A job without an end time is charged nothing; the next one carries it."""
    ends = [r.get("ended_at") for r in results[:-1]] + [box["wall0"] + box["seconds"]]
    out, prev = [], box["wall0"]
    for end in ends:
        end = end if isinstance(end, (int, float)) else prev
        out.append(max(0.0, end - prev))
        prev = end
    return out


def follow(console, items: list[tuple[str, str, threading.Thread, int]], show: bool = True) -> None:
    """Wait for the fits; with ``show``, one progress bar each, read from their ``metrics.jsonl``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.pretrain import read_metrics

    if not show:
        for _, _, thread, _ in items:
            thread.join()
        return
    with Progress(TextColumn("  pretrain [bold]{task.description}[/bold]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=True) as progress:
        tasks = [progress.add_task(name, total=total, info="starting Ray Train") for name, _, _, total in items]
        while any(thread.is_alive() for _, _, thread, _ in items):
            time.sleep(0.5)
            for task, (_, out_dir, _, _) in zip(tasks, items):
                rows = read_metrics(out_dir)
                if rows:
                    last = rows[-1]
                    progress.update(task, completed=last["step"],
                                    info=f"loss {last['loss']:.4f} · {last['images_per_s']:.0f} img/s")
