"""Starting or joining Ray, quietly.

A plain run starts its own local Ray: ``ray.init(address="local")``. Without it, Ray joins whatever its address
file (``<Ray temp dir>/ray_current_cluster``, written by ``ray start`` and by ``ray.cluster_utils.Cluster``) or
``RAY_ADDRESS`` names, also a cluster that has died since, and then refuses ``num_cpus``. Joining a cluster is
asked for explicitly: ``--address auto`` (the address file / ``RAY_ADDRESS``) or ``--address HOST:PORT``.

Once Ray is up, SIGTERM and SIGHUP end the driver like Ctrl-C (``KeyboardInterrupt``): the command prints its
one-line "interrupted" message, ``ray.shutdown`` runs at exit and stops the local Ray (its processes share the
driver's fate on SIGKILL too, through Ray's own parent-death signal), and a run lock is released. Without this,
Ray's core worker turns SIGTERM into an abort with a C++ stack dump.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings

from bench.errors import BenchError

LOCAL = "local"


SPINCOUNT = "10000"


def ray_env() -> None:
    """The environment every Ray use here starts from (set before ``ray`` or ``ray.train`` is imported)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a stray ~/.ray/auth_token must not lock out local runs
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)  # local Ray workers inherit it (bench/__main__.py says why)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def local_cpus() -> int:
    """The CPUs a local Ray started here has (``init_ray``: every CPU of the machine); known without Ray."""
    return os.cpu_count() or 1


def quiet_ray_logs() -> None:
    """Ray's own INFO lines (e.g. "Running in local mode") stay out of bench's console."""
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(address: str = "", num_cpus: int | None = None):
    """Local Ray when ``address`` is empty (or ``"local"``); otherwise join that cluster.

    The local Ray starts without its dashboard unless ``BENCH_RAY_DASHBOARD=1`` (then on 127.0.0.1): its
    processes poll continuously and cost a 2-core machine a measurable share of training throughput (see
    ``bench perf --only ray``); results live in MLflow, and a cluster's head started by ``ray start`` has its own.
    """
    ray_env()
    import ray

    if ray.is_initialized():
        return ray
    kwargs = dict(logging_level=logging.ERROR, log_to_driver=os.environ.get("BENCH_RAY_LOGS", "0") == "1",
                  configure_logging=True)
    if address and address != LOCAL:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise BenchError(f"--address {address}: cannot join a Ray cluster there ({first}); start one with "
                             f"`ray start --head`, or leave --address out for a local Ray") from None
    else:
        dashboard = os.environ.get("BENCH_RAY_DASHBOARD", "0") == "1"
        before = _children()
        ray.init(address=LOCAL, num_cpus=num_cpus or local_cpus(), include_dashboard=dashboard,
                 dashboard_host="127.0.0.1", **kwargs)
        _guard(sorted(_children() - before))
    quiet_ray_logs()
    install_stop_signals()
    return ray


def _children() -> set[int]:
    """Pids of this process's children (Linux); empty elsewhere."""
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{os.getpid()}/task")
    except OSError:
        return out
    for tid in tasks:  # children are listed per thread that started them
        try:
            with open(f"/proc/{os.getpid()}/task/{tid}/children") as fh:
                out |= {int(p) for p in fh.read().split()}
        except OSError:
            continue
    return out


def _guard(ray_roots: list[int]) -> None:
    """The local Ray's processes (``gcs_server``, ``raylet`` and what they start) end with this driver, also on
    SIGKILL: Ray's parent-death signal reaches its direct children, but the raylet's DashboardAgent and
    RuntimeEnvAgent were seen running minutes after a SIGKILLed ``bench run``. A detached reaper
    (``bench.procgroup``) ends their trees when the driver is gone, and exits by itself after ``ray.shutdown``."""
    if os.environ.get("BENCH_RAY_REAPER", "1") != "0":
        from bench.procgroup import start_reaper

        start_reaper(ray_roots)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install_stop_signals() -> bool:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` in the main thread (as SIGINT does); False elsewhere.

    A signal the process inherited as ignored stays ignored (``nohup bench run ...`` keeps running when the
    terminal closes)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _interrupt)
    return True


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))
