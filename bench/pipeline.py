"""``bench run``: pretrain each method once per seed with Ray Train, evaluate each task on each, log to MLflow,
print the leaderboard.

Resumable at every stage: ``<storage>/<run_id>/`` holds each method's checkpoints and ``final.pt`` (in
``<method>/``, or ``<method>/seed<k>/`` with several seeds), each evaluation's ``eval_<task>.json`` (with its
per-image statistics, ``eval_<task>_per_image.npz``) and the MLflow run ledger (``mlflow.json``,
``bench.tracking.RunLedger``). Re-running with the same ``--run-id`` skips finished stages, continues an
interrupted pretraining from its last checkpoint and logs what an unavailable MLflow store missed.

Across runs, ``bench.cache`` reuses a finished pretraining or evaluation with the same key (``--no-cache``
recomputes); the run says what it reused. Seeds are pretrained side by side when the cluster holds several
pretrainings at once (GPUs, or CPUs with ``pretrain.cpus_per_worker`` set); otherwise a run's pretrainings go one
after the other in one Ray Train worker group (``bench.launch.train_sequence``). Evaluations are Ray tasks, all
submitted at once (``bench.stages_eval``).
"""

from __future__ import annotations

import copy
import os
import time

from bench import checkpoint as ckpt
from bench.board import BASELINE, Row, baseline_label
from bench.cache import Cache, code_version, link_or_copy, pretrain_key
from bench.config import BenchConfig, to_dict
from bench.errors import BenchError
from bench.fitting import concurrency, follow, job_seconds, run_here, run_locally, start_fit
from bench import recipe_tools
from bench.leaderboard import build, export, render
from bench.registry import TASKS
from bench.raycluster import local_cpus
from bench.resources import check_run, local_view
from bench.loopconfig import loop_config
from bench.pretrain import loop_result
from bench.runspec import Job, Timings, _root_cause, new_run_id, parse_seeds, seeds_of
from bench.storage import ensure_writable
from bench.stages_eval import EvaluationStages
from bench.tracking import RunLedger, Tracker, run_tags


class Pipeline(EvaluationStages):
    def __init__(self, cfg: BenchConfig, console=None, progress: bool = True):
        from rich.console import Console

        self.cfg = cfg
        self.console = console or Console(soft_wrap=True)  # messages unwrapped in logs; tables keep their width
        self.show_progress = progress
        self.run_id = cfg.run.run_id or new_run_id()
        self.storage = ensure_writable(cfg.run.storage, "run.storage")
        self.run_dir = ensure_writable(os.path.join(self.storage, self.run_id), "run.storage")
        self.results_dir = cfg.run.results_dir
        self.timings = Timings()
        self.seeds = seeds_of(cfg)
        self.cache = Cache(self.storage, enabled=cfg.run.cache)
        self.reused = {"pretrain": 0, "eval": 0}
        self.baseline = baseline_label(cfg.backbone.init)
        self._cfgs: dict[int, BenchConfig] = {}

    # ------------------------------------------------------------------------------- helpers
    def _cfg(self, seed: int) -> BenchConfig:
        if seed not in self._cfgs:
            c = copy.deepcopy(self.cfg)
            c.run.seed = seed
            self._cfgs[seed] = c
        return self._cfgs[seed]

    def _dir(self, method: str, seed: int) -> str:
        base = os.path.join(self.run_dir, method)
        return base if len(self.seeds) == 1 else os.path.join(base, f"seed{seed}")

    def _ledger_key(self, *parts: str, seed: int) -> str:
        return "/".join(parts) + ("" if len(self.seeds) == 1 else f"/seed{seed}")

    def _tags(self, kind: str, seed: int | None = None, **extra) -> dict:
        """Every stage's tags (``bench.tracking.TAG``); the recipe tags are the method's (the run's for the parent
        and the baseline), its backbone the one its recipe resolved."""
        c = self.cfg
        method = extra.get("method")
        backbone = c.backbone_for(method).name if method in c.recipes else c.backbone.name
        extra = {**recipe_tools.tags(c, method), **extra}
        return run_tags(kind, self.run_id, dataset=c.run.eval_dataset(), pretrain_dataset=c.run.pretrain_dataset(),
                        backbone=backbone, config_hash=c.hash(),
                        init=os.path.basename(c.backbone.init) if c.backbone.init else "",
                        code_version=code_version(("bench", "methods", "tasks")), seed=seed, **extra)

    def _record(self, seed: int) -> dict:
        """What ``bench reproduce`` needs to re-run a cell: the user layer (defaults apply again on top), the
        resolved config it gave, and the seed."""
        user = copy.deepcopy(self.cfg.user)
        if self.cfg.backbone.init:
            user.setdefault("backbone", {})["init"] = self.cfg.backbone.init  # absolute, as resolved
        return {"user": user, "resolved": self._cfg(seed).as_dict(), "seed": seed}

    def _ray(self):
        """Ray, started (or joined) on first use: a run whose cells are all cached never starts it."""
        import ray

        if not ray.is_initialized():
            from bench.raycluster import init_ray

            t = time.perf_counter()
            init_ray(self.cfg.run.address)
            check_run(self.cfg, self.console)  # a request the cluster cannot hold fails here, in one line
            self.timings.add("ray_start", time.perf_counter() - t)
        return ray

    def _offline(self, reason: str) -> None:
        self.console.print(f"[yellow]MLflow store {self.tracker.uri} cannot be written ({reason}); the run goes on "
                           f"and keeps its results in {self.run_dir}[/yellow]")

    def _backbone_key(self) -> dict:
        """The backbone settings with ``init`` as the file's hash (the same weights anywhere are the same key)."""
        b = to_dict(self.cfg.backbone)
        if b.get("init"):
            b["init"] = self.cache.checkpoint_hash(b["init"])
        return b

    # ------------------------------------------------------------------------------- stages
    def run(self) -> list[Row]:
        c = self.cfg
        t0 = time.perf_counter()
        self.tracker = Tracker(c.tracking.uri, c.tracking.experiment, on_offline=self._offline)
        self.ledger = RunLedger(self.run_dir, self.tracker)
        self._check_data()
        self.parent, _ = self.ledger.stage("parent", self.run_id, self._tags("run"), None)
        self.tracker.log_params(self.parent, c.as_dict())
        self.tracker.log_dict(self.parent, recipe_tools.run_record(c), "recipe_diff.json")
        self.timings.add("setup", time.perf_counter() - t0)
        seeds = f" · seeds {', '.join(map(str, self.seeds))}" if len(self.seeds) > 1 else ""
        self.console.print(f"[bold]bench run[/bold] {self.run_id}: methods {', '.join(c.run.methods)} · tasks "
                           f"{', '.join(c.run.tasks)} · data {c.run.pretrain_dataset()} → {c.run.eval_dataset()} · "
                           f"backbone {c.backbone.name}{seeds}")
        self.pretrain_all()
        evaluated = list(c.run.methods) + ([BASELINE] if c.run.baseline else [])
        rows = self.evaluate_all([(m, s) for s in self.seeds for m in evaluated])
        t = time.perf_counter()
        self.finish(rows)
        self.timings.add("logging", time.perf_counter() - t)
        self.timings.add("total", time.perf_counter() - t0)
        self.tracker.log_metrics(self.parent, {f"time/{k}_s": v for k, v in self.timings.phases.items()})
        ckpt.save_json(self.timings.phases, os.path.join(self.run_dir, "timings.json"))
        self._report()
        return rows

    def _report(self) -> None:
        if any(self.reused.values()):
            self.console.print(f"reused from earlier runs: {self.reused['pretrain']} pretraining(s), "
                               f"{self.reused['eval']} evaluation(s) (same key; --no-cache recomputes)")
        if self.tracker.offline:
            self.console.print(f"[yellow]not logged to MLflow ({self.tracker.offline}): results are kept in "
                               f"{self.run_dir}; once the store is back, re-run the same command with --run-id "
                               f"{self.run_id} to log them (nothing is recomputed)[/yellow]")

    def _check_data(self) -> None:
        """Build every dataset once up front so a wrong root fails before Ray starts."""
        c = self.cfg
        from bench.data import build_dataset

        pre = c.run.pretrain_dataset()
        self.n_pretrain = len(build_dataset(pre, c.data[pre], "train"))
        ev = c.run.eval_dataset()
        build_dataset(ev, c.data[ev], "val")

    # ------------------------------------------------------------------------------- pretraining
    def pretrain(self, method: str, seed: int | None = None) -> None:
        """One method at one seed (default: the first), resumed, reused from the cache or trained."""
        self.pretrain_all([(method, self.seeds[0] if seed is None else seed)])

    def pretrain_all(self, jobs: list[tuple[str, int]] | None = None) -> None:
        jobs = jobs or [(m, s) for s in self.seeds for m in self.cfg.run.methods]
        pending = [j for j in (self._prepare(m, s) for m, s in jobs) if j is not None]
        todo = []
        for job in pending:
            if os.path.exists(os.path.join(job.out_dir, "final.pt")):
                self._log_pretrain(job, 0.0)
            else:
                todo.append(job)
        pcfgs = [self._cfg(j.seed).pretrain_for(j.method) for j in todo]
        here = run_locally(pcfgs, self.cfg.run.address)  # in this process; Ray starts when evaluations need it
        if todo:
            if here:
                check_run(self.cfg, self.console, view_fn=local_view)
            else:
                self._ray()
            for job in todo:  # a corrupt newest checkpoint: say so here; the loop resumes from the one before
                ckpt.load_latest_step(os.path.join(job.out_dir, "checkpoints"), self.console.print)
        k = 1 if here else concurrency(pcfgs)
        # k 1: all of them in one fit, one after the other; else k fits at a time
        chunks = [todo[i:i + k] for i in range(0, len(todo), k)] if k > 1 else [todo] if todo else []
        for chunk in chunks:
            self._fit_many(chunk, k, here)

    def _prepare(self, method: str, seed: int) -> Job | None:
        c = self._cfg(seed)
        job = Job(method, seed, self._dir(method, seed))
        final = os.path.join(job.out_dir, "final.pt")
        pcfg = c.pretrain_for(method)
        lc = loop_config(c, method, pcfg, job.out_dir, 0).to_dict()
        lc["backbone"] = self._backbone_key()
        job.key = pretrain_key(lc, recipe_tools.tags(c, method)["recipe_hash"])
        if not os.path.exists(final):
            job.hit = self.cache.lookup_pretrain(job.key)
            if job.hit:
                link_or_copy(job.hit["final"], final)
                ckpt.save_json(job.hit.get("summary", {}), os.path.join(job.out_dir, "pretrain_summary.json"))
                ckpt.save_json({k: job.hit.get(k) for k in ("run_id", "mlflow_run", "final")},
                               os.path.join(job.out_dir, "cached_from.json"))
                self.reused["pretrain"] += 1
                self.console.print(f"  {self._name(method, seed)}: pretraining reused from run "
                                   f"{job.hit.get('run_id')} (same recipe, config, code and seed)")
        tags = self._tags("pretrain", seed, method=method, cache_key=job.key,
                          cache="hit" if job.hit else "miss", cached_from=(job.hit or {}).get("run_id"))
        job.rid, done = self.ledger.stage(self._ledger_key("pretrain", method, seed=seed),
                                          f"pretrain-{self._name(method, seed)}", tags, self.parent)
        if done and os.path.exists(final):
            self.console.print(f"  {self._name(method, seed)}: pretraining already finished in run {self.run_id}, "
                               f"skipped")
            return None
        self.tracker.log_params(job.rid, {"method": to_dict(c.methods[method]), "pretrain": to_dict(pcfg),
                                          "backbone": to_dict(c.backbone_for(method))})
        self.tracker.log_dict(job.rid, recipe_tools.record(c, method), "recipe_diff.json")
        if os.path.exists(final) and not job.hit:
            self.console.print(f"  {self._name(method, seed)}: pretraining already finished in run {self.run_id} "
                               f"(final checkpoint found), logging it")
        return job

    def _name(self, method: str, seed: int) -> str:
        return method if len(self.seeds) == 1 else f"{method} seed {seed}"

    def _fit_many(self, jobs: list[Job], k: int, here: bool = False) -> None:
        """``k`` > 1: one fit per job, all at once; ``k`` 1: one fit running ``jobs`` one after the other in one
        worker group (``bench.launch.train_sequence``), or with ``here`` in this process (Ray Train's local mode,
        ``bench.fitting.run_here``)."""
        if here:
            pcfg = self._cfg(jobs[0].seed).pretrain_for(jobs[0].method)
            cpus = pcfg.cpus_per_worker or local_cpus()
            box = run_here([self._cfg(j.seed) for j in jobs], jobs, [self._name(j.method, j.seed) for j in jobs],
                           pcfg, cpus, self.n_pretrain, self.run_dir, self.console, self.show_progress)
            started = [(jobs, cpus, None, box, None)]
        else:
            started = self._start_groups(jobs, k)
        for group, cpus, _thread, box, _totals in started:
            result = box.get("result")
            error = box.get("error") or getattr(result, "error", None)
            value = getattr(result, "return_value", None)
            values = value if isinstance(value, list) else [value] * len(group)
            results = [loop_result(j.out_dir, v) for j, v in zip(group, values)]
            for job, res, seconds in zip(group, results, job_seconds(box, results)):
                if not os.path.exists(os.path.join(job.out_dir, "final.pt")):  # the one that failed
                    raise BenchError(f"pretraining '{self._name(job.method, job.seed)}' failed: "
                                     f"{_root_cause(error) if error else 'no final checkpoint was written'}; re-run "
                                     f"with --run-id {self.run_id} to resume from the last checkpoint")
                job.summary = self._summary(job, res, seconds, cpus)
                ckpt.save_json(job.summary, os.path.join(job.out_dir, "pretrain_summary.json"))
                self.cache.store_pretrain(job.key, os.path.join(job.out_dir, "final.pt"), job.summary,
                                          {"run_id": self.run_id, "mlflow_run": job.rid, "method": job.method,
                                           "seed": job.seed})
                self._log_pretrain(job, seconds)
            if error:
                raise BenchError(f"pretraining {', '.join(self._name(j.method, j.seed) for j in group)} failed: "
                                 f"{_root_cause(error)}; re-run with --run-id {self.run_id} to resume")

    def _start_groups(self, jobs: list[Job], k: int) -> list[tuple]:
        """Start the worker groups of ``_fit_many`` and wait for them, with their progress bars."""
        ray = self._ray()
        avail = int(ray.available_resources().get("CPU", 1))
        groups = [[j] for j in jobs] if k > 1 else [jobs]
        started = []
        for group in groups:
            pcfg = self._cfg(group[0].seed).pretrain_for(group[0].method)
            share = max(1, avail // max(pcfg.workers * len(groups), 1))
            cpus = pcfg.cpus_per_worker or share
            started.append((group, cpus, *start_fit([self._cfg(j.seed) for j in group], group, pcfg, cpus,
                                                    self.n_pretrain, self.run_dir)))
        follow(self.console, [(self._name(j.method, j.seed), j.out_dir, thread, total)
                              for group, _, thread, _, totals in started for j, total in zip(group, totals)],
               self.show_progress)
        return started

    def _summary(self, job: Job, result: dict, seconds: float, cpus: int) -> dict:
        """The compute a pretraining took: images seen, wall time, device-hours, parameters, peak memory."""
        pcfg = self._cfg(job.seed).pretrain_for(job.method)
        out = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        steps = int(result.get("steps", 0))
        gpu = pcfg.gpu
        out.update({"images_seen": steps * pcfg.batch_size, "pretrain_wall_s": seconds,
                    "device_h": seconds * pcfg.workers * (1 if gpu else cpus) / 3600.0,
                    "device": "GPU-h" if gpu else "CPU core-h", "workers": pcfg.workers, "cpus_per_worker": cpus})
        return out

    def _log_pretrain(self, job: Job, seconds: float) -> None:
        from bench.pretrain import read_metrics

        final = os.path.join(job.out_dir, "final.pt")
        summary_path = os.path.join(job.out_dir, "pretrain_summary.json")
        if not job.summary and os.path.exists(summary_path):
            job.summary = ckpt.load_json(summary_path)
        self.timings.add(f"pretrain_{job.method}", seconds)
        rid = job.rid
        self.tracker.log_curves(rid, read_metrics(job.out_dir))
        summary = {f"pretrain/{k}": v for k, v in job.summary.items() if isinstance(v, (int, float))}
        summary["pretrain/driver_wall_s"] = seconds
        self.tracker.log_metrics(rid, summary)
        self.tracker.log_dict(rid, self._record(job.seed), "config.json")
        if job.hit:
            self.tracker.set_tags(rid, {"bench.checkpoint": final})
        else:
            self.tracker.log_artifact(rid, final, "checkpoint")
        self.tracker.finish(rid)
        if seconds:
            ips = job.summary.get("images_per_s")
            self.console.print(f"  {self._name(job.method, job.seed)}: pretrained {job.summary.get('steps', '?')} "
                               f"steps in {seconds:.0f}s" + (f" ({ips:.1f} images/s)" if ips else ""))

    def finish(self, rows: list[Row]) -> None:
        from bench.figures import grid_from_npz, leaderboard_figure
        from bench.leaderboard import to_frame, to_markdown

        board = build(rows)
        render(board, title=f"Leaderboard · run {self.run_id}", console=self.console)
        self.tracker.log_table(self.parent, to_frame(board).round(2), "leaderboard.json")
        self.tracker.log_text(self.parent, to_markdown(board, title=f"Leaderboard · run {self.run_id}"),
                              "leaderboard.md")
        png = leaderboard_figure(board, title=f"run {self.run_id}")
        if png:
            path = os.path.join(self.run_dir, "leaderboard.png")
            ckpt.atomic_write_bytes(path, lambda fh: fh.write(png))
            self.tracker.log_artifact(self.parent, path)
        dirs = {}
        for m in dict.fromkeys(list(self.cfg.run.methods) + ([BASELINE] if self.cfg.run.baseline else [])):
            dirs[self._label(m)] = os.path.join(self._dir(m, self.seeds[0]), "features_pca.npz")
        grid = grid_from_npz(dirs, title=f"PCA of dense features, {self.cfg.run.eval_dataset()} val")
        if grid:
            path = os.path.join(self.run_dir, "features_pca.png")
            ckpt.atomic_write_bytes(path, lambda fh: fh.write(grid))
            self.tracker.log_artifact(self.parent, path)
        for table in board.tables:
            for r in table:
                v = r.metrics.get(r.primary)
                self.tracker.log_metrics(self.parent, {f"{r.method}/{r.task}/{r.primary}": v})
                if r.n > 1:
                    self.tracker.log_metrics(self.parent, {f"{r.method}/{r.task}/{r.primary}_std": r.std.get(r.primary),
                                                           f"{r.method}/{r.task}/n": r.n})
        paths = export(board, self.results_dir, self.run_id)
        self.tracker.finish(self.parent)
        self.console.print(f"[dim]leaderboard written to {', '.join(paths)}; MLflow run {self.parent} "
                           f"(experiment '{self.cfg.tracking.experiment}', {self.tracker.uri})[/dim]")


def run(cfg: BenchConfig, console=None, progress: bool = True) -> list[Row]:
    from bench.runlock import RunLock

    pipe = Pipeline(cfg, console, progress)
    with RunLock(pipe.run_dir, pipe.run_id):  # one `bench run` per run id at a time (bench.runlock)
        return pipe.run()


__all__ = ["run", "Pipeline", "TASKS", "parse_seeds", "seeds_of"]
