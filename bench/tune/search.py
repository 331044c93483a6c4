"""The search of ``bench tune``: setup (space, schedule, proxy, MLflow parent run), the Tuner (TPE behind a
concurrency limit, ASHA on the proxy, the MLflow callback), resume, and the entry points ``new_search`` and
``resume_search``."""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import asdict

from bench import checkpoint as ckpt
from bench.errors import BenchError
from bench.tune.constants import OBJECTIVE, PROXY, STATE_FILE, TRIALS_FILE, TUNE_DIR
from bench.tune.logger import TrialLogger
from bench.tune.options import TuneOptions, check_options, plan_resources, search_dir
from bench.tune.schedulers import BenchASHA, BenchOptunaSearch
from bench.tune.summary import SearchSummary
from bench.tune.trial import run_trial, trial_resources


class Search(SearchSummary):
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
        from bench.storage import ensure_writable
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

        from bench.evaluate import eval_spec
        from bench.loopconfig import loop_config
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
        loop = loop_config(c, o.method, self.pcfg, "", cpw).to_dict()
        loop["pretrain"]["proxy_every"] = self.proxy_every
        spec = eval_spec(c, o.method, self.n_pretrain)
        spec["tasks"] = {o.task: spec["tasks"][o.task]}
        base = {"method": o.method, "task": o.task, "dir": self.dir, "loop": loop, "spec": spec,
                "fixed": self.space.fixed, "total_steps": self.total}
        trainable = tune.with_resources(tune.with_parameters(run_trial, base=base),
                                        trial_resources(self.pcfg.workers, cpw, self.pcfg.gpu))

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
                                        scheduler=scheduler, num_samples=o.trials,
                                        # a stopped in-process trial must take its training thread with it
                                        reuse_actors=False),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=self.dir,
                                      callbacks=[TrialLogger(info)], verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )


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

