"""One ``bench tune`` trial: the Tune function trainable that pretrains with Ray Train, evaluates the task and
reports the objective."""

from __future__ import annotations

import copy
import json
import os
import time

from bench.tune.constants import DRIVER_CPU, OBJECTIVE, PG_FILE, PROXY
from bench.tune.logger import _finite

def apply_values(loop: dict, method: str, overrides: dict) -> dict:
    """A copy of the base ``loop_config`` with a trial's method/pretrain values."""
    loop = copy.deepcopy(loop)
    loop["method_cfg"].update((overrides.get("methods") or {}).get(method) or {})
    loop["pretrain"].update(overrides.get("pretrain") or {})
    return loop


def train_worker(loop_config: dict) -> dict:
    """Ray Train worker function of a trial: records its placement group (rank 0), then ``train_loop``."""
    from bench.pretrain import train_loop

    try:
        import ray
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:
            pg = ray.util.get_current_placement_group()
            if pg is not None:
                os.makedirs(loop_config["out_dir"], exist_ok=True)
                with open(os.path.join(loop_config["out_dir"], PG_FILE), "a") as fh:
                    fh.write(pg.id.hex() + "\n")
    except Exception:  # noqa: BLE001 - only bookkeeping for the driver's clean-up
        pass
    return train_loop(loop_config)


def run_trial(config: dict, base: dict) -> None:
    """The Tune function trainable: pretrain with Ray Train, evaluate, report ``objective``."""
    import ray
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from bench import plugins
    from bench.config import PretrainConfig, build
    from bench.evaluate import evaluate_method
    from bench.pretrain import read_metrics
    from bench.registry import METHODS
    from bench.search_space import SearchSpace

    plugins.load_all()
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
    if not os.path.exists(final):
        trainer = TorchTrainer(
            train_worker, train_loop_config=loop,
            scaling_config=ray.train.ScalingConfig(num_workers=pcfg.workers, use_gpu=pcfg.gpu,
                                                   resources_per_worker={"CPU": pcfg.cpus_per_worker
                                                                         - DRIVER_CPU / pcfg.workers}),
            run_config=ray.train.RunConfig(
                name=f"{trial_id}-{int(time.time())}", storage_path=os.path.join(base["dir"], "train"),
                callbacks=[TuneReportCallback()],
                failure_config=ray.train.FailureConfig(max_failures=pcfg.max_failures)),
        )
        result = trainer.fit()
        loop_s = (getattr(result, "return_value", None) or {}).get("wall_s")
    else:
        loop_s = None
    t1 = time.perf_counter()
    spec = copy.deepcopy(base["spec"])
    spec["method_cfg"], spec["pretrain"] = loop["method_cfg"], loop["pretrain"]
    cpus = pcfg.workers * pcfg.cpus_per_worker
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

