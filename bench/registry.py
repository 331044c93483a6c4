"""One Registry class; METHODS, TASKS, DATASETS, BACKBONES and VIEW_RECIPES are its instances.

Modules register themselves on import (``@METHODS.register("dino")``). ``bench.plugins.load_all()``
imports every module under ``methods/`` and ``tasks/`` so a new file plugs in without touching bench/.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from bench.errors import BenchError


class Registry:
    """A name -> object mapping with clear errors for unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise BenchError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names()) or '(none)'}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def validate(self, names: list[str], option: str) -> list[str]:
        """Check every name before any work starts; one error lists all unknown names."""
        unknown = [n for n in names if n not in self._items]
        if unknown:
            raise BenchError(
                f"{option}: unknown {self.kind} {', '.join(repr(u) for u in unknown)}; "
                f"valid: {', '.join(self.names())}"
            )
        return names


METHODS = Registry("method")
TASKS = Registry("task")
DATASETS = Registry("dataset")
BACKBONES = Registry("backbone")
VIEW_RECIPES = Registry("view recipe")
