"""Resources checked before work starts: a request the Ray cluster cannot hold fails in seconds, in one line.

Ray never refuses an infeasible request: a placement group of 64 one-CPU bundles on a 2-CPU machine, or a GPU
task on a machine without one, waits forever without a word (``bench run --gpu`` on a laptop hung). This module
turns the request into bundles, the same way ``bench.pipeline`` and ``bench.tune`` size them, and packs them
into the nodes of the cluster:

- pretraining: ``workers`` bundles of ``{CPU: cpus_per_worker, GPU: 1 if gpu}`` (Ray Train's worker group; its
  default PACK strategy may spread them over nodes, so each bundle must fit a node and all of them the cluster);
- evaluation: one task of ``{CPU: 1, GPU: 1 if gpu}`` on one node (the evaluation runs after pretraining).

A cluster with an autoscaler (its cluster config names node groups and their maximum counts, as KubeRay and the
cluster launcher publish it) may grow: a request that fits its maximum size waits, saying so, up to
``run.resource_timeout_s`` seconds while ``ray.autoscaler.sdk.request_resources`` asks for the bundles; one that
does not fit even the maximum fails at once. Resource amounts are Ray's logical units (CPUs, GPUs).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from bench.errors import BenchError

POLL_S = 5.0


@dataclass
class ClusterView:
    """Alive nodes' total resources (one dict per node) and, on an autoscaling cluster, its maximum totals."""

    nodes: list[dict]
    max_total: dict | None = None  # None: no autoscaler, the cluster is what it is

    def total(self, key: str) -> float:
        return sum(n.get(key, 0.0) for n in self.nodes)

    def describe(self) -> str:
        cpus, gpus = self.total("CPU"), self.total("GPU")
        nodes = len(self.nodes)
        gpu_text = f"{_num(gpus)} GPU{'s' if gpus != 1 else ''}" if gpus else "no GPU"
        return f"{_num(cpus)} CPUs and {gpu_text} on {nodes} node{'s' if nodes != 1 else ''}"


@dataclass
class Request:
    """What one stage asks of the cluster: ``bundles`` placed together, then ``task`` alone on one node."""

    what: str  # "pretraining 'dino'", "a bench tune trial", ...
    bundles: list[dict] = field(default_factory=list)
    task: dict | None = None
    flags: dict = field(default_factory=dict)  # which option to change: "gpu", "workers", "cpus"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def pack(bundles: list[dict], nodes: list[dict]) -> bool:
    """True when ``bundles`` fit into ``nodes`` (first fit, largest bundles first; each bundle on one node)."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True):
        for node in free:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in b.items() if v > 0):
                for k, v in b.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def fits(req: Request, view: ClusterView) -> bool:
    return pack(req.bundles, view.nodes) and (req.task is None or pack([req.task], view.nodes))


def fits_maximum(req: Request, view: ClusterView) -> bool:
    """Could the request fit once an autoscaling cluster reaches its maximum (totals only: node shapes unknown)?"""
    if view.max_total is None:
        return False
    need: dict = {}
    for b in req.bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    for k, v in (req.task or {}).items():
        need[k] = max(need.get(k, 0.0), v)
    return all(view.max_total.get(k, 0) >= v for k, v in need.items() if v > 0)


def explain(req: Request, view: ClusterView) -> str:
    """One line: what was asked, what the cluster has, and the flag to change."""
    workers = len(req.bundles)
    gpu = any(b.get("GPU", 0) for b in req.bundles) or bool((req.task or {}).get("GPU", 0))
    cpw = req.bundles[0].get("CPU", 0) if req.bundles else 0
    has = view.describe()
    largest = max((n.get("CPU", 0.0) for n in view.nodes), default=0.0)
    gpu_nodes = [n for n in view.nodes if n.get("GPU", 0) >= 1]
    if gpu and not gpu_nodes:
        return (f"--gpu: {req.what} asks for {workers} worker(s) × 1 GPU, the Ray cluster has {has}; "
                f"drop --gpu, or join a cluster with GPUs with --address")
    if gpu and workers > view.total("GPU"):
        return (f"--workers {workers} --gpu: {req.what} asks for {workers} GPUs (one per worker), the Ray cluster "
                f"has {has}; use --workers {_num(view.total('GPU'))} or fewer")
    if req.bundles and cpw > largest:
        return (f"pretrain.cpus_per_worker {_num(cpw)}: {req.what} asks for {_num(cpw)} CPUs per worker, the largest "
                f"node has {_num(largest)} (the Ray cluster has {has}); lower --set pretrain.cpus_per_worker")
    if req.bundles and not pack(req.bundles, view.nodes):
        most = max(1, int(sum(math.floor(n.get("CPU", 0.0) / max(cpw, 1e-9)) for n in view.nodes)))
        flag = req.flags.get("workers", "--workers")
        return (f"{flag} {workers}: {req.what} asks for {workers} worker(s) × {_num(cpw)} CPU"
                f"{' + 1 GPU' if gpu else ''} = {_num(workers * cpw)} CPUs, the Ray cluster has {has}; use "
                f"{flag} {most} or fewer, lower pretrain.cpus_per_worker, or join a bigger cluster with --address")
    task = req.task or {}
    return (f"{req.what}: its evaluation task asks for {_num(task.get('CPU', 0))} CPU"
            f"{' + 1 GPU' if task.get('GPU') else ''} on one node, the Ray cluster has {has}")


def require(req: Request, view_fn: Callable[[], ClusterView], timeout_s: float = 0.0,
            say: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
            ask: Callable[[Request | None], None] | None = None, view: ClusterView | None = None) -> ClusterView:
    """Return the cluster view once ``req`` fits; BenchError (one line) when it cannot.

    ``view_fn`` reads the cluster (``view``: a reading already taken); ``ask`` (autoscaling clusters) is called
    with the request while waiting and with None when done, to place and withdraw a resource request.
    """
    view = view or view_fn()
    if fits(req, view):
        return view
    if view.max_total is None or timeout_s <= 0 or not fits_maximum(req, view):
        line = explain(req, view)
        if view.max_total is not None and not fits_maximum(req, view):
            line += " (more than this autoscaling cluster's maximum size)"
        elif view.max_total is not None:
            line += " (this autoscaling cluster could grow: set run.resource_timeout_s to wait for it)"
        raise BenchError(line)
    say(f"waiting up to {timeout_s:.0f}s (run.resource_timeout_s) for the autoscaler: {explain(req, view)}")
    deadline = time.monotonic() + timeout_s
    if ask:
        ask(req)
    try:
        while time.monotonic() < deadline:
            sleep(min(POLL_S, max(deadline - time.monotonic(), 0.0)))
            view = view_fn()
            if fits(req, view):
                say(f"the cluster now has {view.describe()}: starting")
                return view
    finally:
        if ask:
            ask(None)
    raise BenchError(f"{explain(req, view)} (still after waiting {timeout_s:.0f}s for the autoscaler, "
                     f"run.resource_timeout_s)")


# --------------------------------------------------------------------------------------------- Ray glue
def ray_view() -> ClusterView:
    """The connected Ray cluster: alive nodes' resources and, where an autoscaler publishes one, its maximum."""
    import ray

    nodes = [{k: float(v) for k, v in n.get("Resources", {}).items() if k in ("CPU", "GPU")}
             for n in ray.nodes() if n.get("Alive")]
    max_total = None
    try:
        from ray._private.state import state

        max_total = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - an older or newer Ray without that call: treat as fixed size
        max_total = None
    return ClusterView(nodes=nodes, max_total=max_total or None)


def local_view() -> ClusterView:
    """This machine as the local Ray would see it (``bench.raycluster.local_cpus``), without starting Ray: the
    check of a pretraining that runs in this process (``bench.fitting.run_locally``)."""
    from bench.raycluster import local_cpus

    return ClusterView(nodes=[{"CPU": float(local_cpus())}])


def _ray_ask(req: Request | None) -> None:
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=(req.bundles + ([req.task] if req.task else [])) if req else [])
    except Exception:  # noqa: BLE001 - asking is a hint to the autoscaler, never a reason to fail
        pass


def cpus_per_worker(pcfg, view: ClusterView) -> int:
    """CPUs per Train worker as ``bench.pipeline`` sizes them: the setting, else the CPUs divided by workers."""
    if pcfg.cpus_per_worker:
        return int(pcfg.cpus_per_worker)
    return max(1, int(view.total("CPU")) // max(pcfg.workers, 1))


def pretrain_request(pcfg, what: str, cpw: int) -> Request:
    bundle = {"CPU": float(cpw), **({"GPU": 1.0} if pcfg.gpu else {})}
    task = {"CPU": 1.0, **({"GPU": 1.0} if pcfg.gpu else {})}
    return Request(what=what, bundles=[dict(bundle) for _ in range(max(int(pcfg.workers), 1))], task=task)


def check_pretrain(pcfg, what: str, timeout_s: float = 0.0, say: Callable[[str], None] = print,
                   view_fn: Callable[[], ClusterView] = ray_view, cpw: int | None = None) -> ClusterView:
    """Check one pretraining (+ its evaluation) against the cluster Ray is connected to (``cpw``: CPUs per
    worker when the caller sizes them itself)."""
    if pcfg.workers < 1:
        raise BenchError(f"--workers {pcfg.workers}: expected at least 1")
    if pcfg.batch_size < pcfg.workers:
        raise BenchError(f"pretrain.batch_size {pcfg.batch_size}: expected at least one image per worker "
                         f"({pcfg.workers} worker(s))")
    if pcfg.batch_size % pcfg.workers:
        raise BenchError(f"--workers {pcfg.workers}: pretrain.batch_size {pcfg.batch_size} must be divisible by the "
                         f"number of workers (each takes an equal share of the global batch)")
    view = view_fn()
    req = pretrain_request(pcfg, what, cpw or cpus_per_worker(pcfg, view))
    return require(req, view_fn, timeout_s, say, ask=_ray_ask if view_fn is ray_view else None, view=view)


def check_run(cfg, console=None, view_fn: Callable[[], ClusterView] = ray_view) -> None:
    """Every method of a ``bench run``; call right after Ray is started or joined (or with ``local_view`` for
    pretrainings that run in this process)."""
    say = console.print if console is not None else print
    for method in cfg.run.methods:
        check_pretrain(cfg.pretrain_for(method), f"pretraining '{method}'", cfg.run.resource_timeout_s, say,
                       view_fn=view_fn)


def check_search(cfg, pcfg, console=None) -> None:
    """One trial of a ``bench tune`` search (a search runs at least one trial at a time)."""
    say = console.print if console is not None else print
    check_pretrain(pcfg, "a bench tune trial", cfg.run.resource_timeout_s, say, cpw=pcfg.cpus_per_worker or 1)


__all__ = ["ClusterView", "Request", "pack", "fits", "explain", "require", "ray_view", "check_pretrain",
           "check_run", "check_search", "local_view", "pretrain_request", "cpus_per_worker"]
