"""The evaluation stages of ``bench run`` (``bench.pipeline.Pipeline`` inherits them): each cell's evaluations
as Ray tasks, all submitted at once, their cache entries, pictures and MLflow rows.

On CPUs every running evaluation gets an equal share of the largest node's CPUs: evaluations are many small ops
that scale sub-linearly with threads, so two side by side on one core each finish 1.2x sooner than one after the
other on two (docs/speed.md). On GPUs each gets one GPU; Ray queues what does not fit.
"""

from __future__ import annotations

import os
import time

from bench import checkpoint as ckpt
from bench.board import BASELINE, Row
from bench.cache import PLACEMENT_ONLY, digest, eval_key, link_or_copy
from bench.config import to_dict
from bench.errors import BenchError
from bench.evaluate import eval_spec, evaluate_method
from bench.leaderboard import row_recipe
from bench.registry import DATASETS, TASKS
from bench.runspec import _data_settings, _largest_node_cpus, _root_cause


class EvaluationStages:
    """Mixin of ``Pipeline``: uses its ``cfg``, ``seeds``, ``cache``, ``tracker``, ``ledger``, ``console``,
    ``timings``, ``reused``, ``run_id``, ``parent``, ``baseline`` and ``n_pretrain``, and its ``_cfg``, ``_dir``,
    ``_ray``, ``_tags``, ``_record``, ``_ledger_key`` and ``_backbone_key``."""

    def _eval_model(self, method: str, final: str | None, spec: dict) -> dict:
        """What an evaluation's number depends on besides the task: the checkpoint (or the baseline's init)."""
        if final is None:
            return {"baseline": True, "backbone": self._backbone_key(), "seed": spec["seed"]}
        return {"checkpoint": self.cache.checkpoint_hash(final), "method": method, "method_cfg": spec["method_cfg"],
                "pretrain": {k: v for k, v in spec["pretrain"].items() if k not in PLACEMENT_ONLY},
                "backbone": self._backbone_key()}

    def evaluate(self, method: str, seed: int | None = None) -> list[Row]:
        """One method's (or the baseline's) evaluations at one seed (default: the first)."""
        return self.evaluate_all([(method, self.seeds[0] if seed is None else seed)])

    def evaluate_all(self, cells: list[tuple[str, int]]) -> list[Row]:
        """Every cell's evaluations at once, as Ray tasks: on CPUs each gets an equal share of the largest node
        (two evaluations on one core each do 1.2x the work of one after the other on two, docs/speed.md), on
        GPUs one GPU each; Ray queues what does not fit. Rows come back in ``cells`` order."""
        states = [self._eval_prepare(m, s) for m, s in cells]
        running = [st for st in states if st["pending"]]
        if running:
            ray = self._ray()
            use_gpu = self.cfg.pretrain.gpu
            node = _largest_node_cpus()
            cpus = 1 if use_gpu else max(1, node // min(len(running), node))
            remote = ray.remote(num_cpus=cpus, num_gpus=1 if use_gpu else 0)(evaluate_method)
            for st in running:
                st["ref"] = remote.remote(st["method"], st["final"], st["pending"], st["spec"], st["out_dir"], use_gpu,
                                          cpus)
                st["t0"] = time.perf_counter()
        rows: list[Row] = []
        with self.console.status(f"  evaluating {', '.join(dict.fromkeys(self._label(st['method']) for st in running))}"
                                 if running else ""):
            for st in states:
                rows.extend(self._eval_collect(st))
        return rows

    def _eval_prepare(self, method: str, seed: int) -> dict:
        """Keys, protocol records and cache hits of one cell; ``pending``: the tasks still to compute."""
        from bench.config import build as build_cfg
        from bench.evaluate import protocol_record

        c = self._cfg(seed)
        out_dir = self._dir(method, seed)
        final = None if method == BASELINE else os.path.join(out_dir, "final.pt")
        spec = eval_spec(c, None if method == BASELINE else method, self.n_pretrain)
        model = self._eval_model(method, final, spec)
        keys = {}
        for task in c.run.tasks:
            cls = TASKS.get(task)
            record = protocol_record(cls(build_cfg(cls.config_class, spec["tasks"].get(task, {}), f"tasks.{task}")), task)
            keys[task] = eval_key(model, task, {k: record[k] for k in ("protocol_name", "protocol_version",
                                                                       "protocol_hash")},
                                  spec["eval_dataset"], spec["eval_dataset_cfg"])
        pending = []
        for task in c.run.tasks:
            if os.path.exists(os.path.join(out_dir, f"eval_{task}.json")):
                continue
            hit = self.cache.lookup_eval(keys[task])
            if hit:
                self.cache.restore_eval(hit, out_dir, task)
                for name in ("features_pca.png", "features_pca.npz"):  # the same model's picture
                    src = os.path.join(os.path.dirname(hit["result"]), name)
                    if os.path.exists(src) and not os.path.exists(os.path.join(out_dir, name)):
                        link_or_copy(src, os.path.join(out_dir, name))
                self.reused["eval"] += 1
                self.console.print(f"  {self._label(method)}{'' if len(self.seeds) == 1 else f' seed {seed}'}: "
                                   f"{task} reused from run {hit.get('run_id')} (same checkpoint, protocol, data, code)")
            else:
                pending.append(task)
        return {"method": method, "seed": seed, "out_dir": out_dir, "final": final, "spec": spec, "keys": keys,
                "pending": pending}

    def _eval_collect(self, st: dict) -> list[Row]:
        """Wait for one cell's evaluation task, store it in the cache, draw its picture, log its rows."""
        method, seed, out_dir = st["method"], st["seed"], st["out_dir"]
        t0 = time.perf_counter()
        if st["pending"]:
            import ray

            try:
                ray.get(st["ref"])
            except Exception as exc:
                raise BenchError(f"evaluation of '{self._label(method)}' failed: {_root_cause(exc)}") from None
            t0 = st["t0"]
            for task in st["pending"]:
                self.cache.store_eval(st["keys"][task], os.path.join(out_dir, f"eval_{task}.json"),
                                      {"run_id": self.run_id, "key": st["keys"][task], "method": method, "seed": seed})
        self._feature_figure(method, st["final"], out_dir, st["spec"])
        self.timings.add(f"eval_{method}", time.perf_counter() - t0)
        compute = self._row_compute(method, out_dir)
        return [self._log_eval(method, seed, task, out_dir, st["keys"][task], compute) for task in self._cfg(seed).run.tasks]

    def _label(self, method: str) -> str:
        return self.baseline if method == BASELINE else method

    def _row_compute(self, method: str, out_dir: str) -> dict:
        path = os.path.join(out_dir, "pretrain_summary.json")
        if method == BASELINE or not os.path.exists(path):
            return {"images_seen": 0, "pretrain_wall_s": 0.0, "device_h": 0.0}
        s = ckpt.load_json(path)
        out = {k: s[k] for k in ("images_seen", "pretrain_wall_s", "device_h", "peak_mem_mb") if k in s}
        out["device"] = s.get("device", "")
        return out

    def _log_eval(self, method: str, seed: int, task: str, out_dir: str, key: str, compute: dict) -> Row:
        c = self._cfg(seed)
        res = ckpt.load_json(os.path.join(out_dir, f"eval_{task}.json"))
        if res.get("params"):
            compute = {**compute, "params": res["params"]}
        label = self._label(method)
        data_hash = digest(_data_settings(c.data[c.run.eval_dataset()]))
        per_image = os.path.join(out_dir, res["per_image_file"]) if res.get("per_image_file") else None
        cached = res.get("cached_from") or {}
        row = Row(method=label, task=task, metrics=res["metrics"], primary=res["primary"],
                  dataset=c.run.eval_dataset(), backbone=c.backbone.name, protocol=res["protocol"],
                  recipe=getattr(c.run, "recipe", ""), init=os.path.basename(c.backbone.init) if c.backbone.init else "",
                  pretrain_dataset="" if method == BASELINE else c.run.pretrain_dataset(), data_hash=data_hash,
                  protocol_name=res.get("protocol_name", task), protocol_version=int(res.get("protocol_version", 1)),
                  protocol_hash=res.get("protocol_hash", ""), seed=seed, compute=compute,
                  per_image=[per_image] if per_image else [], display=list(res.get("display_metrics") or []),
                  higher_is_better=bool(res.get("higher_is_better", True)))
        tags = self._tags("eval", seed, method=label, task=task, primary=res["primary"], protocol=res["protocol"],
                          protocol_name=row.protocol_name, protocol_version=row.protocol_version,
                          protocol_hash=row.protocol_hash, data_hash=data_hash, cache_key=key,
                          cache="hit" if cached else "miss", cached_from=cached.get("run_id"),
                          baseline="1" if method == BASELINE else None)
        tags["pretrain_dataset"] = row.pretrain_dataset
        row.recipe, row.backbone = row_recipe(tags), tags["backbone"]
        tags.update({"bench.display": ",".join(row.display), "bench.higher_is_better": "1" if row.higher_is_better
                     else "0", "bench.device": compute.get("device", "")})
        if per_image:
            tags["bench.per_image"] = f"per_image/{os.path.basename(per_image)}"
        rid, done = self.ledger.stage(self._ledger_key("eval", method, task, seed=seed),
                                      f"eval-{label}-{task}" + ("" if len(self.seeds) == 1 else f"-s{seed}"),
                                      tags, self.parent)
        row.run = rid or ""
        if done or rid is None:
            return row
        t = self.tracker
        t.log_params(rid, {"task": to_dict(c.tasks[task])})
        t.log_metrics(rid, {f"{task}/{k}": v for k, v in res["metrics"].items() if isinstance(v, (int, float))})
        # underscore alias of the primary metric: MLflow search without backticks (metrics.linseg_miou > 30)
        t.log_metrics(rid, {f"{task}_{res['primary']}": res["metrics"].get(res["primary"])})
        t.log_metrics(rid, {f"compute/{k}": v for k, v in compute.items() if isinstance(v, (int, float))})
        t.log_dict(rid, self._record(seed), "config.json")
        t.log_dict(rid, {k: tags[k] for k in ("recipe", "recipe_hash", "recipe_changes")}, "recipe.json")
        t.log_dict(rid, {"protocol_name": row.protocol_name, "protocol_version": row.protocol_version,
                         "protocol_hash": row.protocol_hash, "settings": res.get("protocol_settings", {})},
                   "protocol.json")
        if res.get("per_class"):
            names = res.get("class_names") or DATASETS.get(c.run.eval_dataset()).class_names
            t.log_dict(rid, {"class_names": list(names), **res["per_class"]}, f"{task}_per_class.json")
        if per_image:
            t.log_artifact(rid, per_image, "per_image")
        for fpath in res.get("figures", {}).values():
            if os.path.exists(fpath):
                t.log_artifact(rid, fpath, "figures")
        if os.path.exists(os.path.join(out_dir, "features_pca.png")):
            t.log_artifact(rid, os.path.join(out_dir, "features_pca.png"), "figures")
        t.finish(rid)
        return row

    def _feature_figure(self, method: str, final: str | None, out_dir: str, spec: dict) -> None:
        """PCA-to-RGB picture of the method's dense features (bench.figures), drawn where evaluations run."""
        if os.path.exists(os.path.join(out_dir, "features_pca.png")):
            return
        ray = self._ray()
        from bench.figures import method_feature_figure

        use_gpu = self.cfg.pretrain.gpu
        remote = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(method_feature_figure)
        try:
            ray.get(remote.remote(method, final, spec, out_dir, use_gpu))
        except Exception as exc:  # a picture is not worth failing a benchmark for: say so and go on
            self.console.print(f"  [yellow]{method}: feature picture skipped ({_root_cause(exc)})[/yellow]")

