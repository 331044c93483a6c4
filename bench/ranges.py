"""Numeric ranges declared next to config fields (issue 22): ``lr: float = positive(5e-4)``, and the allowed values
of string fields: ``precision: str = one_of("auto", "fp32", "bf16")``.

:func:`bench.config.build` checks every field that has one, whatever gave the value (defaults, YAML, recipes,
``--set``, tune spaces through :func:`check_range`), and the error is one line naming the key, the value and the
allowed range, e.g. ``pretrain.batch_size = 0: expected >= 1``. This module imports nothing of the harness but
its error type, so methods, tasks and datasets can use it from anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from bench.errors import BenchError


@dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric field (each element of a tuple field): ``ge``/``gt`` below, ``le``/``lt``
    above; checked by :func:`build` for every source of values (defaults, YAML, recipes, ``--set``, tune)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def ok(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self) -> str:
        lo = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        hi = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        return f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}"


def ranged(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    """A dataclass field with a range declared next to it: ``lr: float = ranged(5e-4, gt=0)``."""
    return field(default=default, metadata={"range": Range(ge=ge, gt=gt, le=le, lt=lt)})


# the shorthands the config classes use
def positive(default: Any) -> Any:
    return ranged(default, gt=0)


def at_least(default: Any, lo: float) -> Any:
    return ranged(default, ge=lo)


def fraction(default: Any) -> Any:
    """A probability or fraction: [0, 1]."""
    return ranged(default, ge=0, le=1)


def momentum_value(default: Any) -> Any:
    """An EMA / SGD momentum: [0, 1)."""
    return ranged(default, ge=0, lt=1)


def one_of(default: str, *choices: str) -> Any:
    """A string field with its allowed values declared next to it: ``precision: str = one_of("auto", "fp32")``
    (the default is the first allowed value)."""
    return field(default=default, metadata={"choices": (default, *choices)})


def _metadata(cls: type, name: str, key: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get(key)
    return None


def field_range(cls: type, name: str) -> Range | None:
    return _metadata(cls, name, "range")


def check_range(cls: type, name: str, value: Any, where: str) -> None:
    """One line naming the key, the value and the allowed range or values (``tune`` spaces call it on their
    bounds)."""
    choices = _metadata(cls, name, "choices")
    if choices and value is not None and value not in choices:
        raise BenchError(f"{where} = {value!r}: expected one of {', '.join(choices)}")
    rng = field_range(cls, name)
    if rng is None or value is None or isinstance(value, bool):
        return
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (not math.isfinite(v) or not rng.ok(v)):
            raise BenchError(f"{where} = {value!r}: expected {rng.describe()}")


__all__ = ["Range", "ranged", "positive", "at_least", "fraction", "momentum_value", "one_of", "field_range", "check_range"]
