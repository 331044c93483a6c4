"""``bench run --from-tune``: the best config of finished searches, read back and merged into a run config."""

from __future__ import annotations

import copy
import os

from bench import checkpoint as ckpt
from bench.errors import BenchError
from bench.tune.constants import BEST_FILE, OBJECTIVE, STATE_FILE
from bench.tune.logger import _fmt
from bench.tune.options import search_dir

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
