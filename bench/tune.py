"""``bench tune``: hyperparameter search with Ray Tune, Optuna's TPE and ASHA early stopping.

One search = ``--trials`` trials of one (method, task). Each trial:

1. pretrains through the same ``bench.pretrain.train_loop`` as ``bench run``, run by a Ray Train ``TorchTrainer``
   built inside the trial (the Ray Train V2 pattern: a Tune function trainable owns the trainer and forwards its
   reports with ``TuneReportCallback``); every ``pretrain.proxy_every`` steps rank 0 reports a held-out proxy
   score (``proxy``, bench/proxy.py) that ASHA compares across trials;
2. evaluates the task with ``bench.evaluate.evaluate_method`` (a Ray task with the trial's CPUs/GPU) and reports
   the task's primary metric as ``objective``, the search objective.

Search: ``OptunaSearch`` (TPE, seeded with ``run.seed``; the method's default config is the first point when it
lies in the space) behind a ``ConcurrencyLimiter`` (``--concurrent``, default: as many trials as the cluster's
CPUs/GPUs hold); ``ASHAScheduler`` on ``proxy`` with the step as its time axis, grace period
``proxy_every`` and rungs strictly before the last step (a trial that reached the end is never stopped before
its evaluation). Without ``--set pretrain.proxy_every`` the proxy runs every quarter of the pretraining.

Files, under ``<run.storage>/tune/<name>/``:
    ray/                   Tune's experiment folder (kept apart: Tune re-uploads its folder's files on resume)
    bench_tune.json        the search's settings and config (``--resume`` rebuilds everything from it)
    mlflow_trials.json     trial id -> MLflow run id, logged steps and proxy history (resume: nothing logged twice)
    trials/<trial_id>/     the trial's pretraining (checkpoints, metrics.jsonl, final.pt), eval_<task>.json and
                           attempts.jsonl (one line per start: a finished trial is never started again)
    train/                 Ray Train's run folders of the trials
    trials.csv, best.json  the summary; ``bench run --from-tune <name>`` reads best.json
Resources: a trial's Tune function only drives Ray Train and reserves 0.01 CPU; its Train workers and its evaluation
take the rest of its share (``pretrain.workers`` × ``pretrain.cpus_per_worker``). The driver frees the placement
group of a trial that ASHA stopped (see ``release_placement_groups``).
Resume: ``bench tune --resume <name>`` = ``Tuner.restore``: finished trials are kept, interrupted ones restart
and continue their pretraining from its last checkpoint, the TPE sampler keeps its history, and ASHA's rungs are
refilled from the finished trials' proxy history (Tune does not save scheduler state).

MLflow: a parent run (``bench.kind=tune``) with the settings, the space and the summary (trials table
``tune/trials.json``, ``tune/best_config.json``, Optuna's parameter importances, ``tune/optimization_history.png``
and ``tune/param_importances.png``); one nested run per trial (``bench.kind=trial``) with its sampled values as
params, the training curves (``train/*``, including ``train/proxy``), the final ``objective`` and task metrics,
and a ``tune.status`` tag: completed, early_stopped or error. All MLflow writes happen in the driver (a Tune
callback), so a trial that ASHA stops is still closed properly.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from bench import checkpoint as ckpt
from bench.errors import BenchError

STATE_FILE = "bench_tune.json"
TRIALS_FILE = "mlflow_trials.json"
BEST_FILE = "best.json"
# Tune's experiment folder inside the search folder: on restore Tune copies its experiment folder to a staging
# folder and uploads it back at every sync, which would overwrite files of ours that lived there
TUNE_DIR = "ray"
OBJECTIVE = "objective"
PROXY = "proxy"

# keys Tune adds to every result: not training curves
_TUNE_KEYS = {"timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid", "hostname", "node_ip",
              "date", "done", "trial_id", "iterations_since_restore", "time_since_restore", "checkpoint_dir_name",
              "experiment_tag", "config", "should_checkpoint", "timesteps_total", "episodes_total",
              "timesteps_since_restore", "checkpoint_path", "step", "epoch"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Logical CPUs of a trial's Tune function: it only drives Ray Train (Tune refuses 0). The Train workers and the
# evaluation task take the rest of the trial's share, so a trial's total stays workers × cpus_per_worker.
DRIVER_CPU = 0.01
# A trial stopped by ASHA is killed with its Train controller; the worker group's placement group is scoped to the
# job, and Train's own cleaner needs the State API, which cannot tell which cluster to ask when several local Ray
# instances run on one machine (it then never frees the CPUs and the next trial waits forever). The driver removes
# the placement groups a stopped trial recorded, a few seconds after the stop, and keeps watching for a while in
# case the dying controller started another worker group.
RELEASE_AFTER_S = 3.0
RELEASE_WATCH_S = 120.0
PG_FILE = "placement_groups.txt"


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


# ------------------------------------------------------------------------------------------ Tune parts


class BenchOptunaSearch(OptunaSearch):
    """Only a trial's final result carries the objective; intermediate (proxy) results are ASHA's."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


class BenchASHA(ASHAScheduler):
    """ASHA whose rungs are refilled, after a resume, from the proxy history of the trials finished before it
    (Tune restores the scheduler as it was pickled at the start of the search, with empty rungs)."""

    def __init__(self, history_path: str, **kwargs):
        super().__init__(**kwargs)
        self._history_path = history_path
        self._replayed = False

    def _replay(self) -> None:
        if self._replayed:
            return
        self._replayed = True
        if not os.path.exists(self._history_path):
            return
        history = ckpt.load_json(self._history_path)
        try:  # private ASHA bookkeeping (ray 2.60); if it changes, resumed rungs just start empty
            for tid, h in history.items():
                if not h.get("done"):
                    continue
                proxies = sorted((int(s), float(v)) for s, v in (h.get("proxy") or {}).items())
                for bracket in self._brackets:
                    for milestone, recorded in bracket._rungs:
                        hit = [v for s, v in proxies if s >= milestone]
                        if hit and tid not in recorded:
                            recorded[tid] = self._metric_op * hit[0]
        except AttributeError:
            pass

    def on_trial_add(self, tune_controller, trial):
        self._replay()
        return super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._replay()
        return super().on_trial_result(tune_controller, trial, result)


class TrialLogger(Callback):
    """MLflow from the driver: one nested run per trial, curves as results arrive, status at the end."""

    def __init__(self, info: dict):
        self.info = info  # uri, experiment, parent, dir, name, method, task, fixed, primary
        self._tracker = None
        self._state = None
        self._release: dict | None = None  # trial id -> when it stopped (placement groups to free)
        self._last_release = 0.0

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_tracker"], d["_state"], d["_release"] = None, None, None
        return d

    # ---- helpers
    @property
    def tracker(self):
        if self._tracker is None:
            from bench.tracking import Tracker

            self._tracker = Tracker(self.info["uri"], self.info["experiment"])
        return self._tracker

    @property
    def state(self) -> dict:
        if self._state is None:
            path = os.path.join(self.info["dir"], TRIALS_FILE)
            self._state = ckpt.load_json(path) if os.path.exists(path) else {}
        return self._state

    def _save(self) -> None:
        ckpt.save_json(self.state, os.path.join(self.info["dir"], TRIALS_FILE))

    def _run(self, trial) -> str:
        entry = self.state.setdefault(trial.trial_id, {"step": 0, "proxy": {}, "done": False})
        rid = entry.get("run")
        if rid and self.tracker.run_status(rid) != "MISSING":
            return rid
        i = self.info
        tags = {"bench.kind": "trial", "bench.tune": i["name"], "trial_id": trial.trial_id, "method": i["method"],
                "task": i["task"], "dataset": i["dataset"], "backbone": i["backbone"]}
        rid = self.tracker.start_run(f"{i['name']}-{trial.trial_id}", tags, i["parent"])
        values = {k: v for k, v in trial.config.items() if not k.startswith("_")}
        self.tracker.log_params(rid, {**{f"fixed.{k}": v for k, v in i["fixed"].items()}, **values})
        entry["run"] = rid
        self._save()
        return rid

    # ---- Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)
        self.state[trial.trial_id]["t_start"] = time.time()  # driver-side wall time of the trial (this attempt)
        self._save()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rid = self._run(trial)
        entry = self.state[trial.trial_id]
        step = int(result.get("step", 0) or 0)
        numbers = {k: float(v) for k, v in result.items() if k not in _TUNE_KEYS and _finite(v)}
        if OBJECTIVE in result:
            if not entry.get("final"):
                self.tracker.log_metrics(rid, numbers, step=step)
                entry["final"] = True
                self._save()
            return
        if step <= entry["step"]:  # a resumed trial re-reports steps after its last checkpoint
            return
        self.tracker.log_metrics(rid, {f"train/{k}": v for k, v in numbers.items()}, step=step)
        entry["step"] = step
        if PROXY in numbers:
            entry["proxy"][str(step)] = numbers[PROXY]
        self._save()

    # ---- placement groups of stopped trials
    def _release_later(self, trial) -> None:
        if self._release is None:
            self._release = {}
        self._release[trial.trial_id] = time.monotonic()

    def on_step_begin(self, iteration, trials, **info):
        pending = self._release
        if not pending:
            return
        now = time.monotonic()
        if now - self._last_release < 1.0:
            return
        self._last_release = now
        for tid, since in list(pending.items()):
            if now - since >= RELEASE_AFTER_S:
                release_placement_groups(os.path.join(self.info["dir"], "trials", tid))
            if now - since >= RELEASE_WATCH_S:
                pending.pop(tid)

    def on_experiment_end(self, trials, **info):
        for tid in list(self._release or {}):
            release_placement_groups(os.path.join(self.info["dir"], "trials", tid))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release_later(trial)
        rid = self._run(trial)
        last = trial.last_result or {}
        entry = self.state[trial.trial_id]
        if OBJECTIVE in last:
            status = "completed"
            msg = f"{self.info['task']}/{self.info['primary']} {last[OBJECTIVE]:.2f}"
        else:
            status = "early_stopped"
            msg = f"stopped early by ASHA at step {last.get('step', '?')} (proxy {last.get(PROXY, float('nan')):.2f})"
        self.tracker.set_tags(rid, {"tune.status": status, "tune.last_step": last.get("step", "")})
        trial_dir = os.path.join(self.info["dir"], "trials", trial.trial_id)
        if status == "completed" and os.path.isdir(trial_dir):  # the task's figures (e.g. linseg predictions)
            for fname in sorted(os.listdir(trial_dir)):
                if fname.endswith(".png"):
                    self.tracker.log_artifact(rid, os.path.join(trial_dir, fname), "figures")
        self.tracker.finish(rid)
        entry["done"] = True
        entry["status"] = status
        entry["t_end"] = time.time()
        self._save()
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items())
        wall = _trial_wall(entry) or 0.0
        print(f"  trial {trial.trial_id}: {values} -> {msg} ({wall:.0f} s)", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release_later(trial)
        rid = self._run(trial)
        entry = self.state[trial.trial_id]
        err = _trial_error(trial)
        self.tracker.set_tags(rid, {"tune.status": "error", "tune.error": err[:4000]})
        self.tracker.finish(rid, "FAILED")
        entry["done"] = True
        entry["status"] = "error"
        self._save()
        print(f"  trial {trial.trial_id}: failed: {err.splitlines()[-1] if err else '?'}", flush=True)


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        if path and os.path.exists(path):
            with open(path) as fh:
                text = fh.read().strip()
            lines = [ln for ln in text.splitlines() if ln.strip()]
            for ln in reversed(lines):
                if not ln.startswith(" ") and ("Error" in ln or "error" in ln):
                    return ln.strip()
            return lines[-1] if lines else ""
    except OSError:
        pass
    return str(getattr(trial, "error_msg", "") or "")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------ one trial


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


def release_placement_groups(trial_dir: str) -> int:
    """Remove the still-reserved placement groups a finished or stopped trial recorded; returns how many."""
    path = os.path.join(trial_dir, PG_FILE)
    if not os.path.exists(path):
        return 0
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    removed = 0
    with open(path) as fh:
        ids = [ln.strip() for ln in fh if ln.strip()]
    for hex_id in dict.fromkeys(ids):
        try:
            pg = PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id)))
            if ray.util.placement_group_table(pg).get("state") == "CREATED":
                ray.util.remove_placement_group(pg)
                removed += 1
        except Exception:  # noqa: BLE001 - already gone, or not of this cluster (a resumed search)
            continue
    return removed


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


# ------------------------------------------------------------------------------------------ the search


class Search:
    def __init__(self, cfg, opts: TuneOptions, resume: bool = False, console=None):
        from rich.console import Console

        self.cfg, self.opts, self.resume = cfg, opts, resume
        self.console = console or Console()
        self.dir = search_dir(cfg.run.storage, opts.name)
        self.state_path = os.path.join(self.dir, STATE_FILE)

    # ---- setup
    def _prepare(self) -> None:
        from bench.config import to_dict
        from bench.data import build_dataset
        from bench.pipeline import ensure_writable
        from bench.pretrain import plan_schedule
        from bench.proxy import check_settings
        from bench.registry import TASKS
        from bench.search_space import build_space

        c, o = self.cfg, self.opts
        self.space = build_space(o.method, o.space, o.space_only, c.user)  # bad --space fails before any work
        ensure_writable(os.path.dirname(self.dir), "run.storage")
        pre, ev = c.run.pretrain_dataset(), c.run.eval_dataset()
        self.n_pretrain = len(build_dataset(pre, c.data[pre], "train"))
        build_dataset(ev, c.data[ev], "val")
        self.pcfg = c.pretrain_for(o.method)
        self.total = plan_schedule(self.pcfg, self.n_pretrain, self.pcfg.workers).total_steps
        self.proxy_every = self.pcfg.proxy_every
        if o.asha:
            self.proxy_every = self.proxy_every or max(1, self.total // 4)
            if self.proxy_every >= self.total:
                raise BenchError(f"pretrain.proxy_every {self.proxy_every}: pretraining has only {self.total} steps, "
                                 f"so ASHA gets no intermediate score; lower proxy_every or pass --no-asha")
        check_settings(self.proxy_every, self.pcfg.proxy_images, self.pcfg.proxy_metric)
        task_cls = TASKS.get(o.task)
        self.primary = task_cls.primary
        self.mode = "max" if getattr(task_cls, "higher_is_better", True) else "min"
        self.pretrain_dict = to_dict(self.pcfg)

    def _settings(self) -> dict:
        return {"options": asdict(self.opts), "user": self.cfg.user, "created": time.time(),
                "space": self.space.text, "total_steps": self.total, "proxy_every": self.proxy_every}

    def _first_point(self) -> list[dict]:
        """The method's configured values, as the first trial, when every one of them lies in the space."""
        from bench.config import to_dict

        current = {f"{self.opts.method}.{k}": v for k, v in to_dict(self.cfg.methods[self.opts.method]).items()}
        current.update({f"pretrain.{k}": v for k, v in self.pretrain_dict.items()})
        point = {}
        for key, domain in self.space.domains.items():
            value = current.get(key)
            try:
                ok = value is not None and domain.is_valid(value)
            except Exception:
                ok = False
            if not ok:
                return []
            point[key] = value
        return [point]

    # ---- run
    def run(self) -> dict:
        import ray
        from ray import tune

        from bench.pipeline import eval_spec, loop_config
        from bench.raycluster import init_ray
        from bench.tracking import Tracker, git_commit

        c, o = self.cfg, self.opts
        self._prepare()
        state = ckpt.load_json(self.state_path) if os.path.exists(self.state_path) else None
        if state is None:
            os.makedirs(self.dir, exist_ok=True)
            # the resolved space, written out: a resume needs neither the YAML files nor the method's defaults
            o.space, o.space_only = self.space.as_items(), True
            state = self._settings()
        tracker = Tracker(c.tracking.uri, c.tracking.experiment)
        parent = state.get("parent")
        if not parent or tracker.run_status(parent) == "MISSING":
            tags = {"bench.kind": "tune", "bench.tune": o.name, "method": o.method, "task": o.task,
                    "dataset": c.run.eval_dataset(), "pretrain_dataset": c.run.pretrain_dataset(),
                    "backbone": c.backbone.name, "git_commit": git_commit(), "config_hash": c.hash()}
            parent = tracker.start_run(f"tune-{o.name}", tags)
            tracker.log_params(parent, {"tune": {k: v for k, v in asdict(o).items() if k != "space"},
                                        "space": self.space.text, **c.as_dict()})
            state["parent"] = parent
        ckpt.save_json(state, self.state_path)
        self.parent, self.tracker = parent, tracker

        init_ray(c.run.address)
        from bench.resources import check_search

        check_search(c, self.pcfg, self.console)  # a trial the cluster cannot hold fails here, in one line
        res = ray.cluster_resources()
        concurrent, cpw, notes = plan_resources(self.pcfg.workers, self.pcfg.cpus_per_worker, self.pcfg.gpu,
                                                o.concurrent, o.trials, int(res.get("CPU", 1)), int(res.get("GPU", 0)))
        for line in self.space.notes + notes:
            self.console.print(f"  [yellow]{line}[/yellow]")
        loop = loop_config(c, o.method, self.pcfg, "", cpw)
        loop["pretrain"]["proxy_every"] = self.proxy_every
        spec = eval_spec(c, o.method, self.n_pretrain)
        spec["tasks"] = {o.task: spec["tasks"][o.task]}
        base = {"method": o.method, "task": o.task, "dir": self.dir, "loop": loop, "spec": spec,
                "fixed": self.space.fixed, "total_steps": self.total}
        trainable = tune.with_resources(tune.with_parameters(run_trial, base=base), {"CPU": DRIVER_CPU})

        verb = "resuming" if self.resume else "starting"
        self.console.print(f"[bold]bench tune[/bold] {o.name}: {verb} {o.trials} trials of {o.method} on {o.task} "
                           f"({c.run.pretrain_dataset()} → {c.run.eval_dataset()}, {self.total} steps each, "
                           f"{concurrent} at once) · objective {o.task}/{self.primary} ({self.mode})"
                           + (f" · ASHA on the proxy every {self.proxy_every} steps" if o.asha else ""))
        for key, text in self.space.text.items():
            self.console.print(f"  {key}: {text}")
        from ray.tune import Tuner

        if self.resume and Tuner.can_restore(os.path.join(self.dir, TUNE_DIR)):
            tuner = Tuner.restore(os.path.join(self.dir, TUNE_DIR), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
        else:
            tuner = self._new_tuner(trainable, concurrent)
        # intermediate results carry ASHA's proxy, only the last one the objective: Tune's strict check wants
        # every metric in every result
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables, our own lines instead
        t0 = time.perf_counter()
        results = tuner.fit()
        wall = time.perf_counter() - t0
        return self.summarize(results, wall)

    def _new_tuner(self, trainable, concurrent: int):
        import optuna
        from ray import tune
        from ray.tune.search import ConcurrencyLimiter

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        c, o = self.cfg, self.opts
        searcher = BenchOptunaSearch(metric=OBJECTIVE, mode=self.mode, seed=c.run.seed,
                                     points_to_evaluate=self._first_point() or None)
        scheduler = None
        if o.asha:
            # rungs strictly before the last step (max_t = total - 1, last trials not stopped at max_t): a trial
            # that finished pretraining always gets its evaluation
            scheduler = BenchASHA(os.path.join(self.dir, TRIALS_FILE), time_attr="step", metric=PROXY,
                                  mode="max", max_t=self.total - 1, grace_period=self.proxy_every,
                                  reduction_factor=o.reduction_factor, stop_last_trials=False)
        info = {"uri": self.tracker.uri, "experiment": c.tracking.experiment, "parent": self.parent, "dir": self.dir,
                "name": o.name, "method": o.method, "task": o.task, "fixed": self.space.fixed,
                "primary": self.primary, "dataset": c.run.eval_dataset(), "backbone": c.backbone.name}
        return tune.Tuner(
            trainable, param_space=self.space.param_space(),
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrent),
                                        scheduler=scheduler, num_samples=o.trials),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=self.dir,
                                      callbacks=[TrialLogger(info)], verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )

    # ---- summary
    def summarize(self, results, wall: float) -> dict:
        import pandas as pd

        o = self.opts
        history = ckpt.load_json(os.path.join(self.dir, TRIALS_FILE)) if os.path.exists(
            os.path.join(self.dir, TRIALS_FILE)) else {}
        rows = []
        for r in results:
            m = r.metrics or {}
            tid, index = _trial_id_index(r)
            cfg = {k: (r.config or {}).get(k) for k in self.space.domains}
            status = "error" if r.error else ("completed" if OBJECTIVE in m else "early_stopped")
            if not r.error and OBJECTIVE not in m and not history.get(tid, {}).get("done"):
                status = "interrupted"
            rows.append({"trial": index, "trial_id": tid, "status": status, **cfg, OBJECTIVE: m.get(OBJECTIVE),
                         PROXY: m.get(PROXY), "step": m.get("step"), "wall_s": _trial_wall(history.get(tid, {})),
                         "pretrain_s": m.get("pretrain_s"), "train_loop_s": m.get("train_loop_s"),
                         "eval_s": m.get("eval_s"), "mlflow_run": history.get(tid, {}).get("run", "")})
        rows.sort(key=lambda row: (row["trial"], row["trial_id"]))
        df = pd.DataFrame(rows)
        done = [r for r in rows if r["status"] == "completed"]
        interrupted = len([r for r in rows if r["status"] in ("completed", "early_stopped", "error")]) < o.trials
        best = None
        if done:
            pick = max if self.mode == "max" else min
            b = pick(done, key=lambda r: r[OBJECTIVE])
            best = {"name": o.name, "method": o.method, "task": o.task, "metric": f"{o.task}/{self.primary}",
                    OBJECTIVE: b[OBJECTIVE], "trial_id": b["trial_id"], "mlflow_run": b["mlflow_run"],
                    "values": {k: b[k] for k in self.space.domains}, "fixed": self.space.fixed,
                    "overrides": self.space.overrides({k: b[k] for k in self.space.domains}),
                    "complete": not interrupted, "parent_run": self.parent}
            ckpt.save_json(best, os.path.join(self.dir, BEST_FILE))
        csv = os.path.join(self.dir, "trials.csv")
        df.to_csv(csv, index=False)
        self._log_summary(df, rows, best, csv, wall, interrupted)
        self._print(df, best, interrupted)
        if not done and not interrupted:
            errs = [r for r in rows if r["status"] == "error"]
            if errs and len(errs) == len(rows):
                raise BenchError(f"bench tune {o.name}: every trial failed; see the MLflow trial runs' tune.error "
                                 f"tags or {self.dir}")
        return {"name": o.name, "dir": self.dir, "best": best, "trials": rows, "interrupted": interrupted,
                "wall_s": wall, "parent_run": self.parent}

    def _log_summary(self, df, rows, best, csv, wall, interrupted) -> None:
        t = self.tracker
        counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "error")}
        t.log_metrics(self.parent, {f"tune/{k}": v for k, v in counts.items()})
        t.log_metrics(self.parent, {"tune/wall_s": wall})
        if len(df):
            t.log_table(self.parent, df, "tune/trials.json")
            t.log_artifact(self.parent, csv, "tune")
        if best:
            t.client.log_dict(self.parent, best, "tune/best_config.json")
            t.log_metrics(self.parent, {f"best/{OBJECTIVE}": best[OBJECTIVE]})
            t.set_tags(self.parent, {"tune.best_trial": best["trial_id"],
                                     **{f"best.{k}": v for k, v in best["values"].items()}})
        for fname, payload in optuna_summary(self.space.domains, rows, self.mode).items():
            if fname.endswith(".png"):
                t.log_image_bytes(self.parent, payload, f"tune/{fname}")
            elif fname == "param_importances.json":
                t.client.log_dict(self.parent, payload, f"tune/{fname}")
                t.log_metrics(self.parent, {f"importance/{k}": v for k, v in payload.items()})
            else:
                t.log_text(self.parent, str(payload), f"tune/{fname}")
        if interrupted:
            t.set_tags(self.parent, {"tune.state": "interrupted"})
        else:
            t.set_tags(self.parent, {"tune.state": "finished"})
            t.finish(self.parent)

    def _print(self, df, best, interrupted) -> None:
        from rich.table import Table

        table = Table(title=f"bench tune {self.opts.name}")
        cols = [c for c in df.columns if c not in ("mlflow_run", "pretrain_s", "train_loop_s", "eval_s")]
        for col in cols:
            table.add_column(col, justify="right" if col not in ("trial_id", "status") else "left")
        for _, row in df.iterrows():
            table.add_row(*[_cell(row[c]) for c in cols])
        self.console.print(table)
        if best:
            values = " ".join(f"{k}={_fmt(v)}" for k, v in best["values"].items())
            self.console.print(f"best: {best['metric']} {best[OBJECTIVE]:.2f} (trial {best['trial_id']}): {values}")
            self.console.print(f"[dim]pretrain with it: python -m bench run --methods {self.opts.method} "
                               f"--from-tune {self.opts.name}; MLflow run {self.parent} ({self.tracker.uri})[/dim]")
        if interrupted:
            self.console.print(f"[yellow]search interrupted; continue it with: python -m bench tune --resume "
                               f"{self.opts.name}[/yellow]")


def _trial_id_index(result) -> tuple[str, int]:
    """(Tune trial id, creation index) from a Result; its folder is ``<trainable>_<id>_<index>_<params>...``."""
    m = result.metrics or {}
    base = os.path.basename(str(result.path or ""))
    hit = re.search(r"_([0-9a-f]{5,})_(\d+)_", base)
    tid = m.get("trial_id") or (hit.group(1) if hit else base)
    index = int(hit.group(2)) if hit and hit.group(1) == tid else 0
    return tid, index


def _trial_wall(entry: dict) -> float | None:
    """Seconds from the trial's (last) start to its end, as the driver saw them (actor start included)."""
    if "t_start" in entry and "t_end" in entry:
        return float(entry["t_end"] - entry["t_start"])
    return None


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return _fmt(v)


def optuna_summary(domains: dict, rows: list[dict], mode: str) -> dict:
    """Optuna's parameter importances (``param_importances.json``) and the optimisation-history and importance
    plots (PNG bytes) from the finished trials; a note (``notes.txt``) where there is too little to say."""
    import io
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out: dict = {}
    try:
        dists = OptunaSearch.convert_search_space(dict(domains))
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        for r in rows:
            params = {k: r[k] for k in dists if r.get(k) is not None}
            if len(params) != len(dists):
                continue
            if r["status"] == "completed":
                study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=r[OBJECTIVE]))
            elif r["status"] == "early_stopped":
                study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                          state=optuna.trial.TrialState.PRUNED))
    except Exception as exc:  # noqa: BLE001 - a summary must not fail the search
        return {"notes.txt": f"no Optuna summary: {type(exc).__name__}: {exc}"}

    def png(ax) -> bytes:
        fig = ax.figure if hasattr(ax, "figure") else ax
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()

    notes = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if complete:
            out["optimization_history.png"] = png(optuna.visualization.matplotlib.plot_optimization_history(study))
        else:
            notes.append("no completed trial: no optimisation history")
        if len(complete) >= 2:
            try:
                imp = optuna.importance.get_param_importances(study)
                out["param_importances.json"] = {k: float(v) for k, v in imp.items()}
                out["param_importances.png"] = png(optuna.visualization.matplotlib.plot_param_importances(study))
            except Exception as exc:  # noqa: BLE001 - e.g. every completed trial has the same values
                notes.append(f"no parameter importances: {type(exc).__name__}: {exc}")
        else:
            notes.append(f"parameter importances need at least 2 completed trials ({len(complete)} completed)")
    if notes:
        out["notes.txt"] = "\n".join(notes)
    return out


# ------------------------------------------------------------------------------------------ entry points


def new_search(cfg, opts: TuneOptions, console=None) -> dict:
    from bench.registry import METHODS, TASKS

    check_options(opts)
    METHODS.validate([opts.method], "--method")
    TASKS.validate([opts.task], "--task")
    if not opts.name:
        opts.name = f"{opts.method}-{opts.task}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path = os.path.join(search_dir(cfg.run.storage, opts.name), STATE_FILE)
    if os.path.exists(path):
        raise BenchError(f"--name {opts.name}: a search with this name exists in {os.path.dirname(path)}; continue it "
                         f"with --resume {opts.name} or pick another --name")
    return Search(cfg, opts, resume=False, console=console).run()


def resume_search(name: str, storage: str, overrides: dict | None = None, console=None) -> dict:
    """Continue search ``name`` with the settings and config it was started with (``overrides``: run.address,
    tracking, which may differ between machines)."""
    from bench.config import deep_merge, resolve

    path = os.path.join(search_dir(storage, name), STATE_FILE)
    if not os.path.exists(path):
        root = os.path.dirname(os.path.dirname(path))
        have = sorted(d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, STATE_FILE))) \
            if os.path.isdir(root) else []
        raise BenchError(f"--resume {name}: no search named '{name}' in {root}"
                         + (f"; searches there: {', '.join(have)}" if have else ""))
    state = ckpt.load_json(path)
    opts = TuneOptions(**state["options"])
    user = deep_merge(state.get("user") or {}, overrides or {})
    user.setdefault("run", {})["storage"] = storage
    cfg = resolve(user)
    return Search(cfg, opts, resume=True, console=console).run()


def load_best(name: str, storage: str, tracker=None) -> dict:
    """``best.json`` of search ``name`` (from ``<storage>/tune/<name>``, else from its MLflow parent run)."""
    path = os.path.join(search_dir(storage, name), BEST_FILE)
    if os.path.exists(path):
        return ckpt.load_json(path)
    if tracker is not None:
        runs = tracker.find_runs(f"tags.`bench.kind` = 'tune' AND tags.`bench.tune` = '{name}'")
        for run in runs:
            try:
                import mlflow

                return mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/tune/best_config.json")
            except Exception:  # noqa: BLE001 - no finished trial in that run
                continue
    if os.path.exists(os.path.join(search_dir(storage, name), STATE_FILE)):
        raise BenchError(f"--from-tune {name}: the search has no completed trial yet; continue it with "
                         f"`python -m bench tune --resume {name}`")
    raise BenchError(f"--from-tune {name}: no search named '{name}' in {os.path.dirname(search_dir(storage, name))}"
                     + (f" or in MLflow experiment '{tracker.experiment}'" if tracker is not None else ""))


def apply_from_tune(cfg, names: list[str], console=None):
    """The run config with each named search's best values for its method (explicit user settings still win)."""
    from bench.config import deep_merge, resolve
    from bench.tracking import Tracker

    tracker = None
    try:
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, create=False)
    except BenchError:
        pass
    bests = [load_best(n, cfg.run.storage, tracker) for n in names]
    user = copy.deepcopy(cfg.user)
    given = (user.get("run") or {}).get("methods")
    tuned = [b["method"] for b in bests]
    if len(set(tuned)) != len(tuned):
        raise BenchError(f"--from-tune {','.join(names)}: two searches tune the same method")
    methods = list(given) if given else tuned
    for b in bests:
        if b["method"] not in methods:
            raise BenchError(f"--from-tune {b['name']}: that search tuned '{b['method']}', which --methods "
                             f"{','.join(methods)} does not name")
        if (b["overrides"].get("pretrain")) and len(methods) > 1:
            raise BenchError(f"--from-tune {b['name']}: its best config sets pretrain.* "
                             f"({', '.join(b['overrides']['pretrain'])}), which would apply to every method; "
                             f"run --methods {b['method']} alone")
    layer: dict = {}
    for b in bests:
        layer = deep_merge(layer, b["overrides"])
        if console is not None:
            values = " ".join(f"{k}={_fmt(v)}" for k, v in {**b.get("fixed", {}), **b["values"]}.items())
            note = "" if b.get("complete", True) else " (search not finished)"
            console.print(f"  from tune {b['name']}{note}: {b['metric']} {b[OBJECTIVE]:.2f} with {values}")
    user = deep_merge(layer, user)
    user.setdefault("run", {})["methods"] = methods
    return resolve(user)
