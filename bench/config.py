"""Typed configuration: dataclass defaults < YAML file (``--config``) < dotted overrides (``--set a.b=c``).

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

from bench.errors import BenchError
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
    resource_timeout_s: float = 600.0  # an autoscaling cluster may grow this long to fit the request (bench.resources)
    seed: int = 0
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
    drop_path: float = 0.0


@dataclass
class PretrainConfig:
    epochs: int = 3  # × 48 steps of batch 32 on the synthetic default: about 2 CPU minutes per method
    steps_per_epoch: int = 0  # 0: dataset size // global batch
    batch_size: int = 32  # global batch (all workers together)
    optimizer: str = "adamw"  # adamw | sgd | lars
    lr: float = 5e-4  # peak learning rate for the global batch (the loop does not rescale it)
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum: float = 0.9  # for sgd / lars
    clip_grad: float = 3.0  # 0 disables
    workers: int = 1  # Ray Train workers (processes); one GPU each with gpu=true
    cpus_per_worker: int = 0  # 0: all local CPUs for one worker, else this many
    gpu: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    checkpoint_every: int = 100  # steps
    log_every: int = 5  # steps
    loader_workers: int = 0  # DataLoader worker processes per training worker
    max_failures: int = 1  # Ray Train FailureConfig: restarts from the last checkpoint
    proxy_every: int = 0  # steps between held-out proxy scores (bench/proxy.py, ASHA's signal in `bench tune`); 0 = off
    proxy_images: int = 32  # held-out images of the pretraining dataset's val split for the proxy
    proxy_metric: str = "knn"  # knn (token k-NN mIoU) | kmeans (k-means + Hungarian mIoU)


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
    return data


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

    def as_dict(self) -> dict:
        d = to_dict(self)
        d.pop("user", None)
        return d

    def hash(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha1(blob).hexdigest()[:12]

    def pretrain_for(self, method: str) -> PretrainConfig:
        """The pretraining config of one method: defaults < the method's own defaults < user settings."""
        from bench.registry import METHODS

        cls = METHODS.get(method)
        base = to_dict(PretrainConfig())
        base.update(getattr(cls, "pretrain_defaults", {}) or {})
        base = deep_merge(base, self.user.get("pretrain", {}) or {})
        return build(PretrainConfig, base, "pretrain")


def _component_section(kind: str, registry, user_section: dict | None, wanted: list[str]) -> dict:
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
            out[name] = build(cls, user_section.get(name), f"{kind}.{name}")
    return out


def resolve(user: dict) -> BenchConfig:
    """Validate the merged user layer against every section and return the typed config."""
    from bench import plugins
    from bench.registry import DATASETS, METHODS, TASKS

    plugins.load_all()
    allowed = set(TOP_SECTIONS) | set(COMPONENT_SECTIONS)
    unknown = [k for k in user if k not in allowed]
    if unknown:
        raise BenchError(f"config: unknown section {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(allowed))}")
    top = {name: build(cls, user.get(name), name) for name, cls in TOP_SECTIONS.items()}
    run: RunSection = top["run"]
    check_config_names(run, top["tracking"])  # run ids and experiment names become paths (bench.names)
    METHODS.validate(list(run.methods), "--methods")
    TASKS.validate(list(run.tasks), "--tasks")
    for opt, name in (("--data", run.data), ("--pretrain-data", run.pretrain_data), ("--eval-data", run.eval_data)):
        if name:
            DATASETS.validate([name], opt)
    datasets = sorted({run.pretrain_dataset(), run.eval_dataset()})
    return BenchConfig(
        run=run,
        backbone=top["backbone"],
        pretrain=top["pretrain"],
        tracking=top["tracking"],
        methods=_component_section("methods", METHODS, user.get("methods"), list(run.methods)),
        tasks=_component_section("tasks", TASKS, user.get("tasks"), list(run.tasks)),
        data=_component_section("data", DATASETS, user.get("data"), datasets),
        user=user,
    )


def load_config(config_file: str | None, sets: list[str] | None, flags: dict | None = None) -> BenchConfig:
    """defaults < YAML < --set < explicit CLI flags (``flags`` is a nested dict like the YAML)."""
    user: dict = {}
    if config_file:
        user = deep_merge(user, load_yaml(config_file))
    user = deep_merge(user, parse_set(sets or []))
    if flags:
        user = deep_merge(user, flags)
    return resolve(user)
