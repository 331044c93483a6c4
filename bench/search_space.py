"""The search space of ``bench tune``: the method's ``search_space()``, narrowed or replaced by ``--space``.

``--space`` takes ``KEY=EXPR`` (repeatable) or a YAML file. KEY names one hyperparameter:

- ``<method>.<field>`` (or ``methods.<method>.<field>``, or the bare ``<field>``): a field of the method's config
  dataclass, e.g. ``croc.lambda_pos``;
- ``pretrain.<field>`` for the optimisation settings in :data:`PRETRAIN_KEYS` (``pretrain.lr``, ...).

EXPR is a Ray Tune distribution with Tune's semantics, or a fixed value:

=============================  ====================================================================
``uniform(a, b)``              float in [a, b]
``quniform(a, b, q)``          float in [a, b] rounded to a multiple of q
``loguniform(a, b)``           float, log-uniform in [a, b] (a > 0)
``qloguniform(a, b, q)``       the same rounded to a multiple of q
``randint(a, b)``              integer in [a, b) (upper bound exclusive, as ``tune.randint``)
``qrandint(a, b, q)``          integer multiple of q in [a, b] (inclusive, as ``tune.qrandint``)
``lograndint(a, b)``           integer, log-uniform in [a, b) (a > 0)
``qlograndint(a, b, q)``       integer multiple of q, log-uniform in [a, b]
``choice(v1, v2, ...)``        one of the values (numbers, strings, true/false); ``[v1, v2]`` is the same
a plain value (``2.0``)        fixed for every trial and taken out of the search
=============================  ====================================================================

A ``--space`` entry replaces the method's default distribution for that key and adds keys the method does not
search; the other defaults stay (``--space-only`` drops them). A field fixed with ``--set`` / ``--config``
(``methods.<method>.<field>`` or ``pretrain.<field>``) is taken out of the default space: the user chose it.

YAML file: a mapping from KEY to EXPR (a string such as ``"loguniform(0.1, 10)"``, a plain value, a list = choice,
or ``{loguniform: [0.1, 10]}``); nested mappings are joined with dots::

    croc:
      lambda_pos: loguniform(0.1, 10)
      n_tokens: [4, 6, 8]
    pretrain.lr: loguniform(1e-4, 1e-3)

Every error is a :class:`~bench.errors.BenchError` naming the entry: an unknown hyperparameter (the valid ones
are listed), an unknown or malformed distribution, low > high, a type that does not fit the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from bench.errors import BenchError

# Optimisation settings a search may vary (the run length and batch stay fixed: ASHA's time axis is the step).
PRETRAIN_KEYS = ("lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "momentum", "clip_grad",
                 "optimizer")

# name -> (number of arguments, integer domain?)
FUNCTIONS = {
    "uniform": (2, False), "quniform": (3, False), "loguniform": (2, False), "qloguniform": (3, False),
    "randint": (2, True), "qrandint": (3, True), "lograndint": (2, True), "qlograndint": (3, True),
    "choice": (None, None),
}
USAGE = ("expected uniform(a,b), quniform(a,b,q), loguniform(a,b), qloguniform(a,b,q), randint(a,b), "
         "qrandint(a,b,q), lograndint(a,b), qlograndint(a,b,q), choice(v1,v2,...) or a plain value")
_CALL = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)$", re.S)
_FIXED = object()


@dataclass
class SearchSpace:
    """``domains``: KEY -> Ray Tune domain (searched); ``fixed``: KEY -> value; ``text``: KEY -> description."""

    method: str
    domains: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def param_space(self) -> dict:
        return dict(self.domains)

    def as_items(self) -> list[str]:
        """The space as ``--space`` entries (with ``only=True`` they rebuild it exactly)."""
        return [f"{k}={describe(d)}" for k, d in self.domains.items()] + \
            [f"{k}={_fmt(v)}" for k, v in self.fixed.items()]

    def overrides(self, values: dict | None = None) -> dict:
        """Fixed values plus one trial's sampled ``values`` -> ``{"methods": {m: {...}}, "pretrain": {...}}``."""
        out: dict = {}
        for key, value in {**self.fixed, **(values or {})}.items():
            section, name = key.split(".", 1)
            if section == "pretrain":
                out.setdefault("pretrain", {})[name] = value
            else:
                out.setdefault("methods", {}).setdefault(self.method, {})[name] = value
        return out


# ------------------------------------------------------------------------------------------ parsing


def _number(value: Any) -> Any:
    """YAML reads ``1e-4`` as a string (no dot): convert strings that are numbers."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _args(raw: str, where: str) -> list:
    try:
        values = yaml.safe_load(f"[{raw}]")
    except yaml.YAMLError:
        raise BenchError(f"{where}: malformed arguments '{raw}'; {USAGE}") from None
    return [_number(v) for v in values]


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def make_domain(name: str, args: list, where: str):
    """A Ray Tune domain from a distribution name and its arguments (validated)."""
    from ray import tune

    if name not in FUNCTIONS:
        raise BenchError(f"{where}: unknown distribution '{name}'; {USAGE}")
    n_args, integer = FUNCTIONS[name]
    if name == "choice":
        if not args:
            raise BenchError(f"{where}: choice() needs at least one value")
        for v in args:
            if not (v is None or isinstance(v, (bool, str)) or _is_num(v)):
                raise BenchError(f"{where}: choice values must be numbers, strings or true/false, got {v!r}")
        if len({repr(v) for v in args}) != len(args):
            raise BenchError(f"{where}: choice() lists a value twice")
        return tune.choice(list(args))
    if len(args) != n_args:
        sig = "a, b" if n_args == 2 else "a, b, q"
        raise BenchError(f"{where}: {name}() takes {n_args} numbers ({name}({sig})), got {len(args)}")
    if not all(_is_num(a) for a in args):
        raise BenchError(f"{where}: {name}() takes numbers, got {', '.join(repr(a) for a in args)}")
    if integer and not all(isinstance(a, int) for a in args):
        raise BenchError(f"{where}: {name}() takes integers, got {', '.join(repr(a) for a in args)}")
    low, high = args[0], args[1]
    if low > high:
        raise BenchError(f"{where}: low {low} > high {high}")
    if low == high or (name in ("randint", "lograndint") and high - low < 1):
        raise BenchError(f"{where}: empty range [{low}, {high}{')' if name in ('randint', 'lograndint') else ']'}; "
                         f"for a fixed value write KEY={low}")
    if name.startswith(("log", "qlog")) and low <= 0:
        raise BenchError(f"{where}: {name}() needs low > 0, got {low}")
    if n_args == 3 and args[2] <= 0:
        raise BenchError(f"{where}: {name}() needs a positive step q, got {args[2]}")
    domain = getattr(tune, name)(*args)
    try:  # e.g. qrandint(3, 5, 4): no multiple of q in the range
        import numpy as np

        domain.sample(random_state=np.random.default_rng(0))
    except (ValueError, ZeroDivisionError) as exc:
        raise BenchError(f"{where}: {str(exc).splitlines()[0]}") from None
    return domain


def parse_expr(expr: Any, where: str):
    """A CLI/YAML expression -> Tune domain, or ``(_FIXED, value)`` for a plain value."""
    if isinstance(expr, list):
        return make_domain("choice", [_number(v) for v in expr], where)
    if isinstance(expr, dict):
        if len(expr) == 1:
            (name, args), = expr.items()
            if name in FUNCTIONS:
                return make_domain(name, [_number(v) for v in (args if isinstance(args, list) else [args])], where)
        raise BenchError(f"{where}: malformed distribution {expr!r}; {USAGE}")
    if not isinstance(expr, str):
        return (_FIXED, expr)
    text = expr.strip()
    if not text:
        raise BenchError(f"{where}: empty value; {USAGE}")
    m = _CALL.match(text)
    if m:
        return make_domain(m.group(1), _args(m.group(2), where), where)
    if "(" in text or ")" in text:
        raise BenchError(f"{where}: malformed distribution '{text}'; {USAGE}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise BenchError(f"{where}: malformed value '{text}'; {USAGE}") from None
    if isinstance(value, list):
        return make_domain("choice", [_number(v) for v in value], where)
    if isinstance(value, dict):
        raise BenchError(f"{where}: malformed value '{text}'; {USAGE}")
    return (_FIXED, _number(value))


def describe(domain) -> str:
    """A Tune domain -> the ``--space`` expression that builds it (``loguniform(0.1, 10)``, ``choice(2, 3)``)."""
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized

    if isinstance(domain, Categorical):
        return "choice(" + ", ".join(_fmt(v) for v in domain.categories) + ")"
    sampler = domain.get_sampler()
    q = None
    if isinstance(sampler, Quantized):
        q, sampler = sampler.q, sampler.get_sampler()
    log = isinstance(sampler, LogUniform)
    if isinstance(domain, Float):
        name = ("q" if q else "") + ("loguniform" if log else "uniform")
    elif isinstance(domain, Integer):
        name = ("q" if q else "") + ("lograndint" if log else "randint")
    else:
        return str(domain)
    args = [domain.lower, domain.upper] + ([q] if q else [])
    return f"{name}({', '.join(_fmt(a) for a in args)})"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)  # exact round trip through the parser
    return str(v)


# ------------------------------------------------------------------------------------------ keys


def _fields(method: str) -> dict:
    """Field name -> type of the method's config dataclass."""
    from bench.registry import METHODS

    cls = getattr(METHODS.get(method), "config_class", None)
    if cls is None or not dataclasses.is_dataclass(cls):
        return {}
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _pretrain_fields() -> dict:
    from bench.config import PretrainConfig

    hints = typing.get_type_hints(PretrainConfig)
    return {k: hints[k] for k in PRETRAIN_KEYS}


def valid_keys(method: str) -> list[str]:
    return [f"{method}.{f}" for f in _fields(method)] + [f"pretrain.{f}" for f in PRETRAIN_KEYS]


def canonical_key(key: str, method: str, where: str) -> str:
    """``croc.x`` / ``methods.croc.x`` / ``x`` -> ``croc.x``; ``pretrain.lr`` stays; unknown -> BenchError."""
    key = key.strip()
    fields = _fields(method)
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "methods":
        parts = parts[1:]
    if len(parts) == 1 and parts[0] in fields:
        return f"{method}.{parts[0]}"
    if len(parts) == 2:
        section, name = parts
        if section == method and name in fields:
            return f"{method}.{name}"
        if section == "pretrain" and name in PRETRAIN_KEYS:
            return f"pretrain.{name}"
        if section not in (method, "pretrain"):
            raise BenchError(f"{where}: unknown hyperparameter '{key}': this search is over method '{method}'; "
                             f"valid: {', '.join(valid_keys(method))}")
    raise BenchError(f"{where}: unknown hyperparameter '{key}'; valid: {', '.join(valid_keys(method))}")


def _field_type(key: str, method: str):
    section, name = key.split(".", 1)
    return (_pretrain_fields() if section == "pretrain" else _fields(method))[name]


def check_type(key: str, parsed, method: str, where: str):
    """The domain (or fixed value) must produce values the config field accepts."""
    from ray.tune.search.sample import Categorical, Float, Integer

    from bench.config import coerce

    tp = _field_type(key, method)
    _check_bounds(key, parsed, method, where)
    if isinstance(parsed, tuple) and parsed and parsed[0] is _FIXED:
        return (_FIXED, coerce(parsed[1], tp, f"{where} ({key})"))
    if isinstance(parsed, Categorical):
        for v in parsed.categories:
            coerce(v, tp, f"{where} ({key})")
        return parsed
    if tp is int and isinstance(parsed, Float):
        raise BenchError(f"{where}: {key} is an integer; use randint, qrandint, lograndint, qlograndint or choice")
    if tp not in (int, float) and isinstance(parsed, (Float, Integer)):
        tname = getattr(tp, "__name__", str(tp))
        raise BenchError(f"{where}: {key} is a {tname}; use choice(...) or a plain value")
    return parsed


def _check_bounds(key: str, parsed, method: str, where: str) -> None:
    """Every value the domain can give lies in the field's declared range (``bench.config.ranged``)."""
    from ray.tune.search.sample import Categorical, Float, Integer

    from bench.config import PretrainConfig, check_range
    from bench.registry import METHODS

    section, name = key.split(".", 1)
    cls = PretrainConfig if section == "pretrain" else METHODS.get(method).config_class
    if isinstance(parsed, tuple) and parsed and parsed[0] is _FIXED:
        values = [parsed[1]]
    elif isinstance(parsed, Categorical):
        values = list(parsed.categories)
    elif isinstance(parsed, Integer):
        values = [parsed.lower, parsed.upper - 1]  # Ray's integer upper bound is exclusive
    elif isinstance(parsed, Float):
        values = [parsed.lower, parsed.upper]
    else:
        return
    for v in values:
        check_range(cls, name, v, f"{where}: {key}")


# ------------------------------------------------------------------------------------------ the space


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not (len(v) == 1 and next(iter(v)) in FUNCTIONS):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def read_items(items: list[str]) -> list[tuple[str, Any, str]]:
    """``--space`` values -> [(key, expression, where)], YAML files expanded in place."""
    out = []
    for item in items or []:
        if "=" in item:
            key, expr = item.split("=", 1)
            if not key.strip():
                raise BenchError(f"--space {item}: expected KEY=DISTRIBUTION, e.g. croc.lambda_pos=loguniform(0.1,10)")
            out.append((key.strip(), expr, f"--space {item}"))
            continue
        path = item.strip()
        if not (path.endswith((".yaml", ".yml")) or os.path.exists(path)):
            raise BenchError(f"--space {item}: expected KEY=DISTRIBUTION (e.g. croc.lambda_pos=loguniform(0.1,10)) "
                             f"or a YAML file")
        if not os.path.isfile(path):
            raise BenchError(f"--space {path}: file not found")
        try:
            with open(path) as fh:
                data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise BenchError(f"--space {path}: not valid YAML{f' (line {mark.line + 1})' if mark else ''}") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise BenchError(f"--space {path}: expected a mapping of hyperparameters to distributions")
        for key, expr in _flatten(data):
            out.append((key, expr, f"--space {path}: {key}"))
    return out


def fixed_by_user(user: dict | None, method: str) -> set[str]:
    """Keys the user set with --set / --config (they are not searched by default)."""
    user = user or {}
    keys = {f"{method}.{k}" for k in ((user.get("methods") or {}).get(method) or {})}
    keys |= {f"pretrain.{k}" for k in (user.get("pretrain") or {}) if k in PRETRAIN_KEYS}
    return keys


def build_space(method: str, items: list[str] | None = None, only: bool = False,
                user: dict | None = None) -> SearchSpace:
    """The method's default space (unless ``only``), minus user-fixed fields, then the ``--space`` entries."""
    from bench.registry import METHODS

    cls = METHODS.get(method)
    space = SearchSpace(method=method)
    if not only:
        defaults = cls.search_space() or {}
        fields = _fields(method)
        taken = fixed_by_user(user, method)
        for name, domain in defaults.items():
            if name not in fields:
                raise BenchError(f"method '{method}': search_space() names '{name}', which is not a field of "
                                 f"{cls.config_class.__name__}")
            key = f"{method}.{name}"
            if key in taken:
                space.notes.append(f"{key} is set by --set/--config: not searched")
                continue
            space.domains[key] = domain
            space.text[key] = describe(domain)
    for key, expr, where in read_items(items or []):
        key = canonical_key(key, method, where)
        parsed = check_type(key, parse_expr(expr, where), method, where)
        space.domains.pop(key, None)
        space.fixed.pop(key, None)
        if isinstance(parsed, tuple) and parsed and parsed[0] is _FIXED:
            space.fixed[key] = parsed[1]
            space.text[key] = f"= {_fmt(parsed[1])}"
        else:
            space.domains[key] = parsed
            space.text[key] = describe(parsed)
    if not space.domains:
        why = "--space-only with no distribution in --space" if only else \
            f"method '{method}' declares no search space and --space adds no distribution"
        raise BenchError(f"--space: nothing to search ({why}); e.g. --space {method}.<field>=uniform(a,b)")
    return space
