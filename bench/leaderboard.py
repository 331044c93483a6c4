"""Leaderboards: tables of comparable rows, from a run's results or from MLflow, for the terminal, markdown, CSV.

``build(rows)`` aggregates rows over seeds (``bench.board``), splits them into tables that never mix
evaluation datasets or task protocols, and marks each primary column's best and the rows a paired bootstrap
cannot tell from it. A cell reads ``mean ± std (n)`` (one seed: the plain value). The terminal shows each
task's display metrics and keeps every value intact at 80 columns (a table too wide is split by task; the
compute columns get their own table); off a terminal (CI logs, pipes) it prints the markdown instead. Markdown
and CSV carry every metric; CSV has the mean, std and n as separate columns.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pandas as pd

from bench.board import (BASELINE, Row, aggregate, is_baseline, is_reference, load_npz, mark_significance,
                         tables)
from bench.checkpoint import atomic_write_bytes
from bench.errors import BenchError
from bench.significance import LEGEND, REPLICATES

__all__ = ["BASELINE", "Row", "Board", "build", "render", "to_frame", "to_markdown", "export", "rows_from_mlflow",
           "is_reference"]

KEY_COLUMNS = (("recipe", "recipe"), ("backbone", "backbone"), ("init", "init"), ("pretrain_dataset", "pretrain data"))
COMPUTE = (("images_seen", "images"), ("pretrain_wall_s", "wall"), ("device_h", "device-h"), ("params", "params"),
           ("peak_mem_mb", "peak mem"))


@dataclass
class Board:
    tables: list  # list[list[Row]], aggregated and marked
    untested: dict = field(default_factory=dict)  # task -> why its column has no significance marks
    seeds_resampled: bool = False


def build(rows, per_protocol: bool = False, load=load_npz, replicates: int = REPLICATES) -> Board:
    if isinstance(rows, Board):
        return rows
    board = Board(tables=[])
    for table in tables(aggregate(list(rows)), per_protocol=per_protocol):
        board.untested.update(mark_significance(table, load, replicates))
        board.seeds_resampled |= any(r.n >= 3 for r in table if not is_reference(r))
        board.tables.append(_ordered(table))
    return board


def _ordered(table: list[Row]) -> list[Row]:
    """Runs order; the untrained baseline after the methods; published reference rows last."""
    return ([r for r in table if not is_reference(r) and not is_baseline(r.method)]
            + [r for r in table if not is_reference(r) and is_baseline(r.method)]
            + [r for r in table if is_reference(r)])


# ------------------------------------------------------------------------------------------ cells

def _num(v) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.2f}" if isinstance(v, (int, float)) else str(v)


def cell(r: Row | None, metric: str) -> str:
    """``58.30 ± 0.42 (3)``, ``58.30`` for one seed, ``≈`` appended when indistinguishable from the best."""
    if r is None or not _num(r.metrics.get(metric)):
        return "–"
    text = f"{r.metrics[metric]:.2f}"
    if r.n > 1 and not metric.endswith("_std"):
        text += f" ± {r.std[metric]:.2f} ({r.n})" if metric in r.std else f" ({r.n})"
    if r.mark.get(metric) == "≈":
        text += " ≈"
    return text


def _human(name: str, v, device: str = "") -> str:
    if not _num(v):
        return "–"
    if name in ("images_seen", "params"):
        for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if v >= div:
                return f"{v / div:.1f}{unit}"
        return f"{v:.0f}"
    if name == "pretrain_wall_s":
        return f"{v / 3600:.1f}h" if v >= 5400 else (f"{v / 60:.1f}m" if v >= 90 else f"{v:.0f}s")
    if name == "device_h":
        return f"{v:.3g} {device}".strip()
    if name == "peak_mem_mb":
        return f"{v / 1024:.1f} GiB" if v >= 1024 else f"{v:.0f} MiB"
    return _fmt(v)


def _columns(table: list[Row], full: bool) -> list[tuple[str, str]]:
    """(task, metric) columns: every numeric metric (primary first) with ``full``, else the display metrics."""
    cols: list[tuple[str, str]] = []
    for r in table:
        wanted = ([r.primary] + list(r.metrics)) if full else (list(r.display) or [r.primary])
        for m in wanted:
            if (r.task, m) not in cols and (_num(r.metrics.get(m)) or m == r.primary):
                if is_reference(r) and not full and m not in (r.display or [r.primary]):
                    continue
                cols.append((r.task, m))
    return cols


def _lines(table: list[Row]) -> list[tuple[str, dict]]:
    """(label, {task: row}) per line; a line is one (method, recipe, backbone, init, pretraining data)."""
    out: dict[tuple, dict] = {}
    labels: dict[tuple, str] = {}
    for r in table:
        k = (r.method, r.recipe, r.backbone, r.init, r.pretrain_dataset)
        out.setdefault(k, {})[r.task] = r
        labels[k] = r.method
    return [(labels[k], v) for k, v in out.items()]


def _varying(table: list[Row]) -> list[tuple[str, str]]:
    measured = [r for r in table if not is_reference(r)]
    # the recipe is always a column (issue 17: every row says which recipe made it); the other keys when they vary
    return [(a, h) for a, h in KEY_COLUMNS
            if (a == "recipe" and any(r.recipe for r in measured))
            or len({getattr(r, a) for r in measured if not (a == "pretrain_dataset" and is_baseline(r.method))}) > 1]


def _constant(table: list[Row]) -> str:
    """What every row of the table shares (said once in the title)."""
    measured = [r for r in table if not is_reference(r)]
    parts = [f"data {measured[0].dataset}"] if measured and measured[0].dataset else []
    for attr, head in KEY_COLUMNS:
        if attr == "recipe":  # always a column of its own
            continue
        values = {getattr(r, attr) for r in measured if not (attr == "pretrain_dataset" and is_baseline(r.method))}
        if len(values) == 1 and next(iter(values)):
            parts.append(f"{head} {next(iter(values))}")
    return " · ".join(parts)


def _legend(board: Board, table: list[Row]) -> list[str]:
    out = []
    seen = set()
    for r in table:
        if r.protocol and not is_reference(r) and (r.task, r.protocol) not in seen:
            seen.add((r.task, r.protocol))
            tag = f" (protocol {r.protocol_name} v{r.protocol_version} #{r.protocol_hash})" if r.protocol_hash else ""
            out.append(f"{r.task}{tag}: {r.protocol}")
    if any(r.n > 1 for r in table if not is_reference(r)):
        out.append("cells: mean ± sample std over pretraining seeds (n)"
                   + ("; cluster miou_std is the k-means-restart std, kept separate" if
                      any(r.task == "cluster" for r in table) else ""))
    if any(v for r in table for v in r.mark.values() if v == "≈") or any(
            "bootstrap" in r.extra for r in table):
        seeds = ", and of each row's seeds when n ≥ 3" if board.seeds_resampled else ""
        out.append(LEGEND.format(b=REPLICATES, seeds=seeds))
    marked = list(dict.fromkeys(f"{r.method}: {r.extra['comparable']}" for r in table if r.extra.get("comparable")))
    if marked:
        out.append("published numbers are shown only beside rows that ran the `paper` recipe unchanged; "
                   + "; ".join(marked))
    tasks = {r.task for r in table}
    for task, why in board.untested.items():
        if task in tasks:
            out.append(f"{task}: no significance test ({why})")
    return out


# ------------------------------------------------------------------------------------------ frame

def to_frame(rows) -> pd.DataFrame:
    """Every table's lines: method, the metrics (mean; ``_std`` and ``_n`` when seeds were aggregated), the
    row key, the compute columns; ``source`` last when published reference rows are present."""
    board = build(rows)
    data, columns = [], ["method"]
    refs = any(is_reference(r) or r.extra.get("comparable") for t in board.tables for r in t)
    multi = any(r.n > 1 for t in board.tables for r in t)
    compute = any(r.compute for t in board.tables for r in t)
    for table in board.tables:
        cols = _columns(table, full=True)
        for task, m in cols:
            name = f"{task}/{m}"
            if name not in columns:
                columns.append(name)
                if multi:
                    columns += [f"{name}_std", f"{name}_n"]
        for label, by_task in _lines(table):
            line: dict = {"method": label}
            any_row = next(iter(by_task.values()))
            for task, m in cols:
                r = by_task.get(task)
                if r is None:
                    continue
                line[f"{task}/{m}"] = r.metrics.get(m)
                if multi:
                    line[f"{task}/{m}_std"] = r.std.get(m)
                    line[f"{task}/{m}_n"] = r.n
                if m == r.primary and multi:
                    line[f"{task}/{m}_cell"] = cell(r, m)  # as printed: mean ± std (n), ≈
                if m == r.primary and r.mark.get(m):
                    line[f"{task}/{m}_mark"] = r.mark[m]
            line.update({"dataset": any_row.dataset, "backbone": any_row.backbone})
            for attr in ("recipe", "init", "pretrain_dataset"):
                line[attr] = getattr(any_row, attr)
            line["protocols"] = "; ".join(f"{t}:{r.protocol_name}@v{r.protocol_version}#{r.protocol_hash}"
                                          for t, r in by_task.items() if r.protocol_hash)
            if compute:
                for name, _ in COMPUTE:
                    line[name] = any_row.compute.get(name)
                line["device"] = any_row.compute.get("device", "")
            if refs:
                line["source"] = any_row.extra.get("reference") or any_row.extra.get("comparable") or "measured"
            data.append(line)
    marks = [c for line in data for c in line if c.endswith(("_cell", "_mark"))]
    columns += list(dict.fromkeys(marks))
    columns += ["dataset", "backbone"]
    for attr in ("recipe", "init", "pretrain_dataset", "protocols"):
        if any(line.get(attr) for line in data):
            columns.append(attr)
    if compute:
        columns += [n for n, _ in COMPUTE] + ["device"]
    if refs:
        columns.append("source")
    return pd.DataFrame(data, columns=columns)


# ------------------------------------------------------------------------------------------ markdown

def to_markdown(rows, title: str = "") -> str:
    board = build(rows)
    out = [f"## {title}", ""] if title else []
    for i, table in enumerate(board.tables):
        if len(board.tables) > 1:
            out += [f"### {_constant(table) or f'table {i + 1}'}", ""]
        out += _markdown_table(board, table)
    return "\n".join(out) + "\n"


def _markdown_table(board: Board, table: list[Row]) -> list[str]:
    cols = _columns(table, full=True)
    keys = _varying(table)
    compute = any(r.compute for r in table)
    head = (["method"] + [h for _, h in keys] + [f"{t}/{m}" for t, m in cols]
            + (["dataset", "backbone"]) + ([h for _, h in COMPUTE] if compute else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    tested = {r.task for r in table if "bootstrap" in r.extra}
    for label, by_task in _lines(table):
        r0 = next(iter(by_task.values()))
        cells = [label] + [getattr(r0, a) or "–" for a, _ in keys]
        for task, m in cols:
            r = by_task.get(task)
            text = cell(r, m)
            if r is not None and r.mark.get(m) == "best" and task in tested:
                text = f"**{text}**"
            cells.append(text)
        cells += [r0.dataset or "–", r0.backbone or "–"]
        if compute:
            cells += [_human(n, r0.compute.get(n), r0.compute.get("device", "")) for n, _ in COMPUTE]
        if is_reference(r0):  # published, not measured: italic
            cells = [f"*{c}*" if c != "–" else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    legend = _legend(board, table)
    if legend:
        lines.append("")
        lines.extend(f"- `{x.split(':', 1)[0]}`:{x.split(':', 1)[1]}" if ":" in x and x.split(":", 1)[0] in
                     {r.task for r in table} else f"- {x}" for x in legend)
    if any(is_reference(r) for r in table):
        lines.append("- *ref:* rows (italic) are published numbers from `results/reference.yaml`, not measured "
                     "here; shown where dataset and protocol match.")
    lines.append("")
    return lines

# ------------------------------------------------------------------------------------------ terminal

def render(rows, title: str = "Leaderboard", console=None) -> None:
    """Print the board: rich tables on a terminal, the markdown otherwise."""
    from rich.console import Console

    console = console or Console()
    board = build(rows)
    if not console.is_terminal:
        console.print(to_markdown(board, title=title), markup=False, highlight=False, soft_wrap=True)
        return
    for table in board.tables:
        sub = _constant(table)
        _render_table(console, board, table, f"{title}" + (f" · {sub}" if sub else ""))


def _render_table(console, board: Board, table: list[Row], title: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    cols = _columns(table, full=False)
    keys = _varying(table)
    lines = _lines(table)
    refs = [r for r in table if is_reference(r)]
    notes = list(dict.fromkeys(r.extra["reference"] for r in refs))
    label_w = max(len(label) for label, _ in lines) + (5 if refs else 0)
    # split the metric columns into groups that fit the console (values are never cut)
    widths = {c: max([len(f"{c[0]} {c[1]}")] + [len(cell(bt.get(c[0]), c[1])) for _, bt in lines]) for c in cols}
    fixed = label_w + sum(max(len(h), 8) + 3 for _, h in keys) + 4
    groups, cur, used = [], [], fixed
    for c in cols:
        if cur and used + widths[c] + 3 > console.width:
            groups.append(cur)
            cur, used = [], fixed
        cur.append(c)
        used += widths[c] + 3
    groups.append(cur)
    for gi, group in enumerate(groups):
        t = Table(title=title if gi == 0 else None, title_justify="left")
        t.add_column("method", style="bold", overflow="fold")
        for _, head in keys:
            t.add_column(head, overflow="fold")
        for c in group:
            t.add_column(f"{c[0]} {c[1]}", justify="right", no_wrap=True, min_width=widths[c])
        measured_lines = [ln for ln in lines if not is_reference(next(iter(ln[1].values())))]
        for i, (label, by_task) in enumerate(lines):
            r0 = next(iter(by_task.values()))
            ref = is_reference(r0)
            text = label if not ref else f"{label} [{notes.index(r0.extra['reference']) + 1}]"
            cells = [f"[dim]{escape(text)}[/dim]" if is_baseline(label) else escape(text)]
            cells += [escape(getattr(r0, a) or "–") for a, _ in keys]
            for task, m in group:
                r = by_task.get(task)
                v = escape(cell(r, m))
                if r is not None and r.mark.get(m) == "best" and not ref:
                    v = f"[green]{v}[/green]"
                cells.append(v)
            if ref:
                cells = [f"[dim italic]{c}[/dim italic]" for c in cells]
            t.add_row(*cells, end_section=bool(refs) and i == len(measured_lines) - 1)
        console.print(t)
    if any(r.compute for r in table):
        _render_compute(console, table)
    for line in _legend(board, table):
        console.print(f"[dim]{escape(line)}[/dim]")
    if refs:
        console.print("[dim italic]ref: rows are published numbers (results/reference.yaml), not measured here; "
                      "shown where dataset and protocol match. Sources:[/dim italic]")
        for i, note in enumerate(notes, start=1):
            console.print(f"[dim italic]  \\[{i}] {escape(note)}[/dim italic]")


def _render_compute(console, table: list[Row]) -> None:
    from rich.table import Table

    t = Table(title="compute per pretraining (mean over seeds)", title_justify="left")
    t.add_column("method", style="bold", overflow="fold")
    for _, head in COMPUTE:
        t.add_column(head, justify="right", no_wrap=True)
    for label, by_task in _lines(table):
        r0 = next(iter(by_task.values()))
        if is_reference(r0) or not r0.compute:
            continue
        t.add_row(label, *[_human(n, r0.compute.get(n), r0.compute.get("device", "")) for n, _ in COMPUTE])
    console.print(t)


# ------------------------------------------------------------------------------------------ files

def export(rows, results_dir: str, name: str) -> list[str]:
    """Write ``<results_dir>/<name>.md`` and ``.csv`` atomically; returns the paths."""
    board = build(rows)
    try:
        os.makedirs(results_dir, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"run.results_dir {results_dir}: cannot create it ({exc.strerror})") from None
    if not os.access(results_dir, os.W_OK):
        raise BenchError(f"run.results_dir {results_dir}: not writable")
    md = os.path.join(results_dir, f"{name}.md")
    csv = os.path.join(results_dir, f"{name}.csv")
    atomic_write_bytes(md, lambda fh: fh.write(to_markdown(board).encode()))
    atomic_write_bytes(csv, lambda fh: fh.write(to_frame(board).to_csv(index=False).encode()))
    return [md, csv]


# ------------------------------------------------------------------------------------------ MLflow

def row_recipe(tags: dict) -> str:
    """The recipe column from an MLflow run's tags: the recipe name, and how many values differ from paper
    when a ``paper`` run had some changed ("paper (2 changed)": not the published configuration any more)."""
    from bench.tracking import TAG

    name, changes = tags.get(TAG["recipe"], ""), int(tags.get("recipe_changes", 0) or 0)
    return f"{name} ({changes} changed)" if name == "paper" and changes else name


def row_from_run(run, tracker=None, cache_dir: str = "") -> Row:
    """One evaluation run (one seed) as a row; its per-image statistics are downloaded only when tested."""
    from bench.tracking import TAG

    tags, metrics = run.data.tags, run.data.metrics
    task = tags.get(TAG["task"], "")
    seed = tags.get(TAG["seed"])
    per_image = []
    if tracker is not None and tags.get("bench.per_image"):
        rid, art = run.info.run_id, tags["bench.per_image"]
        per_image = [lambda: tracker.download(rid, art, os.path.join(cache_dir or ".", rid))]
    display = [m for m in tags.get("bench.display", "").split(",") if m]
    return Row(method=tags.get(TAG["method"], "?"), task=task,
               metrics={k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{task}/")},
               primary=tags.get(TAG["primary"], ""), dataset=tags.get(TAG["dataset"], ""),
               backbone=tags.get(TAG["backbone"], ""), protocol=tags.get(TAG["protocol"], ""), run=run.info.run_id,
               recipe=row_recipe(tags), init=tags.get(TAG["init"], ""),
               pretrain_dataset=tags.get(TAG["pretrain_dataset"], ""), data_hash=tags.get(TAG["data_hash"], ""),
               protocol_name=tags.get(TAG["protocol_name"], ""),
               protocol_version=int(tags.get(TAG["protocol_version"], 0) or 0),
               protocol_hash=tags.get(TAG["protocol_hash"], ""), seed=int(seed) if seed not in (None, "") else None,
               compute={**{k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("compute/")},
                        **({"device": tags["bench.device"]} if tags.get("bench.device") else {})},
               per_image=per_image, display=display,
               higher_is_better=tags.get("bench.higher_is_better", "1") != "0")


def rows_from_mlflow(tracker, bench_run_id: str | None = None, cache_dir: str = "") -> list[Row]:
    """Per-seed evaluation rows of one ``bench run`` (its run id), or of the whole experiment, oldest first;
    ``build`` aggregates them per key (never across keys)."""
    filt = "tags.`bench.kind` = 'eval' and attributes.status = 'FINISHED'"
    if bench_run_id:
        filt += f" and tags.`bench.run_id` = '{bench_run_id}'"
    runs = tracker.find_runs(filt)
    if bench_run_id and not runs:
        raise BenchError(f"--run-id {bench_run_id}: no finished evaluations in experiment '{tracker.experiment}'")
    import tempfile

    cache_dir = cache_dir or tempfile.mkdtemp(prefix="bench-lb-")
    return [row_from_run(r, tracker, cache_dir) for r in sorted(runs, key=lambda r: r.info.start_time)]
