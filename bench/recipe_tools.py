"""What a run's recipes mean: differences from ``paper``, the record on every MLflow run, the views behind
``bench recipe show|diff|list`` and ``--print-config``, the initial-weights rule and the duration estimate.

Comparisons use resolved values (``PretrainConfig.resolved``: the peak lr for the batch, the absolute final lr)
and leave out the machine's settings (``bench.recipes.MACHINE_KEYS``: workers, GPUs, loaders, checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import time

import yaml

from bench import recipes
from bench.config import (BenchConfig, backbone_layers, build, deep_merge, is_synthetic, pretrain_layers,
                          to_dict)
from bench.errors import BenchError


# ------------------------------------------------------------------------------------- resolved values

def _flat(method: str, mcfg, pcfg, bcfg, machine: bool = False) -> dict:
    out = {f"methods.{method}.{k}": v for k, v in to_dict(mcfg).items()}
    out.update({f"pretrain.{k}": v for k, v in to_dict(pcfg).items()})
    out.update({f"backbone.{k}": v for k, v in to_dict(bcfg).items()})
    return out if machine else {k: v for k, v in out.items() if k not in recipes.MACHINE_KEYS}


def recipe_values(method: str, recipe, user: dict | None = None) -> dict:
    """Flat resolved values of ``method`` under ``recipe`` (None: defaults) and an optional user layer."""
    from bench import plugins
    from bench.registry import METHODS

    plugins.load_all()
    user = user or {}
    part = recipe.nested().get("methods", {}).get(method, {}) if recipe else {}
    own = (user.get("methods") or {}).get(method) or {}
    mcfg = build(METHODS.get(method).config_class, deep_merge(part, own), f"methods.{method}")
    return _flat(method, mcfg, pretrain_layers(method, recipe, user), backbone_layers(recipe, user))


def effective_values(cfg: BenchConfig, method: str, machine: bool = False) -> dict:
    return _flat(method, cfg.methods[method], cfg.pretrain_for(method), cfg.backbone_for(method), machine)


def paper_recipe(method: str):
    return recipes.builtin(method).get("paper")


def differences(cfg: BenchConfig, method: str) -> list[dict]:
    """``[{key, value, paper}]``: every resolved value of ``method`` in this run that is not the paper's."""
    paper = paper_recipe(method)
    if paper is None:
        return []
    ref = recipe_values(method, paper)
    mine = effective_values(cfg, method)
    return [{"key": k, "value": mine[k], "paper": ref.get(k)} for k in mine if mine[k] != ref.get(k)]


def record(cfg: BenchConfig, method: str) -> dict:
    """``{"recipe", "recipe_hash", "differs_from_paper": [...]}`` of one method in this run."""
    rec = cfg.recipes.get(method)
    return {"recipe": rec.label if rec else "defaults", "recipe_hash": rec.hash() if rec else "",
            "differs_from_paper": differences(cfg, method)}


def run_record(cfg: BenchConfig) -> dict:
    """The whole run's record (the parent MLflow run): one recipe name when all methods share it."""
    per = {m: record(cfg, m) for m in cfg.run.methods}
    names = sorted({r["recipe"] for r in per.values()})
    blob = json.dumps({m: r["recipe_hash"] for m, r in per.items()}, sort_keys=True).encode()
    return {"recipe": names[0] if len(names) == 1 else ",".join(f"{m}={r['recipe']}" for m, r in per.items()),
            "recipe_hash": hashlib.sha1(blob).hexdigest()[:12], "methods": per}


def tags(cfg: BenchConfig, method: str | None = None) -> dict:
    """MLflow tags ``recipe``, ``recipe_hash`` and ``recipe_changes`` (values differing from paper)."""
    if method and method in cfg.recipes:
        r = record(cfg, method)
        return {"recipe": r["recipe"], "recipe_hash": r["recipe_hash"],
                "recipe_changes": str(len(r["differs_from_paper"]))}
    r = run_record(cfg)
    return {"recipe": r["recipe"], "recipe_hash": r["recipe_hash"],
            "recipe_changes": str(sum(len(v["differs_from_paper"]) for v in r["methods"].values()))}


def warning_line(cfg: BenchConfig) -> str:
    """On real data, one line naming how many values differ from ``paper`` per method ("" when none do)."""
    if is_synthetic(cfg.run.pretrain_dataset()) and is_synthetic(cfg.run.eval_dataset()):
        return ""
    parts = []
    for m in cfg.run.methods:
        r = record(cfg, m)
        if r["differs_from_paper"]:
            parts.append(f"{m} ({r['recipe']}) {len(r['differs_from_paper'])}")
    if not parts:
        return ""
    first = cfg.run.methods[0]
    rec = cfg.recipes.get(first)
    return (f"warning: real data ({cfg.run.pretrain_dataset()} → {cfg.run.eval_dataset()}) with values that differ "
            f"from the published recipe: {', '.join(parts)}; these rows are not comparable with published numbers "
            f"(see `python -m bench recipe diff {first} paper {rec.name if rec else 'cpu'}`)")


def require_init(cfg: BenchConfig) -> None:
    """A recipe that starts from published weights needs ``--init``; nothing is downloaded."""
    for m in cfg.run.methods:
        rec = cfg.recipes.get(m)
        if rec is not None and rec.init and not cfg.backbone_for(m).init:
            raise BenchError(f"--init: recipe {rec.label} of {m} starts from {rec.init['weights']}, published at "
                             f"{rec.init['published']}; download them and pass --init FILE (or --recipe cpu)")


# ------------------------------------------------------------------------------------------- views

def _yaml_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def print_config(cfg: BenchConfig) -> str:
    """The fully resolved configuration as YAML keyed like ``--set`` paths (one document per method when their
    pretrain/backbone sections differ; a single-method document can be passed back with ``--config``)."""
    common = {}
    for section in ("run", "tracking"):
        common.update({f"{section}.{k}": v for k, v in to_dict(getattr(cfg, section)).items()})
    for kind in ("tasks", "data"):
        for name, obj in getattr(cfg, kind).items():
            common.update({f"{kind}.{name}.{k}": v for k, v in to_dict(obj).items()})
    docs = []
    lines = [f"{k}: {_yaml_value(v)}" for k, v in common.items()]
    for m in cfg.run.methods:
        rec = cfg.recipes.get(m)
        head = f"# {m}: recipe {rec.label} (version {rec.version}, hash {rec.hash()})" if rec else f"# {m}: defaults"
        body = [head] + [f"{k}: {_yaml_value(v)}" for k, v in effective_values(cfg, m, machine=True).items()]
        if len(cfg.run.methods) == 1:
            lines += body
        else:
            docs.append("\n".join(body))
    return "\n---\n".join(["\n".join(lines)] + docs) + "\n"


def _get(method: str, name: str):
    found = recipes.builtin(method)
    if recipes.is_file_ref(name):
        rec = recipes.from_file(name)
        if rec.method != method:
            raise BenchError(f"--recipe {name}: is a recipe for '{rec.method}', not '{method}'")
        return rec
    if name not in found:
        raise BenchError(f"recipe '{name}' of {method}: not found; valid: {', '.join(found) or 'none'}")
    return found[name]


def _source(rec, key: str) -> str:
    src = rec.sources.get(key, "") if rec else ""
    if rec and key == "pretrain.lr" and rec.values.get("pretrain.lr_ref_batch"):
        src = (f"{rec.values['pretrain.lr']:g} per {rec.values['pretrain.lr_ref_batch']} images × batch "
               f"{rec.values.get('pretrain.batch_size', '?')}; " + src)
    if rec and key == "pretrain.min_lr" and rec.values.get("pretrain.min_lr_ratio"):
        src = f"{rec.values['pretrain.min_lr_ratio']:g} × the peak lr; " + rec.sources.get("pretrain.min_lr_ratio", "")
    return src or ("harness default" if rec else "")


def show(method: str, name: str) -> str:
    rec = _get(method, name)
    vals = recipe_values(method, rec)
    out = [f"{method} recipe {rec.label} (version {rec.version}, hash {rec.hash()}): {rec.about}",
           f"  data: {rec.data or '-'} · authors' GPUs: {rec.gpus or '-'} · initial weights: "
           + (f"{rec.init['weights']} ({rec.init['published']})" if rec.init else "random")]
    for k, v in vals.items():
        src = _source(rec, k) if k in rec.values or k in ("pretrain.lr", "pretrain.min_lr") else "harness default"
        out.append(f"  {k} = {_yaml_value(v)}    [{src}]")
    for p in rec.pending:
        out.append(f"  pending {p['key']} = {_yaml_value(p['value'])}    [{p['source']}; {p['why']}]")
    return "\n".join(out)


def diff(method: str, a: str, b: str) -> str:
    ra, rb = _get(method, a), _get(method, b)
    va, vb = recipe_values(method, ra), recipe_values(method, rb)
    keys = [k for k in va if va[k] != vb.get(k)]
    out = [f"{method}: {len(keys)} of {len(va)} values differ between {ra.label} and {rb.label} "
           "(resolved: peak lr for the batch, machine settings left out)"]
    for k in keys:
        out.append(f"  {k}: {_yaml_value(va[k])} → {_yaml_value(vb.get(k))}")
        out.append(f"      {ra.label}: {_source(ra, k)}")
        out.append(f"      {rb.label}: {_source(rb, k)}")
    return "\n".join(out)


def list_all() -> str:
    from bench import plugins
    from bench.registry import METHODS

    plugins.load_all()
    out = []
    for m in METHODS.names():
        found = recipes.builtin(m)
        if not found:
            out.append(f"{m}: no recipe file (its defaults apply)")
        for name, rec in found.items():
            out.append(f"{m:8s} {name:10s} v{rec.version} {rec.hash()}  {rec.about}")
    return "\n".join(out)


# --------------------------------------------------------------------------------- duration estimate

def needs_estimate(cfg: BenchConfig, method: str) -> bool:
    """A ``paper`` run this machine cannot finish soon: on CPU, or with under half the authors' GPUs."""
    rec = cfg.recipes.get(method)
    if rec is None or rec.name != "paper" or not cfg.run.estimate:
        return False
    pcfg = cfg.pretrain_for(method)
    return not pcfg.gpu or pcfg.workers * 2 < rec.gpus


def estimate_seconds(cfg: BenchConfig, method: str, steps: int = 1, images: int = 2) -> dict:
    """Time ``steps`` real training steps of the resolved config on ``images`` images in this process (one
    warm-up step first) and extrapolate to the whole pretraining: seconds per image × images to see / workers."""
    import torch

    from bench.data import build_dataset
    from bench.data.views import PretrainViews, build_view_transform, collate_views
    from bench.optim import build_optimizer
    from bench.pretrain import build_method, plan_schedule

    pcfg = cfg.pretrain_for(method)
    name = cfg.run.pretrain_dataset()
    data = build_dataset(name, cfg.data[name], "train")
    schedule = plan_schedule(pcfg, len(data), pcfg.workers)
    device = torch.device("cuda" if pcfg.gpu and torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=[]):
        m = build_method(method, to_dict(cfg.methods[method]), cfg.backbone_for(method), schedule).to(device)
        views = PretrainViews(data, build_view_transform(m.view_spec()))
        batch = collate_views([views[i % len(data)] for i in range(images)])
        from bench.pretrain import _to_device

        batch = _to_device(batch, device)
        opt = build_optimizer(m.param_groups(), pcfg)
        m.train()
        times = []
        for i in range(steps + 1):
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = m(batch, i)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            m.after_step(i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    per_image = sum(times[1:]) / max(len(times) - 1, 1) / images
    total_images = schedule.total_steps * pcfg.batch_size
    return {"seconds_per_image": per_image, "total_images": total_images,
            "seconds": per_image * total_images / max(pcfg.workers, 1), "device": device.type}


def _human(seconds: float) -> str:
    for unit, n in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f} {unit}"
    return f"{seconds:.0f} s"


def estimate_line(cfg: BenchConfig, method: str) -> str:
    rec = cfg.recipes[method]
    pcfg = cfg.pretrain_for(method)
    try:
        est = estimate_seconds(cfg, method)
    except BenchError as exc:
        return f"note: {method} recipe paper: no duration estimate ({exc})"
    return (f"note: {method} recipe paper ({rec.about}) is {pcfg.epochs} epochs × batch {pcfg.batch_size}: "
            f"{est['total_images']:,} images at {est['seconds_per_image']:.2f} s/image on this machine "
            f"({est['device']}, {pcfg.workers} worker{'s' if pcfg.workers > 1 else ''}; the authors used "
            f"{rec.gpus} GPUs) ≈ {_human(est['seconds'])}; for a quick look use --recipe cpu")


__all__ = ["differences", "record", "run_record", "tags", "warning_line", "require_init", "print_config", "show",
           "diff", "list_all", "needs_estimate", "estimate_seconds", "estimate_line", "recipe_values",
           "effective_values"]
