"""The leaderboard's data: rows, the key that makes rows comparable, aggregation over seeds, significance.

A *row* is one (method, task) result. Its key is (method, recipe, backbone, init, pretraining data; evaluation
data and its settings hash; task protocol name, version and settings hash). Rows are only ever aggregated with
rows of the same key (one per seed: the mean, the sample std and n), and a table only ever holds rows of one
evaluation dataset and one protocol per task. Rendering lives in ``bench.leaderboard``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

BASELINE = "random-init"


@dataclass
class Row:
    method: str
    task: str
    metrics: dict  # metric name -> value (percent for mIoU / accuracy / AP); the mean over seeds once aggregated
    primary: str
    dataset: str = ""  # evaluation data
    backbone: str = ""
    protocol: str = ""  # one line describing the protocol
    run: str = ""  # MLflow run id of the evaluation (the newest seed's, once aggregated)
    extra: dict = field(default_factory=dict)  # "reference": source of a published (not measured) row
    recipe: str = ""
    init: str = ""  # the --init checkpoint's name ("" = random init)
    pretrain_dataset: str = ""
    data_hash: str = ""  # evaluation data settings (bench.cache.data_settings)
    protocol_name: str = ""
    protocol_version: int = 0
    protocol_hash: str = ""
    seed: int | None = None  # one seed's row; None once aggregated
    n: int = 1  # seeds aggregated
    std: dict = field(default_factory=dict)  # metric -> sample std over seeds (n ≥ 2)
    seeds: list = field(default_factory=list)
    compute: dict = field(default_factory=dict)  # images_seen, pretrain_wall_s, device_h, device, params, peak_mem_mb
    per_image: list = field(default_factory=list)  # per seed: npz path or a callable returning one (or None)
    display: list = field(default_factory=list)  # terminal columns (default: the primary)
    higher_is_better: bool = True
    mark: dict = field(default_factory=dict)  # metric -> "best" | "≈" | ""


def is_reference(row: Row) -> bool:
    return bool(row.extra.get("reference"))


def baseline_label(init_path: str) -> str:
    """The untrained row's name: ``random-init``, or ``init:<checkpoint name>`` when the backbone starts from one."""
    if not init_path:
        return BASELINE
    import os

    return f"init:{os.path.basename(init_path)}"


def is_baseline(name: str) -> bool:
    return name == BASELINE or name.startswith("init:")


def line_key(r: Row) -> tuple:
    return (r.method, r.recipe, r.backbone, r.init, r.pretrain_dataset)


def table_key(r: Row) -> tuple:
    # rows logged before protocols had a hash: their protocol line stands in for it
    return (r.dataset, r.data_hash, r.task, r.protocol_name, r.protocol_version, r.protocol_hash or r.protocol)


def row_key(r: Row) -> tuple:
    return line_key(r) + table_key(r)


def aggregate(rows: list[Row]) -> list[Row]:
    """One row per key: the mean, sample std and n over seeds (the newest row per seed wins; input order is
    oldest first). Reference rows pass through unchanged; rows without a seed count as their own seed."""
    groups: dict[tuple, dict] = {}
    out_order: list = []
    for i, r in enumerate(rows):
        if is_reference(r):
            out_order.append(("ref", i))
            continue
        k = row_key(r)
        if k not in groups:
            groups[k] = {}
            out_order.append(("key", k))
        groups[k][r.seed if r.seed is not None else f"_{i}"] = r  # newest per seed
    out = []
    for kind, k in out_order:
        if kind == "ref":
            out.append(rows[k])
            continue
        by_seed = groups[k]
        members = [by_seed[s] for s in sorted(by_seed, key=str)]
        out.append(replace(members[0], mark={}) if len(members) == 1 and members[0].seed is None
                   else _merge(members))  # already aggregated (or a single legacy row)
    return out


def _merge(members: list[Row]) -> Row:
    first, last = members[0], members[-1]
    names: list[str] = []
    for m in members:
        names.extend(k for k in m.metrics if k not in names and isinstance(m.metrics.get(k), (int, float)))
    mean, std = {}, {}
    for name in names:
        vals = np.array([m.metrics[name] for m in members if isinstance(m.metrics.get(name), (int, float))], float)
        vals = vals[~np.isnan(vals)]
        mean[name] = float(vals.mean()) if len(vals) else math.nan
        if len(vals) >= 2:
            std[name] = float(vals.std(ddof=1))
    compute = {}
    for name in {k for m in members for k in m.compute}:
        vals = [m.compute[name] for m in members if isinstance(m.compute.get(name), (int, float))]
        if vals:
            compute[name] = float(np.mean(vals))
        else:
            compute[name] = next(m.compute[name] for m in members if name in m.compute)
    return replace(last, metrics=mean, std=std, n=len(members), seed=None,
                   seeds=[m.seed for m in members if m.seed is not None], compute=compute,
                   per_image=[m.per_image[0] if m.per_image else None for m in members],
                   display=first.display or last.display, mark={})


def tables(rows: list[Row], per_protocol: bool = True) -> list[list[Row]]:
    """Rows split into tables that are never mixed: one per (evaluation data, task protocol), or with
    ``per_protocol=False`` one per evaluation data holding every task (split further should a task appear with
    two protocols). Reference rows join the tables of their task and dataset."""
    measured = [r for r in rows if not is_reference(r)]
    refs = [r for r in rows if is_reference(r)]
    groups: dict[tuple, list[Row]] = {}
    for r in measured:
        key = table_key(r) if per_protocol else (r.dataset, r.data_hash)
        groups.setdefault(key, []).append(r)
    out = []
    for key, members in groups.items():
        protocols: dict[str, set] = {}
        for r in members:
            protocols.setdefault(r.task, set()).add(table_key(r))
        if not per_protocol and any(len(v) > 1 for v in protocols.values()):
            out.extend(tables(members, per_protocol=True))
            continue
        tasks = {r.task for r in members}
        out.append(members + [r for r in refs if r.task in tasks and r.dataset == members[0].dataset])
    return out


def mark_significance(table: list[Row], load, replicates: int = 1000) -> dict:
    """Mark each task's primary column: ``best`` for the best mean, ``≈`` for rows the paired bootstrap cannot
    tell from it (``bench.significance``). ``load(source) -> dict of arrays`` reads a per-image file. Returns
    {task: reason} for columns that could not be tested (no per-image statistics)."""
    from bench.significance import paired_bootstrap

    skipped: dict = {}
    for task in dict.fromkeys(r.task for r in table):
        rows = [r for r in table if r.task == task and not is_reference(r)]
        scored = [r for r in rows if isinstance(r.metrics.get(r.primary), (int, float))
                  and not math.isnan(r.metrics[r.primary])]
        if not scored:
            continue
        hib = scored[0].higher_is_better
        best = (max if hib else min)(scored, key=lambda r: r.metrics[r.primary])
        best.mark[best.primary] = "best"
        best_stats = _stats(best, load)
        for r in scored:
            if r is best:
                continue
            stats = _stats(r, load)
            if best_stats is None or stats is None:
                skipped[task] = "no per-image statistics"
                continue
            try:
                res = paired_bootstrap(best_stats, stats, replicates=replicates, higher_is_better=hib)
            except ValueError as exc:
                skipped[task] = str(exc)
                continue
            r.extra["bootstrap"] = res
            r.mark[r.primary] = "≈" if res["same"] else ""
    return skipped


def _stats(row: Row, load) -> list[dict] | None:
    if not row.per_image or any(s is None for s in row.per_image):
        return None
    try:
        out = [load(s) for s in row.per_image]
    except (OSError, ValueError, KeyError):
        return None
    return out if all(o for o in out) else None


def load_npz(source) -> dict | None:
    """A per-image source: a path, or a callable returning one (an MLflow artifact downloaded on demand)."""
    path = source() if callable(source) else source
    if not path:
        return None
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
