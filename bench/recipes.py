"""Recipes: a method's published configuration (``paper``), the CPU scale (``cpu``) and named variants, as data.

One YAML file per method, ``methods/recipes/<method>.yaml`` (shipped as package data), or a user file in the same
format (``--recipe my.yaml``)::

    method: dino
    format: 1
    recipes:
      paper:
        version: 1
        about: one line: what this configuration is and which published number it stands behind
        data: the pretraining images of that number (text; --pretrain-data selects them)
        gpus: 16                      # the hardware the authors trained on (for the duration estimate)
        init: {weights: ..., published: URL}      # or null: random init
        values:                       # keyed exactly like --set paths
          methods.dino.out_dim: {value: 65536, source: "main_dino.py --out_dim; methods.md §0.2"}
          pretrain.lr: {value: 0.0005, source: ...}
        pending:                      # values the method cannot take yet (no such field): listed, not applied
          - {key: methods.dino.x, value: ..., source: ..., why: ...}
      vanilla:
        extends: paper                # the parent's values, then these
        values: {...}

Only the method's own section, ``pretrain`` and ``backbone`` may be set, and not the machine's settings (workers,
GPUs, loaders, checkpoints, precision) nor ``backbone.init`` (a recipe names its initial weights in ``init``).
Types and ranges are checked when the config is resolved (``bench.config``), with the recipe file named.
This module reads files only; it never imports the config, so the config can import it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field

import yaml

from bench.errors import BenchError

FORMAT = 1
BUILTIN = ("paper", "cpu")
# settings of the machine or the run, never of a recipe (and left out of every comparison with `paper`)
MACHINE_KEYS = frozenset({
    "pretrain.workers", "pretrain.cpus_per_worker", "pretrain.gpu", "pretrain.precision", "pretrain.loader_workers",
    "pretrain.max_failures", "pretrain.local_mode", "pretrain.checkpoint_every", "pretrain.log_every", "pretrain.proxy_every",
    "pretrain.proxy_images", "pretrain.proxy_metric", "backbone.init",
})
_RECIPE_KEYS = {"version", "about", "data", "gpus", "init", "values", "pending", "extends"}


def recipe_dir() -> str:
    """``methods/recipes`` of the installed ``methods`` package (found without importing it)."""
    spec = importlib.util.find_spec("methods")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("the 'methods' package is not importable; its recipes cannot be found")
    return os.path.join(list(spec.submodule_search_locations)[0], "recipes")


def builtin_path(method: str) -> str:
    return os.path.join(recipe_dir(), f"{method}.yaml")


@dataclass
class Recipe:
    method: str
    name: str
    values: dict  # flat key (methods.<m>.x, pretrain.x, backbone.x) -> value
    sources: dict = field(default_factory=dict)  # flat key -> where the value comes from
    version: str = "1"
    about: str = ""
    data: str = ""
    gpus: int = 0
    init: dict | None = None  # {"weights": ..., "published": ...}
    pending: list = field(default_factory=list)
    path: str = ""

    @property
    def builtin(self) -> bool:
        return os.path.abspath(self.path) == os.path.abspath(builtin_path(self.method))

    @property
    def label(self) -> str:
        """The name recorded on runs: ``paper`` / ``cpu`` / a variant; a user file's ``<file stem>:<name>``."""
        if self.builtin:
            return self.name
        return f"{os.path.splitext(os.path.basename(self.path))[0]}:{self.name}"

    def nested(self) -> dict:
        """``{"methods": {m: {...}}, "pretrain": {...}, "backbone": {...}}`` for the config layers."""
        out: dict = {}
        for key, value in self.values.items():
            node = out
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = list(value) if isinstance(value, tuple) else value
        return out

    def hash(self) -> str:
        blob = json.dumps({"method": self.method, "name": self.name, "version": self.version,
                           "values": self.values}, sort_keys=True, default=str).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def _read(path: str, option: str) -> dict:
    if not os.path.isfile(path):
        raise BenchError(f"{option} {path}: file not found")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise BenchError(f"{option} {path}: not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    if not isinstance(data, dict) or not isinstance(data.get("recipes"), dict) or not data["recipes"]:
        raise BenchError(f"{option} {path}: expected a mapping with 'method' and a non-empty 'recipes' mapping")
    if not isinstance(data.get("method"), str) or not data["method"]:
        raise BenchError(f"{option} {path}: 'method' must name the method the recipes are for")
    if data.get("format", FORMAT) != FORMAT:
        raise BenchError(f"{option} {path}: format {data.get('format')!r} is not supported (expected {FORMAT})")
    unknown = sorted(set(data) - {"method", "format", "recipes"})
    if unknown:
        raise BenchError(f"{option} {path}: unknown top-level key(s) {', '.join(unknown)}; valid: method, format, "
                         "recipes")
    return data


def _check_key(key, method: str, where: str) -> str:
    if not isinstance(key, str) or key.count(".") < 1:
        raise BenchError(f"{where}: key {key!r} is not a dotted path like methods.{method}.x or pretrain.lr")
    if key in MACHINE_KEYS:
        raise BenchError(f"{where}: '{key}' is a setting of the machine or the run, not of a recipe")
    head = key.split(".")
    if head[0] == "methods":
        if len(head) != 3 or head[1] != method:
            raise BenchError(f"{where}: '{key}': a {method} recipe sets only methods.{method}.<field>, "
                             "pretrain.<field> and backbone.<field>")
    elif head[0] not in ("pretrain", "backbone") or len(head) != 2:
        raise BenchError(f"{where}: '{key}': only methods.{method}.<field>, pretrain.<field> and backbone.<field> "
                         "can be set by a recipe")
    return key


def _entries(raw, method: str, where: str, need_source: bool) -> tuple[dict, dict]:
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise BenchError(f"{where}.values: expected a mapping of dotted keys to {{value, source}}")
    values, sources = {}, {}
    for key, item in raw.items():
        _check_key(key, method, f"{where}.values")
        if isinstance(item, dict):
            extra = sorted(set(item) - {"value", "source"})
            if "value" not in item or extra:
                raise BenchError(f"{where}.values.{key}: expected {{value: ..., source: ...}}"
                                 + (f", got key(s) {', '.join(extra)}" if extra else ""))
            value, source = item["value"], item.get("source", "")
        else:
            value, source = item, ""
        if need_source and not (isinstance(source, str) and source.strip()):
            raise BenchError(f"{where}.values.{key}: every built-in value needs its source")
        values[key] = value
        sources[key] = str(source or "")
    return values, sources


def _pending(raw, method: str, where: str) -> list:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BenchError(f"{where}.pending: expected a list of {{key, value, source, why}}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not {"key", "value", "why"} <= set(item):
            raise BenchError(f"{where}.pending[{i}]: expected {{key, value, source, why}}")
        out.append({"key": str(item["key"]), "value": item["value"], "source": str(item.get("source", "")),
                    "why": str(item["why"])})
    return out


def parse_file(path: str, option: str = "--recipe") -> dict[str, Recipe]:
    """All recipes of one file, ``extends`` resolved, in file order."""
    data = _read(path, option)
    method = data["method"]
    builtin = os.path.abspath(path) == os.path.abspath(builtin_path(method))
    raw_all = data["recipes"]
    out: dict[str, Recipe] = {}

    def make(name: str, chain: tuple) -> Recipe:
        if name in out:
            return out[name]
        where = f"{option} {path}: recipes.{name}"
        raw = raw_all.get(name)
        if not isinstance(raw, dict):
            raise BenchError(f"{where}: expected a mapping ({', '.join(sorted(_RECIPE_KEYS))})")
        unknown = sorted(set(raw) - _RECIPE_KEYS)
        if unknown:
            raise BenchError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(_RECIPE_KEYS))}")
        values, sources = _entries(raw.get("values"), method, where, builtin)
        pending = _pending(raw.get("pending"), method, where)
        base = Recipe(method, name, {})
        parent = raw.get("extends")
        if parent is not None:
            if parent in chain or parent not in raw_all:
                raise BenchError(f"{where}.extends: '{parent}' is " + ("a cycle" if parent in chain else
                                 f"not a recipe of this file; valid: {', '.join(raw_all)}"))
            base = make(parent, chain + (name,))
        gpus = raw.get("gpus", base.gpus)
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise BenchError(f"{where}.gpus: expected a number of GPUs >= 0, got {gpus!r}")
        init = raw.get("init", base.init)
        if init is not None and (not isinstance(init, dict) or not {"weights", "published"} <= set(init)):
            raise BenchError(f"{where}.init: expected null or {{weights: ..., published: ...}}")
        rec = Recipe(method=method, name=name, values={**base.values, **values}, sources={**base.sources, **sources},
                     version=str(raw.get("version", base.version)), about=str(raw.get("about", base.about) or ""),
                     data=str(raw.get("data", base.data) or ""), gpus=gpus, init=init,
                     pending=pending if "pending" in raw else list(base.pending), path=path)
        out[name] = rec
        return rec

    for name in raw_all:
        make(name, ())
    return {name: out[name] for name in raw_all}


def builtin(method: str) -> dict[str, Recipe]:
    """The built-in recipes of ``method`` ({} for a method without a recipe file, e.g. a plugin)."""
    path = builtin_path(method)
    return parse_file(path, "recipe file") if os.path.isfile(path) else {}


def is_file_ref(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml")) or os.sep in entry or ":" in entry and entry.split(":")[0].endswith(
        (".yaml", ".yml"))


def from_file(entry: str) -> Recipe:
    """``my.yaml`` (its only recipe, or its ``paper``) or ``my.yaml:name``."""
    path, _, name = entry.partition(":") if ":" in entry and not os.path.exists(entry) else (entry, "", "")
    found = parse_file(path)
    if not name:
        if len(found) == 1:
            return next(iter(found.values()))
        raise BenchError(f"--recipe {path}: holds several recipes ({', '.join(found)}); pick one as {path}:NAME")
    if name not in found:
        raise BenchError(f"--recipe {entry}: no recipe '{name}' in {path}; valid: {', '.join(found)}")
    return found[name]


def default_name(synthetic: bool) -> str:
    return "cpu" if synthetic else "paper"


def select(spec: str, methods: list[str], synthetic: bool) -> dict[str, Recipe | None]:
    """``run.recipe`` -> the recipe of each method (None: a method without recipes, its defaults apply).

    ``spec``: "" (cpu on synthetic data, paper otherwise), a name (every method's built-in recipe of that name),
    a file (for the method it names), or a comma list of files and at most one name (for the other methods)."""
    entries = [e.strip() for e in (spec or "").split(",") if e.strip()]
    files = [from_file(e) for e in entries if is_file_ref(e)]
    names = [e for e in entries if not is_file_ref(e)]
    if len(names) > 1:
        raise BenchError(f"--recipe {spec}: at most one recipe name (the others must be files), got {', '.join(names)}")
    by_file: dict[str, Recipe] = {}
    for rec in files:
        if rec.method in by_file:
            raise BenchError(f"--recipe {spec}: two files give recipes for '{rec.method}'")
        if rec.method not in methods:
            raise BenchError(f"--recipe {rec.path}: is a recipe for '{rec.method}', which is not in --methods "
                             f"({', '.join(methods)})")
        by_file[rec.method] = rec
    name = names[0] if names else ""
    out: dict[str, Recipe | None] = {}
    for m in methods:
        if m in by_file:
            out[m] = by_file[m]
            continue
        known = builtin(m)
        wanted = name or default_name(synthetic)
        if wanted in known:
            out[m] = known[wanted]
        elif not known and not name:
            out[m] = None
        else:
            valid = ", ".join(known) if known else "none (no methods/recipes file)"
            raise BenchError(f"--recipe {wanted}: method '{m}' has no such recipe; valid: {valid}")
    return out


__all__ = ["Recipe", "BUILTIN", "MACHINE_KEYS", "builtin", "builtin_path", "default_name", "from_file",
           "parse_file", "recipe_dir", "select"]
