"""The one place a Ray Train ``TorchTrainer`` is built: ``bench run``, ``bench tune`` trials, ``bench perf`` and
the data-parallel tests all pretrain through ``pretraining_trainer`` / ``launch_pretraining``.

``train_sequence`` runs several pretrainings one after the other in one worker group: a run whose pretrainings go
one at a time starts and stops the group once instead of once per method, about 13 s each on 2 cores
(docs/speed.md). The CPU default goes further: ``local=True`` is Ray Train's local mode, the same function in the
calling process (``bench.fitting.run_here``).

The worker function gets its config bound (``functools.partial``) instead of through ``train_loop_config``:
Ray Train records that argument as a JSON-like dict in its run state, while the loop takes one frozen
``LoopConfig`` of typed sections (``bench.loopconfig``), sent as is to every worker.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional, Sequence

from bench.loopconfig import LoopConfig
from bench.pretrain import loop_result, train_loop


def pretraining_trainer(config: Any, *, storage: str, workers: int = 1, cpus_per_worker: float = 1,
                        use_gpu: bool = False, name: Optional[str] = None, max_failures: int = 0,
                        callbacks: Sequence = (), worker: Callable[[Any], Any] = train_loop, local: bool = False):
    """A ``TorchTrainer`` running ``worker(config)`` on ``workers`` workers of ``cpus_per_worker`` CPUs (and one GPU
    each with ``use_gpu``); checkpoints and Ray's run state under ``storage``; ``max_failures`` restarts of
    the worker group (the loop resumes from its newest checkpoint); ``callbacks``: Ray Train run callbacks
    (e.g. Tune's report callback). ``config`` is usually a ``LoopConfig`` and ``worker`` ``train_loop``.

    ``local``: Ray Train's local mode (``ScalingConfig(num_workers=0)``): ``fit()`` calls ``worker(config)`` in
    the calling thread and needs no Ray instance; one worker only, and Ray Train restarts nothing (the caller
    does, ``bench.fitting.run_here``)."""
    from bench.raycluster import quiet_ray_logs, ray_env

    ray_env()  # Train V2, before ray.train is imported
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    quiet_ray_logs()

    if local and workers != 1:
        raise ValueError(f"Ray Train's local mode runs one worker, not {workers}")
    scaling = (ScalingConfig(num_workers=0) if local else
               ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}))
    return TorchTrainer(
        functools.partial(worker, config),
        scaling_config=scaling,
        run_config=RunConfig(name=name, storage_path=storage, callbacks=list(callbacks) or None,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )


def launch_pretraining(config: Any, **kwargs):
    """``pretraining_trainer(config, **kwargs).fit()``: runs to the end and returns Ray Train's ``Result``
    (``return_value``: rank 0's return value, ``train_loop``'s summary dict)."""
    return pretraining_trainer(config, **kwargs).fit()


def train_sequence(configs: Sequence[Any]) -> list[dict]:
    """Ray Train worker function: ``train_loop`` for each of ``configs`` in turn, in this worker group. A config
    whose ``final.pt`` exists is finished and skipped (a restarted group goes on where it stopped; the loop itself
    resumes the unfinished one from its newest checkpoint). Returns each loop's figures ({} where skipped without
    a ``loop_result.json``)."""
    out = []
    for config in configs:
        out_dir = LoopConfig.coerce(config).out_dir
        done = os.path.exists(os.path.join(out_dir, "final.pt"))
        out.append(loop_result(out_dir) if done else train_loop(config))
    return out
