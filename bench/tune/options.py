"""``bench tune``'s options, their checks, where a search lives, and how many trials fit the cluster at once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from bench.errors import BenchError
from bench.tune.constants import _NAME


@dataclass
class TuneOptions:
    method: str = ""
    task: str = "linseg"
    trials: int = 16
    space: list = field(default_factory=list)  # --space entries (KEY=EXPR or YAML files)
    space_only: bool = False
    concurrent: int = 0  # 0 = as many as the cluster holds
    name: str = ""
    reduction_factor: int = 2
    asha: bool = True


def search_dir(storage: str, name: str) -> str:
    return os.path.join(os.path.abspath(storage), "tune", name)


def check_options(opts: TuneOptions) -> None:
    if opts.trials < 1:
        raise BenchError(f"--trials {opts.trials}: expected at least 1 trial")
    if opts.concurrent < 0:
        raise BenchError(f"--concurrent {opts.concurrent}: expected 0 (as many as fit) or a positive number")
    if opts.reduction_factor < 2:
        raise BenchError(f"--reduction-factor {opts.reduction_factor}: expected at least 2")
    if opts.name and not _NAME.match(opts.name):
        raise BenchError(f"--name {opts.name}: use letters, digits, '.', '_' and '-' only")


def plan_resources(workers: int, cpus_per_worker: int, gpu: bool, concurrent: int, trials: int,
                   cluster_cpus: int, cluster_gpus: int) -> tuple[int, int, list[str]]:
    """(trials at once, CPUs per Train worker, notes) for the cluster's CPUs and GPUs."""
    notes = []
    workers = max(workers, 1)
    by_gpu = None
    if gpu:
        by_gpu = cluster_gpus // workers
        if by_gpu < 1:
            raise BenchError(f"--gpu: a trial needs {workers} GPU(s), the Ray cluster has {cluster_gpus}")
    want = concurrent or by_gpu or 1
    cpw = cpus_per_worker or max(1, cluster_cpus // (want * workers))
    by_cpu = cluster_cpus // (workers * cpw)
    if by_cpu < 1:
        raise BenchError(f"pretrain.cpus_per_worker {cpw}: a trial needs {workers * cpw} CPUs, the Ray cluster has "
                         f"{cluster_cpus}")
    cap = min(by_cpu, by_gpu) if by_gpu is not None else by_cpu
    if concurrent and concurrent > cap:
        notes.append(f"--concurrent {concurrent}: the cluster holds {cap} trial(s) at once "
                     f"({workers} worker(s) × {cpw} CPU{' + 1 GPU' if gpu else ''} each); running {cap}")
    return max(1, min(concurrent or cap, cap, trials)), cpw, notes

