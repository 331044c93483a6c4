"""Running pretrainings with Ray Train from the driver: several at once when the cluster holds them (seeds side
by side), else one after the other in one worker group, with one live progress bar per pretraining. The CPU
default (one worker on a local Ray) runs them in this process instead, through Ray Train's local mode
(``run_locally``, ``run_here``): on 2 cores the worker group and Ray's processes beside the loop cost 15-19 %
of the pretraining (docs/speed.md)."""

from __future__ import annotations

import os
import threading
import time
import traceback

from bench.loopconfig import loop_config
from bench.runspec import Job


def concurrency(pcfgs: list, res: dict | None = None) -> int:
    """Pretrainings to run at once for these pretrain configs: as many as the cluster's GPUs hold (workers ×
    1 GPU each), or its CPUs when ``cpus_per_worker`` is set; one otherwise (a pretraining then uses every CPU).
    ``res``: the cluster's resources ({"CPU": n, "GPU": m}); default: the connected Ray's."""
    if len(pcfgs) < 2:
        return 1
    if res is None:
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


def run_locally(pcfgs: list, address: str) -> bool:
    """Whether these pretrainings run in this process (Ray Train's local mode): ``pretrain.local_mode`` auto, a
    local Ray (no ``--address``), one CPU worker each, and one at a time (``concurrency`` 1 on the local Ray's
    CPUs: no ``cpus_per_worker`` that lets several run side by side). Decided without starting Ray."""
    from bench.raycluster import LOCAL, local_cpus

    if not pcfgs or any(p.local_mode == "never" for p in pcfgs) or address not in ("", LOCAL):
        return False
    if any(p.workers != 1 or p.gpu for p in pcfgs):
        return False
    return concurrency(pcfgs, {"CPU": local_cpus()}) == 1


def _trainer(cfgs: list, jobs: list[Job], pcfg, cpus: int, run_dir: str, local: bool):
    from bench.launch import pretraining_trainer, train_sequence
    from bench.pretrain import train_loop

    loops = [loop_config(c, j.method, c.pretrain_for(j.method), j.out_dir, cpus) for c, j in zip(cfgs, jobs)]
    for job in jobs:
        os.makedirs(job.out_dir, exist_ok=True)
    name = "-".join(f"{j.method}-s{j.seed}" for j in jobs)[:80]
    return pretraining_trainer(loops[0] if len(jobs) == 1 else loops, storage=os.path.join(run_dir, "ray"),
                               workers=pcfg.workers, cpus_per_worker=cpus, use_gpu=pcfg.gpu,
                               name=f"{name}-{int(time.time())}", max_failures=pcfg.max_failures,
                               worker=train_loop if len(jobs) == 1 else train_sequence, local=local)


def _totals(cfgs: list, jobs: list[Job], pcfg, n_pretrain: int) -> list[int]:
    from bench.pretrain import plan_schedule

    return [plan_schedule(c.pretrain_for(j.method), n_pretrain, pcfg.workers).total_steps for c, j in zip(cfgs, jobs)]


def _progress(jobs: list[Job], names: list[str]) -> tuple[int, str, int]:
    """How far a failed sequence got: (steps logged over all ``jobs``, the first unfinished job's name, its last
    logged step)."""
    from bench.pretrain import read_metrics

    steps = [rows[-1]["step"] if rows else 0 for rows in (read_metrics(j.out_dir) for j in jobs)]
    failed = next((i for i, j in enumerate(jobs) if not os.path.exists(os.path.join(j.out_dir, "final.pt"))),
                  len(jobs) - 1)
    return sum(steps), names[failed], steps[failed]


def run_here(cfgs: list, jobs: list[Job], names: list[str], pcfg, cpus: int, n_pretrain: int, run_dir: str,
             console, show: bool = True) -> dict:
    """``jobs`` one after the other in this process's main thread, through Ray Train's local mode, with the
    progress bars drawn from a second thread. A failure restarts the sequence (each loop resumes from its newest
    checkpoint, finished ones are skipped) up to ``pretrain.max_failures`` times, as Ray Train restarts a
    worker group, but only while each attempt gets further than the one before: a failure that comes back at
    the same step fails now instead of looping. ``names``: the progress bars' labels. Returns the box
    ``start_fit`` returns, filled."""
    from bench.raycluster import install_stop_signals
    from bench.runspec import _root_cause

    install_stop_signals()  # SIGTERM / SIGHUP end the loop like Ctrl-C, as once Ray is up (bench.raycluster)
    box: dict = {"t0": time.perf_counter(), "wall0": time.time()}
    stop = threading.Event()
    items = [(n, j.out_dir, None, t) for n, j, t in zip(names, jobs, _totals(cfgs, jobs, pcfg, n_pretrain))]
    bars = threading.Thread(target=follow, args=(console, items, True, lambda: not stop.is_set()), daemon=True)
    if show:
        bars.start()
    restarts, before = 0, -1
    try:
        while True:
            try:
                box["result"] = _trainer(cfgs, jobs, pcfg, cpus, run_dir, local=True).fit()
                break
            except Exception as exc:  # noqa: BLE001 - reported by the caller, or restarted here
                traceback.clear_frames(exc.__traceback__)  # frees the failed loop (its DataLoader worker) now
                reached, name, at = _progress(jobs, names)
                left = pcfg.max_failures < 0 or restarts < pcfg.max_failures
                if not left or reached <= before:
                    box["error"] = exc
                    break
                restarts, before = restarts + 1, reached
                console.print(f"  [yellow]pretraining '{name}' failed at step {at} ({type(exc).__name__}: "
                              f"{_root_cause(exc)}); restarting from the last checkpoint ({restarts}/"
                              f"{'∞' if pcfg.max_failures < 0 else pcfg.max_failures}, pretrain.max_failures)"
                              f"[/yellow]")
    finally:
        stop.set()
        if show:
            bars.join()
        box["seconds"] = time.perf_counter() - box["t0"]
    return box


def start_fit(cfgs: list, jobs: list[Job], pcfg, cpus: int, n_pretrain: int, run_dir: str):
    """Start one ``TorchTrainer.fit`` in a thread for ``jobs`` (``cfgs``: each job's bench config): one pretraining,
    or several one after the other in the same worker group (``bench.launch.train_sequence``). Returns (thread,
    box, total steps per job). ``box`` gets ``result`` or ``error`` and ``seconds`` (driver wall time) when the
    thread ends; ``wall0`` is its start as ``time.time()``, for the per-job times of a sequence."""
    trainer = _trainer(cfgs, jobs, pcfg, cpus, run_dir, local=False)
    totals = _totals(cfgs, jobs, pcfg, n_pretrain)
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


def follow(console, items: list[tuple[str, str, threading.Thread | None, int]], show: bool = True,
           running=None) -> None:
    """Wait for the fits (their threads; or while ``running()`` is true, for a fit in another thread); with
    ``show``, one progress bar each, read from their ``metrics.jsonl``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.pretrain import read_metrics

    if not show:
        for _, _, thread, _ in items:
            thread.join()
        return
    running = running or (lambda: any(thread.is_alive() for _, _, thread, _ in items))
    with Progress(TextColumn("  pretrain [bold]{task.description}[/bold]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=True,
                  refresh_per_second=2) as progress:  # the rows change every 0.5 s; a bar drawn in the training
        # process (bench.fitting.run_here) takes the GIL each time
        tasks = [progress.add_task(name, total=total, info="starting") for name, _, _, total in items]
        while running():
            time.sleep(0.5)
            for task, (_, out_dir, _, _) in zip(tasks, items):
                rows = read_metrics(out_dir)
                if rows:
                    last = rows[-1]
                    progress.update(task, completed=last["step"],
                                    info=f"loss {last['loss']:.4f} · {last['images_per_s']:.0f} img/s")
