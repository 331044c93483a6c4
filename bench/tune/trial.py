"""One ``bench tune`` trial: the Tune function trainable that pretrains, evaluates the task and reports the objective.

Single-worker trials (``pretrain.workers`` 1, the default) train and evaluate inside the trial's own process
(``bench.tune.inprocess``) and reserve the trial's CPUs (and GPU) themselves; multi-worker trials build a Ray Train
``TorchTrainer`` (the Train V2 pattern, reports forwarded by ``TuneReportCallback``) and evaluate in a Ray task,
the trial itself reserving only ``DRIVER_CPU``."""

from __future__ import annotations

import copy
import json
import os
import time

from bench.tune.constants import DRIVER_CPU, OBJECTIVE, PG_FILE, PROXY
from bench.tune.logger import _finite


def in_process(workers: int) -> bool:
    """Whether a trial with ``workers`` Train workers runs its loop and evaluation in its own process."""
    return workers == 1


def trial_resources(workers: int, cpus_per_worker: int, gpu: bool) -> dict:
    """What a trial's Tune function reserves: all of its share when it trains itself, else only ``DRIVER_CPU``
    (its Train workers and evaluation task take the rest)."""
    if in_process(workers):
        return {"CPU": cpus_per_worker, "GPU": 1} if gpu else {"CPU": cpus_per_worker}
    return {"CPU": DRIVER_CPU}


def apply_values(loop: dict, method: str, overrides: dict) -> dict:
    """A copy of the base ``loop_config`` with a trial's method/pretrain values."""
    loop = copy.deepcopy(loop)
    loop["method_cfg"].update((overrides.get("methods") or {}).get(method) or {})
    loop["pretrain"].update(overrides.get("pretrain") or {})
    return loop


def train_worker(loop_config) -> dict:
    """Ray Train worker function of a trial: records its placement group (rank 0), then ``train_loop``."""
    from bench.pretrain import train_loop

    try:
        import ray
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:
            pg = ray.util.get_current_placement_group()
            if pg is not None:
                out_dir = loop_config["out_dir"] if isinstance(loop_config, dict) else loop_config.out_dir
                os.makedirs(out_dir, exist_ok=True)
                with open(os.path.join(out_dir, PG_FILE), "a") as fh:
                    fh.write(pg.id.hex() + "\n")
    except Exception:  # noqa: BLE001 - only bookkeeping for the driver's clean-up
        pass
    return train_loop(loop_config)


def run_trial(config: dict, base: dict) -> None:
    """The Tune function trainable: pretrain (here or with Ray Train), evaluate, report ``objective``."""
    import ray
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from bench.config import PretrainConfig, build
    from bench.evaluate import evaluate_method
    from bench.launch import launch_pretraining
    from bench.loopconfig import LoopConfig
    from bench.pretrain import read_metrics
    from bench.registry import METHODS
    from bench.search_space import SearchSpace

    t0 = time.perf_counter()
    trial_id = tune.get_context().get_trial_id()
    method, task = base["method"], base["task"]
    out_dir = os.path.join(base["dir"], "trials", trial_id)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "attempts.jsonl"), "a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "time": time.time()}) + "\n")
    space = SearchSpace(method=method, fixed=base["fixed"])
    loop = apply_values(base["loop"], method, space.overrides({k: v for k, v in config.items()}))
    loop["out_dir"] = out_dir
    cls = METHODS.get(method)
    build(cls.config_class, loop["method_cfg"], f"methods.{method}")  # a bad combination fails here, clearly
    pcfg = build(PretrainConfig, loop["pretrain"], "pretrain")
    final = os.path.join(out_dir, "final.pt")
    here = in_process(pcfg.workers)
    loop_s = None
    if not os.path.exists(final) and here:
        from bench.tune.inprocess import train_in_process

        loop_s = train_in_process(loop, tune.report).get("wall_s")
    elif not os.path.exists(final):
        result = launch_pretraining(
            LoopConfig.from_dict(loop), worker=train_worker, storage=os.path.join(base["dir"], "train"),
            workers=pcfg.workers, use_gpu=pcfg.gpu, cpus_per_worker=pcfg.cpus_per_worker - DRIVER_CPU / pcfg.workers,
            name=f"{trial_id}-{int(time.time())}", callbacks=[TuneReportCallback()], max_failures=pcfg.max_failures)
        loop_s = (getattr(result, "return_value", None) or {}).get("wall_s")
    t1 = time.perf_counter()
    spec = copy.deepcopy(base["spec"])
    spec["method_cfg"], spec["pretrain"] = loop["method_cfg"], loop["pretrain"]
    cpus = pcfg.workers * pcfg.cpus_per_worker
    if here:  # the trial holds the CPUs (and GPU): evaluate right here
        res = evaluate_method(method, final, [task], spec, out_dir, pcfg.gpu, cpus)[task]
    else:
        # outside the trial's placement group (Tune captures child tasks; the trial itself reserves nothing)
        remote = ray.remote(evaluate_method).options(num_cpus=(1 if pcfg.gpu else cpus) - DRIVER_CPU,
                                                     num_gpus=1 if pcfg.gpu else 0,
                                                     scheduling_strategy="DEFAULT")
        res = ray.get(remote.remote(method, final, [task], spec, out_dir, pcfg.gpu, cpus))[task]
    t2 = time.perf_counter()
    proxies = [r[PROXY] for r in read_metrics(out_dir) if PROXY in r]
    report = {OBJECTIVE: float(res["metrics"][res["primary"]]), "step": base["total_steps"],
              "pretrain_s": t1 - t0, "eval_s": t2 - t1}
    report.update({f"{task}/{k}": float(v) for k, v in res["metrics"].items() if _finite(v)})
    if proxies:
        report[PROXY] = float(proxies[-1])
    if loop_s is not None:
        report["train_loop_s"] = float(loop_s)  # the loop alone: pretrain_s minus Ray Train's start and stop
    tune.report(report)

