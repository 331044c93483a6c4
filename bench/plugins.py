"""Import every method, task, dataset and backbone module so that their registrations run."""

from __future__ import annotations

import importlib
import pkgutil

_LOADED = False


def _import_package(name: str) -> None:
    pkg = importlib.import_module(name)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{name}.{info.name}")


def load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    import bench.backbones  # noqa: F401
    import bench.data.views  # noqa: F401

    _import_package("bench.data")
    _import_package("methods")
    _import_package("tasks")
    _LOADED = True
