"""Starting or joining Ray, quietly."""

from __future__ import annotations

import logging
import os
import warnings


def init_ray(address: str = "", num_cpus: int | None = None):
    """Local Ray when ``address`` is empty; otherwise join that cluster.

    The local Ray starts without its dashboard unless ``BENCH_RAY_DASHBOARD=1`` (then on 127.0.0.1): its
    processes poll continuously and cost a 2-core machine a measurable share of training throughput (see
    ``bench perf --only ray``); results live in MLflow, and a cluster's head started by ``ray start`` has its own.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a stray ~/.ray/auth_token must not lock out local runs
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import ray

    if ray.is_initialized():
        return ray
    kwargs = dict(logging_level=logging.ERROR, log_to_driver=os.environ.get("BENCH_RAY_LOGS", "0") == "1",
                  configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        dashboard = os.environ.get("BENCH_RAY_DASHBOARD", "0") == "1"
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 **kwargs)
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return ray


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))
