"""The plain data a ``bench run`` is made of: run ids, storage checks, the loop and evaluation specs sent to Ray
workers, seeds, one pretraining job, and the message of a failure deep inside Ray."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from bench.config import BenchConfig, to_dict
from bench.errors import BenchError


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")








def seeds_of(cfg: BenchConfig) -> list[int]:
    seeds = list(cfg.run.seeds) or [cfg.run.seed]
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise BenchError(f"--seeds {seeds}: expected non-negative integers")
    if len(set(seeds)) != len(seeds):
        raise BenchError(f"--seeds {seeds}: a seed is listed twice")
    return seeds


def parse_seeds(value: str, first: int = 0) -> list[int]:
    """``--seeds N`` (N seeds from ``run.seed``) or ``--seeds 0,3,7``."""
    try:
        if "," in value:
            return [int(v) for v in value.split(",") if v.strip()]
        n = int(value)
    except ValueError:
        raise BenchError(f"--seeds {value}: expected a count (3) or a list of seeds (0,3,7)") from None
    if n < 1:
        raise BenchError(f"--seeds {value}: expected at least 1")
    return list(range(first, first + n))


@dataclass
class Timings:
    phases: dict = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds


@dataclass
class Job:
    """One pretraining: a method at a seed."""
    method: str
    seed: int
    out_dir: str
    key: str = ""
    rid: str | None = None
    hit: dict | None = None
    summary: dict = field(default_factory=dict)


def _data_settings(cfg) -> dict:
    from bench.cache import data_settings

    return data_settings(to_dict(cfg))


def _largest_node_cpus() -> int:
    """CPUs of the biggest alive node: a single task cannot span nodes."""
    import ray

    sizes = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return max([1] + sizes)


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's one-line message (Ray wraps worker errors several times)."""
    seen = exc
    for _ in range(10):
        nxt = getattr(seen, "cause", None) or seen.__cause__ or getattr(seen, "_cause", None)
        if nxt is None or nxt is seen:
            break
        seen = nxt
    text = str(seen).strip().splitlines()
    msg = text[-1] if text else type(seen).__name__
    for ln in reversed(text):
        if ln and not ln.startswith(" ") and ("Error" in ln or "error" in ln):
            msg = ln
            break
    return msg[:300]
