"""One Registry class; METHODS, TASKS, DATASETS, BACKBONES and VIEW_RECIPES are its instances.

Modules register themselves on import (``@METHODS.register("dino")``). The first lookup on any registry
(``get``, ``names``, ``validate``, ``in``, iteration) imports every plugin module (``bench.plugins``: the
backbones, ``bench/data``, ``methods/``, ``tasks/``), so a new file plugs in without touching bench/ and no
caller has to remember to load anything. ``register`` never triggers loading (it runs during it).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator

from bench.errors import BenchError


def _ensure_plugins() -> None:
    # by name, not a static import: bench.plugins imports the plugin packages, which import this module
    importlib.import_module("bench.plugins").load_all()


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

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a template for the duration of one test)."""
        self._items.pop(name, None)

    def get(self, name: str) -> Any:
        _ensure_plugins()
        if name not in self._items:
            raise BenchError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names()) or '(none)'}")
        return self._items[name]

    def names(self) -> list[str]:
        _ensure_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _ensure_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def validate(self, names: list[str], option: str) -> list[str]:
        """Check every name before any work starts; one error lists all unknown names."""
        _ensure_plugins()
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
