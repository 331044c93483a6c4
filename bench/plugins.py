"""Import every backbone, dataset, view, method and task module once, so that their registrations run.

Called by the registries on their first lookup (``bench.registry``); nothing else needs to call it. Modules
are imported by name (``importlib``), never statically, so this module adds no edge to the import graph and
no plugin can form a cycle through it. Files whose name starts with ``_`` (``methods/_template.py``) are
skipped: they are not registered unless imported on purpose.
"""

from __future__ import annotations

import importlib
import pkgutil

PACKAGES = ("bench.data", "methods", "tasks")
_STATE = {"loaded": False, "loading": False}


def _import_package(name: str) -> None:
    pkg = importlib.import_module(name)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{name}.{info.name}")


def load_all() -> None:
    """Idempotent; re-entrant calls (a plugin that looks a name up while the others load) return at once."""
    if _STATE["loaded"] or _STATE["loading"]:
        return
    _STATE["loading"] = True
    try:
        importlib.import_module("bench.backbones")
        importlib.import_module("bench.data.views")
        for name in PACKAGES:
            _import_package(name)
        _STATE["loaded"] = True
    finally:
        _STATE["loading"] = False
