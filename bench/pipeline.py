"""``bench run``: pretrain each method with Ray Train, evaluate each task, log to MLflow, print the leaderboard.

Resumable at every stage: ``<storage>/<run_id>/`` holds each method's checkpoints and ``final.pt``, each
evaluation's ``eval_<task>.json`` and the MLflow run ids (``mlflow.json``). Re-running with the same
``--run-id`` skips finished pretrainings and evaluations, continues an interrupted pretraining from its last
checkpoint, and reuses the same MLflow runs, so nothing is logged twice.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from dataclasses import dataclass, field

from bench import checkpoint as ckpt
from bench.config import BenchConfig, to_dict
from bench.errors import BenchError
from bench.leaderboard import BASELINE, Row, export, render
from bench.registry import DATASETS, TASKS
from bench.tracking import Tracker, git_commit


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def ensure_writable(path: str, option: str) -> str:
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"{option} {path}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise BenchError(f"{option} {path}: not writable")
    return path


def eval_spec(cfg: BenchConfig, method: str | None, n_pretrain: int) -> dict:
    """What ``bench.evaluate.evaluate_method`` needs (plain data); ``method=None`` for the untrained baseline."""
    c = cfg
    spec = {
        "backbone": to_dict(c.backbone), "seed": c.run.seed, "eval_dataset": c.run.eval_dataset(),
        "eval_dataset_cfg": to_dict(c.data[c.run.eval_dataset()]),
        "tasks": {t: to_dict(c.tasks[t]) for t in c.run.tasks}, "n_pretrain_images": n_pretrain,
    }
    if method:
        spec["method_cfg"] = to_dict(c.methods[method])
        spec["pretrain"] = to_dict(c.pretrain_for(method))
        spec["pretrain_dataset"] = c.run.pretrain_dataset()
    return spec


def loop_config(cfg: BenchConfig, method: str, pcfg, out_dir: str, cpus: int) -> dict:
    """``bench.pretrain.train_loop``'s ``loop_config`` for one method (also used by ``bench tune`` trials)."""
    c = cfg
    loop_cfg = {"method": method, "method_cfg": to_dict(c.methods[method]), "pretrain": to_dict(pcfg),
                "backbone": to_dict(c.backbone), "dataset": c.run.pretrain_dataset(),
                "dataset_cfg": to_dict(c.data[c.run.pretrain_dataset()]), "seed": c.run.seed, "out_dir": out_dir}
    loop_cfg["pretrain"]["cpus_per_worker"] = cpus
    return loop_cfg


class RunState:
    """The MLflow run ids of one bench run, persisted atomically in ``mlflow.json``."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "mlflow.json")
        self.ids: dict = ckpt.load_json(self.path) if os.path.exists(self.path) else {}

    def get(self, key: str) -> str | None:
        return self.ids.get(key)

    def set(self, key: str, value: str) -> None:
        self.ids[key] = value
        ckpt.save_json(self.ids, self.path)


@dataclass
class Timings:
    phases: dict = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds


class Pipeline:
    def __init__(self, cfg: BenchConfig, console=None, progress: bool = True):
        from rich.console import Console

        self.cfg = cfg
        self.console = console or Console()
        self.show_progress = progress
        self.run_id = cfg.run.run_id or new_run_id()
        self.storage = ensure_writable(cfg.run.storage, "run.storage")
        self.run_dir = ensure_writable(os.path.join(self.storage, self.run_id), "run.storage")
        self.results_dir = cfg.run.results_dir
        self.timings = Timings()
        self.state = RunState(self.run_dir)

    # ------------------------------------------------------------------------------- helpers
    def _tags(self, **extra) -> dict:
        c = self.cfg
        tags = {"bench.run_id": self.run_id, "dataset": c.run.eval_dataset(), "pretrain_dataset": c.run.pretrain_dataset(),
                "backbone": c.backbone.name, "git_commit": git_commit(), "config_hash": c.hash()}
        tags["mlflow.source.git.commit"] = tags["git_commit"]  # shown by the MLflow UI's run page
        tags.update(extra)
        return tags

    def _run(self, key: str, name: str, tags: dict, parent: str | None) -> tuple[str, bool]:
        """(MLflow run id, already finished) for a stage, reusing the run recorded by an earlier attempt."""
        rid = self.state.get(key)
        if rid:
            status = self.tracker.run_status(rid)
            if status == "FINISHED":
                return rid, True
            if status != "MISSING":
                return rid, False
        rid = self.tracker.start_run(name, tags, parent)
        self.state.set(key, rid)
        return rid, False

    def _spec(self, method: str | None) -> dict:
        return eval_spec(self.cfg, method, self.n_pretrain)

    # ------------------------------------------------------------------------------- stages
    def run(self) -> list[Row]:
        c = self.cfg
        t0 = time.perf_counter()
        self.tracker = Tracker(c.tracking.uri, c.tracking.experiment)
        self._check_data()
        self.parent, _ = self._run("parent", self.run_id, self._tags(**{"bench.kind": "run"}), None)
        self.tracker.log_params(self.parent, c.as_dict())
        self.timings.add("setup", time.perf_counter() - t0)
        self.console.print(f"[bold]bench run[/bold] {self.run_id}: methods {', '.join(c.run.methods)} · tasks "
                           f"{', '.join(c.run.tasks)} · data {c.run.pretrain_dataset()} → {c.run.eval_dataset()} · "
                           f"backbone {c.backbone.name}")
        t = time.perf_counter()
        from bench.raycluster import init_ray
        from bench.resources import check_run

        init_ray(c.run.address)
        check_run(c, self.console)  # a request the cluster cannot hold fails here, in one line
        self.timings.add("ray_start", time.perf_counter() - t)
        for method in c.run.methods:
            self.pretrain(method)
        rows: list[Row] = []
        evaluated = list(c.run.methods) + ([BASELINE] if c.run.baseline else [])
        for method in evaluated:
            rows.extend(self.evaluate(method))
        t = time.perf_counter()
        self.finish(rows)
        self.timings.add("logging", time.perf_counter() - t)
        self.timings.add("total", time.perf_counter() - t0)
        self.tracker.log_metrics(self.parent, {f"time/{k}_s": v for k, v in self.timings.phases.items()})
        ckpt.save_json(self.timings.phases, os.path.join(self.run_dir, "timings.json"))
        return rows

    def _check_data(self) -> None:
        """Build every dataset once up front so a wrong root fails before Ray starts."""
        c = self.cfg
        from bench.data import build_dataset

        pre = c.run.pretrain_dataset()
        self.n_pretrain = len(build_dataset(pre, c.data[pre], "train"))
        ev = c.run.eval_dataset()
        build_dataset(ev, c.data[ev], "val")

    def pretrain(self, method: str) -> None:
        c = self.cfg
        out_dir = os.path.join(self.run_dir, method)
        final = os.path.join(out_dir, "final.pt")
        pcfg = c.pretrain_for(method)
        rid, done = self._run(f"pretrain/{method}", f"pretrain-{method}",
                              self._tags(**{"bench.kind": "pretrain", "method": method}), self.parent)
        if done and os.path.exists(final):
            self.console.print(f"  {method}: pretraining already finished in run {self.run_id}, skipped")
            return
        self.tracker.log_params(rid, {"method": to_dict(c.methods[method]), "pretrain": to_dict(pcfg),
                                      "backbone": to_dict(c.backbone)})
        t = time.perf_counter()
        if os.path.exists(final):  # trained by an interrupted attempt that had not yet logged it
            self.console.print(f"  {method}: pretraining already finished in run {self.run_id} "
                               f"(final checkpoint found), logging it")
            result = {}
        else:
            ckpt.load_latest_step(os.path.join(out_dir, "checkpoints"), self.console.print)  # warn in the driver
            result = self._fit(method, pcfg, out_dir)
        seconds = time.perf_counter() - t
        self.timings.add(f"pretrain_{method}", seconds)
        from bench.pretrain import read_metrics

        curves = read_metrics(out_dir)
        self.tracker.log_curves(rid, curves)
        summary = {f"pretrain/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
        summary["pretrain/driver_wall_s"] = seconds
        self.tracker.log_metrics(rid, summary)
        self.tracker.log_artifact(rid, final, "checkpoint")
        self.tracker.finish(rid)
        ips = result.get("images_per_s")
        self.console.print(f"  {method}: pretrained {result.get('steps', '?')} steps in {seconds:.0f}s"
                           + (f" ({ips:.1f} images/s)" if ips else ""))

    def _fit(self, method: str, pcfg, out_dir: str) -> dict:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from bench.pretrain import plan_schedule, train_loop

        c = self.cfg
        os.makedirs(out_dir, exist_ok=True)
        cpus = pcfg.cpus_per_worker or max(1, int(ray.available_resources().get("CPU", 1)) // max(pcfg.workers, 1))
        loop_cfg = loop_config(c, method, pcfg, out_dir, cpus)
        trainer = TorchTrainer(
            train_loop, train_loop_config=loop_cfg,
            scaling_config=ScalingConfig(num_workers=pcfg.workers, use_gpu=pcfg.gpu,
                                         resources_per_worker={"CPU": cpus}),
            run_config=RunConfig(name=f"{method}-{int(time.time())}", storage_path=os.path.join(self.run_dir, "ray"),
                                 failure_config=FailureConfig(max_failures=pcfg.max_failures)),
        )
        total = plan_schedule(pcfg, self.n_pretrain, pcfg.workers).total_steps
        box: dict = {}

        def fit():
            try:
                box["result"] = trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - surfaced below in the driver thread
                box["error"] = exc

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        self._follow(thread, method, out_dir, total)
        if "error" in box:
            raise BenchError(f"pretraining '{method}' failed: {_root_cause(box['error'])}; "
                             f"re-run with --run-id {self.run_id} to resume from the last checkpoint")
        result = box["result"]
        if getattr(result, "error", None):
            raise BenchError(f"pretraining '{method}' failed: {_root_cause(result.error)}; "
                             f"re-run with --run-id {self.run_id} to resume from the last checkpoint")
        value = getattr(result, "return_value", None)
        return value if isinstance(value, dict) else {}

    def _follow(self, thread: threading.Thread, method: str, out_dir: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from bench.pretrain import read_metrics

        if not self.show_progress:
            thread.join()
            return
        with Progress(TextColumn(f"  pretrain [bold]{method}[/bold]"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console,
                      transient=True) as progress:
            task = progress.add_task(method, total=total, info="starting Ray Train")
            while thread.is_alive():
                thread.join(timeout=0.5)
                rows = read_metrics(out_dir)
                if rows:
                    last = rows[-1]
                    progress.update(task, completed=last["step"],
                                    info=f"loss {last['loss']:.4f} · {last['images_per_s']:.0f} img/s")

    def evaluate(self, method: str) -> list[Row]:
        import ray

        from bench.evaluate import evaluate_method

        c = self.cfg
        out_dir = os.path.join(self.run_dir, method)
        final = None if method == BASELINE else os.path.join(out_dir, "final.pt")
        pending = [t for t in c.run.tasks if not os.path.exists(os.path.join(out_dir, f"eval_{t}.json"))]
        t0 = time.perf_counter()
        if pending:
            spec = self._spec(None if method == BASELINE else method)
            use_gpu = c.pretrain.gpu
            cpus = _largest_node_cpus()
            remote = ray.remote(num_cpus=cpus if not use_gpu else 1, num_gpus=1 if use_gpu else 0)(evaluate_method)
            with self.console.status(f"  evaluating [bold]{method}[/bold] on {', '.join(pending)}"):
                try:
                    ray.get(remote.remote(method, final, pending, spec, out_dir, use_gpu, cpus))
                except Exception as exc:
                    raise BenchError(f"evaluation of '{method}' failed: {_root_cause(exc)}") from None
        self._feature_figure(method, final, out_dir)
        self.timings.add(f"eval_{method}", time.perf_counter() - t0)
        rows = []
        for task in c.run.tasks:
            res = ckpt.load_json(os.path.join(out_dir, f"eval_{task}.json"))
            tags = self._tags(**{"bench.kind": "eval", "method": method, "task": task,
                                 "bench.primary": res["primary"], "bench.protocol": res["protocol"]})
            rid, done = self._run(f"eval/{method}/{task}", f"eval-{method}-{task}", tags, self.parent)
            if not done:
                self.tracker.log_params(rid, {"task": to_dict(c.tasks[task])})
                self.tracker.log_metrics(rid, {f"{task}/{k}": v for k, v in res["metrics"].items()
                                               if isinstance(v, (int, float))})
                # underscore alias of the primary metric: MLflow search without backticks (metrics.linseg_miou > 30)
                self.tracker.log_metrics(rid, {f"{task}_{res['primary']}": res["metrics"].get(res["primary"])})
                if res.get("per_class"):
                    names = res.get("class_names") or DATASETS.get(c.run.eval_dataset()).class_names
                    self.tracker.client.log_dict(rid, {"class_names": list(names), **res["per_class"]},
                                                 f"{task}_per_class.json")
                for fname, fpath in res.get("figures", {}).items():
                    if os.path.exists(fpath):
                        self.tracker.log_artifact(rid, fpath, "figures")
                if os.path.exists(os.path.join(out_dir, "features_pca.png")):
                    self.tracker.log_artifact(rid, os.path.join(out_dir, "features_pca.png"), "figures")
                self.tracker.finish(rid)
            rows.append(Row(method=method, task=task, metrics=res["metrics"], primary=res["primary"],
                            dataset=c.run.eval_dataset(), backbone=c.backbone.name, protocol=res["protocol"], run=rid))
        return rows

    def _feature_figure(self, method: str, final: str | None, out_dir: str) -> None:
        """PCA-to-RGB picture of the method's dense features (bench.figures), drawn where evaluations run."""
        if os.path.exists(os.path.join(out_dir, "features_pca.png")):
            return
        import ray

        from bench.figures import method_feature_figure

        use_gpu = self.cfg.pretrain.gpu
        remote = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(method_feature_figure)
        try:
            ray.get(remote.remote(method, final, self._spec(None if method == BASELINE else method), out_dir, use_gpu))
        except Exception as exc:  # a picture is not worth failing a benchmark for: say so and go on
            self.console.print(f"  [yellow]{method}: feature picture skipped ({_root_cause(exc)})[/yellow]")

    def finish(self, rows: list[Row]) -> None:
        from bench.leaderboard import to_frame, to_markdown

        render(rows, title=f"Leaderboard · run {self.run_id}", console=self.console)
        df = to_frame(rows)
        self.tracker.log_table(self.parent, df.round(2), "leaderboard.json")  # as printed; runs keep full precision
        self.tracker.log_text(self.parent, to_markdown(rows), "leaderboard.md")
        from bench.figures import grid_from_npz

        methods = list(dict.fromkeys(r.method for r in rows))
        grid = grid_from_npz({m: os.path.join(self.run_dir, m, "features_pca.npz") for m in methods},
                             title=f"PCA of dense features, {self.cfg.run.eval_dataset()} val")
        if grid:
            path = os.path.join(self.run_dir, "features_pca.png")
            ckpt.atomic_write_bytes(path, lambda fh: fh.write(grid))
            self.tracker.log_artifact(self.parent, path)
        for r in rows:
            self.tracker.log_metrics(self.parent, {f"{r.method}/{r.task}/{r.primary}": r.metrics.get(r.primary)})
        paths = export(rows, self.results_dir, self.run_id)
        self.tracker.finish(self.parent)
        self.console.print(f"[dim]leaderboard written to {', '.join(paths)}; MLflow run {self.parent} "
                           f"(experiment '{self.cfg.tracking.experiment}', {self.tracker.uri})[/dim]")


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


def run(cfg: BenchConfig, console=None, progress: bool = True) -> list[Row]:
    from bench.runlock import RunLock

    pipe = Pipeline(cfg, console, progress)
    with RunLock(pipe.run_dir, pipe.run_id):  # one `bench run` per run id at a time (bench.runlock)
        return pipe.run()


__all__ = ["run", "Pipeline", "TASKS"]
