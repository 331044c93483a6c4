"""Typed configuration: dataclass defaults < the method's recipe (``run.recipe``, ``bench.recipes``) < YAML file
(``--config``) < dotted overrides (``--set a.b=c``) < explicit CLI flags.

A recipe sets a method's own section, its ``pretrain`` and its ``backbone``, so those two are per method:
:meth:`BenchConfig.pretrain_for` and :meth:`BenchConfig.backbone_for` (``cfg.pretrain`` / ``cfg.backbone`` are the
user's settings and the first method's backbone). On a real dataset the tasks start from that dataset's published
protocol (a task class's ``dataset_defaults``). Numeric fields declare their ranges (``bench.ranges``), checked
here for every source of values.

The resolved config is plain data (nested dicts of dataclasses) so it can be logged as MLflow params,
hashed, and shipped to Ray workers. Sections:

- ``run``        what to run: methods, tasks, datasets, run id, storage path, seed
- ``backbone``   timm backbone name, input size, local init checkpoint
- ``pretrain``   the Ray Train loop: epochs, batch, optimiser, schedules, workers, GPU, checkpoints
- ``tracking``   MLflow tracking URI and experiment
- ``methods.<name>`` / ``tasks.<name>`` / ``data.<name>``: each registered component's own dataclass
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from bench import recipes as recipe_files
from bench.errors import BenchError
from bench.ranges import (Range, at_least, check_range, field_range, fraction, momentum_value, one_of,  # noqa: F401
                          positive, ranged)
from bench.names import check_config_names


@dataclass
class RunSection:
    methods: list = field(default_factory=lambda: ["dino"])
    tasks: list = field(default_factory=lambda: ["linseg"])
    data: str = "synthetic"  # dataset for pretraining and evaluation unless the two below are set
    pretrain_data: str = ""
    eval_data: str = ""
    run_id: str = ""  # same id = resume: completed pretrainings and evaluations are skipped
    storage: str = "bench_runs"  # checkpoints and per-run state; a shared path on a cluster
    address: str = ""  # Ray address; "" starts a local Ray, "auto" joins a running cluster
    recipe: str = ""  # NAME | FILE.yaml | comma list (a name + per-method files); "" = cpu on synthetic, else paper
    estimate: bool = True  # time a few steps before a `paper` run that this machine cannot finish soon
    resource_timeout_s: float = at_least(600.0, 0)  # an autoscaling cluster may grow this long to fit the request (bench.resources)
    seed: int = ranged(0, ge=0)
    seeds: list = field(default_factory=list)  # pretraining seeds (each method once per seed); empty = [seed]
    cache: bool = True  # reuse finished pretrainings / evaluations with the same key (bench.cache); false recomputes
    baseline: bool = True  # add the untrained backbone as a `random-init` row
    results_dir: str = "results"

    def pretrain_dataset(self) -> str:
        return self.pretrain_data or self.data

    def eval_dataset(self) -> str:
        return self.eval_data or self.data


@dataclass
class BackboneConfig:
    name: str = "vit_tiny_d4_p8"
    init: str = ""  # path to a local checkpoint (loaded with weights_only=True); random init otherwise
    drop_path: float = ranged(0.0, ge=0, lt=1)
    output_stride: int = at_least(0, 0)  # ResNets: 0 = native 32 (undilated layer4), 16 or 8 = dilated (timm output_stride)


@dataclass
class PretrainConfig:
    epochs: int = at_least(3, 1)  # × 48 steps of batch 32 on the synthetic default: about 2 CPU minutes per method
    steps_per_epoch: int = at_least(0, 0)  # 0: dataset size // global batch
    batch_size: int = at_least(32, 1)  # global batch (all workers together)
    optimizer: str = "adamw"  # adamw | sgd | lars | larc
    lr: float = positive(5e-4)  # peak learning rate; for the global batch unless lr_ref_batch > 0
    lr_ref_batch: int = at_least(0, 0)  # > 0: lr is per this many images, the peak is lr·batch_size/lr_ref_batch
    min_lr: float = at_least(1e-5, 0)
    min_lr_ratio: float = fraction(0.0)  # > 0: the final lr is this × the peak (overrides min_lr; CLoVE 0.01)
    warmup_epochs: float = at_least(1.0, 0)
    warmup_start_factor: float = fraction(0.0)  # warm-up starts at lr × this (CLoVE's reference: 0.01, i.e. lr/100)
    weight_decay: float = at_least(0.04, 0)
    weight_decay_end: float = at_least(0.4, 0)
    momentum: float = momentum_value(0.9)  # for sgd / lars
    clip_grad: float = at_least(3.0, 0)  # 0 disables
    workers: int = at_least(1, 1)  # Ray Train workers (processes); one GPU each with gpu=true
    cpus_per_worker: int = at_least(0, 0)  # 0: all local CPUs for one worker, else this many
    gpu: bool = False
    precision: str = one_of("auto", "fp32", "bf16")  # auto: bf16 on GPU, fp32 on CPU
    checkpoint_every: int = at_least(100, 1)  # steps
    log_every: int = at_least(5, 1)  # steps
    # DataLoader worker processes per training worker: the views of the next batch are built while the step runs
    # (+10-12% images/s for ViCE and CrOC on 2 cores, docs/speed.md); 0 builds them in the training process
    loader_workers: int = at_least(1, 0)
    max_failures: int = at_least(1, -1)  # Ray Train FailureConfig: restarts from the last checkpoint (-1: always)
    # auto: a one-worker CPU pretraining on a local Ray runs in this process, through Ray Train's local mode
    # (ScalingConfig(num_workers=0)): no worker group to start and stop, and no Ray processes beside the loop
    # (vice/clove/croc 15-19% faster on 2 cores, docs/speed.md). A failure there restarts the loop from its last
    # checkpoint as Ray Train would, while each restart gets further; a killed process is resumed with --run-id.
    # never: always a Ray Train worker group (a killed worker is then restarted without the driver noticing).
    local_mode: str = one_of("auto", "never")
    proxy_every: int = at_least(0, 0)  # steps between held-out proxy scores (bench/proxy.py, ASHA's signal in `bench tune`); 0 = off
    proxy_images: int = at_least(32, 1)  # held-out images of the pretraining dataset's val split for the proxy
    proxy_metric: str = "knn"  # knn (token k-NN mIoU) | kmeans (k-means + Hungarian mIoU)

    def resolved(self) -> "PretrainConfig":
        """The loop's view: ``lr`` the absolute peak for ``batch_size`` (linear scaling rule applied, then
        ``lr_ref_batch`` = 0) and ``min_lr`` absolute (``min_lr_ratio`` applied, then 0); idempotent."""
        out = dataclasses.replace(self)
        if out.lr_ref_batch > 0:
            out.lr = out.lr * out.batch_size / out.lr_ref_batch
            out.lr_ref_batch = 0
        if out.min_lr_ratio > 0:
            out.min_lr = out.lr * out.min_lr_ratio
            out.min_lr_ratio = 0.0
        return out


@dataclass
class TrackingConfig:
    uri: str = ""  # "" = sqlite:///<cwd>/mlruns.db with artifacts in <cwd>/mlartifacts
    experiment: str = "bench"


TOP_SECTIONS = {
    "run": RunSection,
    "backbone": BackboneConfig,
    "pretrain": PretrainConfig,
    "tracking": TrackingConfig,
}
COMPONENT_SECTIONS = ("methods", "tasks", "data")


# ----------------------------------------------------------------------------------------- typing

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted for floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            if args and args[-1] is not Ellipsis and len(args) > 1:
                if len(args) != len(value):
                    raise BenchError(f"{where}: expected {len(args)} values, got {list(value)!r}")
                value = [coerce(v, a, where) for v, a in zip(value, args)]
            elif args:
                value = [coerce(v, args[0], where) for v in value]
            return tuple(value) if (tp is tuple or origin is tuple) else list(value)
    elif origin is typing.Union:
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, where)
            except BenchError:
                continue
    else:
        return value
    raise BenchError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def build(cls: type, data: dict | None, where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    data = data or {}
    if not isinstance(data, dict):
        raise BenchError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints or key not in names:
            raise BenchError(f"{where}: unknown key '{key}'; valid: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise BenchError(f"{where}: {exc}") from None
    for f in dataclasses.fields(cls):  # ranges first: one line naming key, value and range beats a custom check
        check_range(cls, f.name, getattr(obj, f.name), f"{where}.{f.name}")
    check = getattr(obj, "validate", None)
    if callable(check):
        check(where)
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------- user input

def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise BenchError(f"--config {path}: file not found")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise BenchError(f"--config {path}: not valid YAML{at}") from None
    except UnicodeDecodeError:
        raise BenchError(f"--config {path}: not a text file (expected UTF-8 YAML)") from None
    except OSError as exc:  # unreadable: permissions, a folder, an I/O error
        raise BenchError(f"--config {path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BenchError(f"--config {path}: expected a mapping of sections (run, pretrain, methods, ...)")
    return expand_dotted(data, f"--config {path}")


def expand_dotted(data: dict, where: str) -> dict:
    """``{"pretrain.lr": 1e-3, "run": {...}}`` -> nested sections (``--print-config`` output reads back)."""
    out: dict = {}
    for key, value in data.items():
        parts = str(key).split(".")
        if any(not p for p in parts):
            raise BenchError(f"{where}: malformed key '{key}'")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise BenchError(f"{where}: '{key}' is set both as a value and as a section")
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = deep_merge(node[leaf], value)
        else:
            node[leaf] = value
    return out


def parse_set(items: list[str]) -> dict:
    """``["a.b.c=1", ...]`` -> nested dict; values are parsed as YAML scalars / lists."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise BenchError(f"--set {item}: expected key.path=value, e.g. --set pretrain.epochs=3")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not key.strip() or any(not p for p in parts):
            raise BenchError(f"--set {item}: malformed key '{key}'; expected dotted names like methods.dino.teacher_temp")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if value is None:
            value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise BenchError(f"--set {item}: '{p}' is set both as a value and as a section")
        node[parts[-1]] = value
    return out


# ------------------------------------------------------------------------------------ the config

@dataclass
class BenchConfig:
    run: RunSection
    backbone: BackboneConfig
    pretrain: PretrainConfig
    tracking: TrackingConfig
    methods: dict
    tasks: dict
    data: dict
    user: dict = field(default_factory=dict)  # the raw user layer (YAML + --set), kept for per-method merges
    recipes: dict = field(default_factory=dict)  # method -> bench.recipes.Recipe | None (its values are folded in)

    def as_dict(self) -> dict:
        d = to_dict(self)
        d.pop("user", None)
        d["recipes"] = {m: ({"name": r.label, "hash": r.hash()} if r else None) for m, r in self.recipes.items()}
        return d

    def hash(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha1(blob).hexdigest()[:12]

    def pretrain_for(self, method: str) -> PretrainConfig:
        """One method's pretraining config, :meth:`PretrainConfig.resolved` (absolute lr): defaults < the
        method's ``pretrain_defaults`` < its recipe < user settings (YAML, ``--set``, flags)."""
        return pretrain_layers(method, self.recipes.get(method), self.user)

    def backbone_for(self, method: str) -> BackboneConfig:
        """One method's backbone: defaults < its recipe < user settings."""
        return backbone_layers(self.recipes.get(method), self.user)


def _recipe_part(recipe, section: str, method: str | None = None) -> dict:
    if recipe is None:
        return {}
    nested = recipe.nested()
    return dict(nested.get("methods", {}).get(method, {})) if section == "methods" else dict(nested.get(section, {}))


def _where(recipe, section: str) -> str:
    return f"recipe {recipe.label} ({recipe.path}): {section}"


def pretrain_layers(method: str, recipe, user: dict) -> PretrainConfig:
    from bench.registry import METHODS

    base = to_dict(PretrainConfig())
    base.update(getattr(METHODS.get(method), "pretrain_defaults", {}) or {})
    if recipe is not None:
        base = deep_merge(base, _recipe_part(recipe, "pretrain"))
        build(PretrainConfig, base, _where(recipe, "pretrain"))  # a bad recipe value names the recipe file
    base = deep_merge(base, user.get("pretrain", {}) or {})
    return build(PretrainConfig, base, "pretrain").resolved()


def backbone_layers(recipe, user: dict) -> BackboneConfig:
    base = _recipe_part(recipe, "backbone")
    if recipe is not None:
        build(BackboneConfig, base, _where(recipe, "backbone"))
    return build(BackboneConfig, deep_merge(base, user.get("backbone", {}) or {}), "backbone")


def _component_section(kind: str, registry, user_section: dict | None, wanted: list[str],
                       base: dict | None = None) -> dict:
    """``base``: per-component defaults below the user's (a method's recipe, a task's dataset preset)."""
    user_section = user_section or {}
    if not isinstance(user_section, dict):
        raise BenchError(f"{kind}: expected a mapping of names to settings")
    registry.validate(list(user_section), kind)
    out = {}
    for name in registry.names():
        cls = getattr(registry.get(name), "config_class", None)
        if cls is None:
            continue
        if name in wanted or name in user_section:
            own = user_section.get(name)
            if own is not None and not isinstance(own, dict):
                raise BenchError(f"{kind}.{name}: expected a mapping, got {type(own).__name__}")
            out[name] = build(cls, deep_merge((base or {}).get(name, {}), own or {}), f"{kind}.{name}")
    return out


def is_synthetic(dataset: str) -> bool:
    """Synthetic data (no published configuration applies): a dataset class's ``synthetic`` flag, else its name."""
    from bench.registry import DATASETS

    cls = DATASETS.get(dataset) if dataset in DATASETS.names() else None
    return bool(getattr(cls, "synthetic", dataset.startswith("synthetic")))


def task_dataset_defaults(task: str, dataset: str) -> dict:
    """A task's published protocol for ``dataset`` (its class's ``dataset_defaults``), {} if none."""
    from bench.registry import TASKS

    return dict((getattr(TASKS.get(task), "dataset_defaults", {}) or {}).get(dataset, {}))


def resolve(user: dict) -> BenchConfig:
    """Validate the merged user layer against every section and return the typed config."""
    from bench.registry import DATASETS, METHODS, TASKS

    allowed = set(TOP_SECTIONS) | set(COMPONENT_SECTIONS)
    unknown = [k for k in user if k not in allowed]
    if unknown:
        raise BenchError(f"config: unknown section {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(allowed))}")
    for name in TOP_SECTIONS:
        if user.get(name) is not None and not isinstance(user.get(name), dict):
            raise BenchError(f"{name}: expected a mapping, got {type(user[name]).__name__}")
    top = {name: build(cls, user.get(name), name) for name, cls in TOP_SECTIONS.items()}
    run: RunSection = top["run"]
    check_config_names(run, top["tracking"])  # run ids and experiment names become paths (bench.names)
    METHODS.validate(list(run.methods), "--methods")
    TASKS.validate(list(run.tasks), "--tasks")
    for opt, name in (("--data", run.data), ("--pretrain-data", run.pretrain_data), ("--eval-data", run.eval_data)):
        if name:
            DATASETS.validate([name], opt)
    datasets = sorted({run.pretrain_dataset(), run.eval_dataset()})
    chosen = recipe_files.select(run.recipe, list(run.methods), is_synthetic(run.pretrain_dataset()))
    method_base = {}
    for m, rec in chosen.items():
        if rec is not None:
            part = _recipe_part(rec, "methods", m)
            build(METHODS.get(m).config_class, part, _where(rec, f"methods.{m}"))
            method_base[m] = part
    backbones = {m: backbone_layers(rec, user) for m, rec in chosen.items()}
    backbone = backbones[run.methods[0]] if run.methods else top["backbone"]  # the baseline row's (the first method's)
    task_base = {t: task_dataset_defaults(t, run.eval_dataset()) for t in run.tasks}
    cfg = BenchConfig(
        run=run,
        backbone=backbone,
        pretrain=top["pretrain"],
        tracking=top["tracking"],
        methods=_component_section("methods", METHODS, user.get("methods"), list(run.methods), method_base),
        tasks=_component_section("tasks", TASKS, user.get("tasks"), list(run.tasks), task_base),
        data=_component_section("data", DATASETS, user.get("data"), datasets),
        user=user,
        recipes=chosen,
    )
    for m in run.methods:
        cfg.pretrain_for(m)  # a bad merged pretrain section fails here, before any work
        _check_sizes(m, cfg.methods[m], backbones[m])
    return cfg


SIZE_FIELDS = ("global_size", "local_size", "view_size")


def backbone_stride(name: str) -> int:
    """Pixels per feature cell of a registered backbone (built on the meta device: no memory, no weights)."""
    import torch

    from bench.registry import BACKBONES

    BACKBONES.validate([name], "backbone.name")
    with torch.device("meta"):
        return int(BACKBONES.get(name)().stride)


def _check_sizes(method: str, mcfg, bcfg: BackboneConfig) -> None:
    """Crop sizes below one patch give no token at all: ``sizes >= patch size`` (issue 22)."""
    present = [n for n in SIZE_FIELDS if isinstance(getattr(mcfg, n, None), int)]
    if not present:
        return
    stride = backbone_stride(bcfg.name)
    for n in present:
        if getattr(mcfg, n) < stride:
            raise BenchError(f"methods.{method}.{n} = {getattr(mcfg, n)}: expected >= {stride}, the patch size "
                             f"(stride) of backbone {bcfg.name}")


def load_config(config_file: str | None, sets: list[str] | None, flags: dict | None = None) -> BenchConfig:
    """defaults < recipe (``run.recipe``) < YAML < --set < explicit CLI flags (``flags`` nested like the YAML)."""
    user: dict = {}
    if config_file:
        user = deep_merge(user, load_yaml(config_file))
    user = deep_merge(user, parse_set(sets or []))
    if flags:
        user = deep_merge(user, flags)
    return resolve(user)
