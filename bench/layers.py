"""The declared layers of the code base, and a checker for them (``python -m bench.layers``).

Imports only point down (or sideways, within a layer); ``tests/bench/test_structure.py`` fails on any import
that points up, on an import cycle, on a module over ``MAX_LINES``, on a method importing another method and
on a module that has no layer here. The modules stay flat files under ``bench/``: the table is the structure,
enforced, so moving files into subpackages would only rename imports (see docs/architecture.md).

A module's layer is the one of the longest matching prefix in ``LAYER_OF`` (``bench.data.davis`` ->
``bench.data``; ``bench.tune.trial`` -> ``bench.tune``; ``methods.vice`` -> ``methods``).
"""

from __future__ import annotations

import ast
import os
import sys

# low to high; a module may import modules of its own rank or below
RANKS = {"core": 0, "data": 1, "plugins": 2, "training": 3, "evaluation": 3, "tracking": 4, "search": 5,
         "orchestration": 6, "cli": 7}

LAYER_OF = {
    # core: names, configuration, errors, files; nothing above it
    "bench": "core", "bench.errors": "core", "bench.registry": "core", "bench.plugins": "core",
    "bench.config": "core", "bench.checkpoint": "core", "bench.storage": "core", "bench.raycluster": "core",
    "bench.plots": "core", "bench.layers": "core", "bench.components": "core",
    # declared ahead for modules of the branches in flight (checked against their imports before the merge)
    "bench.recipes": "core", "bench.ranges": "core", "bench.names": "core", "bench.resources": "core",
    "bench.runlock": "core", "bench.procgroup": "core", "bench.viewrng": "core", "bench.cache": "core",
    "bench.runspec": "core", "bench.tensorops": "core",
    # data: datasets, views, backbones: what methods and tasks are built from
    "bench.data": "data", "bench.backbones": "data",
    # plugins: registered by name; they import only core and data (and their own package's shared parts)
    "methods": "plugins", "tasks": "plugins",
    # training: the loop, its config, the one TorchTrainer, optimisers, the held-out proxy
    "bench.pretrain": "training", "bench.loopconfig": "training", "bench.launch": "training",
    "bench.optim": "training", "bench.proxy": "training", "bench.fitting": "training",
    # evaluation: a trained (or random) backbone on a task; export of the evaluation backbone; dataset checks
    "bench.evaluate": "evaluation", "bench.export": "evaluation", "bench.datacheck": "evaluation",
    # tracking: the MLflow schema, leaderboards, their pictures, published reference numbers
    "bench.tracking": "tracking", "bench.leaderboard": "tracking", "bench.figures": "tracking",
    "bench.reference": "tracking", "bench.board": "tracking", "bench.significance": "tracking",
    # search: Ray Tune + Optuna over a method's space
    "bench.tune": "search", "bench.search_space": "search",
    # orchestration: grids of runs, benchmarks, job submission, the UI server
    "bench.pipeline": "orchestration", "bench.stages_eval": "orchestration", "bench.perf": "orchestration", "bench.submit": "orchestration",
    "bench.ui": "orchestration", "bench.reproduce": "orchestration", "bench.recipe_tools": "orchestration",
    # the command line
    "bench.cli": "cli", "bench.cli_parser": "cli", "bench.__main__": "cli",
}

PACKAGES = ("bench", "methods", "tasks")
MAX_LINES = 500
# modules of methods/ that every method may import (not a method themselves)
SHARED_METHOD_PARTS = {"common", "base", "build", "__init__", "_template"}
# modules allowed over MAX_LINES for now, each with the reason; the checker fails once one is no longer needed
OVERSIZE_FOR_NOW: dict = {}
ORCHESTRATION = {"pipeline", "tune", "cli", "tracking", "submit", "ui", "perf", "leaderboard", "__main__"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in LAYER_OF and (name != "bench" or module == "bench"):  # bench/__init__ only, not a prefix
            return LAYER_OF[name]
    return None


def modules(root: str) -> dict[str, str]:
    """Dotted module name -> file path, for every .py file of ``PACKAGES`` under ``root``."""
    out = {}
    for pkg in PACKAGES:
        for d, subs, files in os.walk(os.path.join(root, pkg)):
            subs[:] = sorted(s for s in subs if not s.startswith((".", "__pycache__")))
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def import_graph(root: str) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (function-level imports count too)."""
    mods = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        pkg = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                r = resolve(t)
                if r and r != m:
                    graph[m].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out = set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _family(module: str) -> tuple[str | None, str | None]:
    parts = module.split(".")
    if parts[0] in ("methods", "tasks"):
        return parts[0], parts[1] if len(parts) > 1 else "__init__"
    return None, None


def violations(root: str, max_lines: int = MAX_LINES, oversize_ok: dict | None = None) -> list[str]:
    """Every structural problem, one line each; empty when the code base keeps its layering."""
    oversize_ok = OVERSIZE_FOR_NOW if oversize_ok is None else oversize_ok
    mods = modules(root)
    graph = import_graph(root)
    problems = []
    for m in sorted(mods):
        if layer_of(m) is None:
            problems.append(f"{m}: no layer declared; add it to LAYER_OF in bench/layers.py "
                            f"(one of {', '.join(RANKS)}) and to the table in docs/architecture.md")
    for comp in cycles(graph):
        problems.append("import cycle: " + " -> ".join(comp))
    for m, path in sorted(mods.items()):
        with open(path, encoding="utf-8") as fh:
            n = sum(1 for _ in fh)
        if n > max_lines and m not in oversize_ok:
            problems.append(f"{m}: {n} lines (at most {max_lines}); split it into modules with one job each")
        elif n <= max_lines and m in oversize_ok:
            problems.append(f"{m}: {n} lines now; remove it from OVERSIZE_FOR_NOW in bench/layers.py")
    for m in sorted(set(oversize_ok) - set(mods)):
        problems.append(f"{m}: no such module any more; remove it from OVERSIZE_FOR_NOW in bench/layers.py")
    for a in sorted(graph):
        la = layer_of(a)
        for b in sorted(graph[a]):
            lb = layer_of(b)
            ka, fa = _family(a)
            kb, fb = _family(b)
            if ka == kb == "methods" and fa != fb and not {fa, fb} & SHARED_METHOD_PARTS:
                problems.append(f"{a} imports {b}: methods never import each other (share through methods/common)")
            if ka in ("methods", "tasks") and b.startswith("bench.") and b.split(".")[1] in ORCHESTRATION:
                problems.append(f"{a} imports {b}: plugins never import orchestration, tracking or the CLI")
            elif la and lb and RANKS[lb] > RANKS[la]:
                problems.append(f"{a} ({la}) imports {b} ({lb}): imports must point down the layers")
    return problems


def main(argv: list[str] | None = None) -> int:
    root = (argv or sys.argv[1:] or ["."])[0]
    problems = violations(root)
    mods = modules(root)
    sizes = sorted(((sum(1 for _ in open(p, encoding="utf-8")), m) for m, p in mods.items()), reverse=True)
    for line in problems:
        print(line)
    print(f"modules {len(mods)}; cycles {len(cycles(import_graph(root)))}; largest {sizes[0][1]} ({sizes[0][0]} "
          f"lines); problems {len(problems)}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
