"""Leaderboards: method × task tables built from evaluation results or from MLflow runs.

A row is one (method, task) evaluation; the table has one line per method and one column per task metric
(primary first). Printed with rich, logged as an MLflow table, exported as markdown and CSV in results/.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pandas as pd

from bench.checkpoint import atomic_write_bytes
from bench.errors import BenchError

BASELINE = "random-init"


@dataclass
class Row:
    method: str
    task: str
    metrics: dict  # metric name -> value (percent for mIoU / accuracy / AP)
    primary: str
    dataset: str = ""
    backbone: str = ""
    protocol: str = ""
    run: str = ""  # MLflow run id of the evaluation
    recipe: str = ""  # the recipe it ran (bench.recipes): "paper", "cpu", "paper (2 changed)", ...
    extra: dict = field(default_factory=dict)  # "reference": source of a published (not measured) row


def row_recipe(tags: dict) -> str:
    """The recipe column from an MLflow run's tags: the recipe name, and how many values differ from paper
    when a ``paper`` run had some changed."""
    name, changes = tags.get("recipe", ""), int(tags.get("recipe_changes", 0) or 0)
    return f"{name} ({changes} changed)" if name == "paper" and changes else name


def is_reference(row: Row) -> bool:
    return bool(row.extra.get("reference"))


def to_frame(rows: list[Row]) -> pd.DataFrame:
    """One line per method (runs order, baseline last), one column per ``task/metric`` (primary first)."""
    methods: list[str] = []
    for r in rows:
        if r.method not in methods:
            methods.append(r.method)
    refs = {r.method for r in rows if is_reference(r)}
    marked = any(r.extra.get("comparable") for r in rows)  # --with-reference marked rows of other recipes
    methods = ([m for m in methods if m != BASELINE and m not in refs] + ([BASELINE] if BASELINE in methods else [])
               + [m for m in methods if m in refs])  # published reference rows last
    tasks: dict[str, list[str]] = {}
    for r in rows:
        cols = tasks.setdefault(r.task, [])
        for name in [r.primary] + [k for k in r.metrics if k != r.primary]:
            if name not in cols and isinstance(r.metrics.get(name), (int, float)):
                cols.append(name)
    data = []
    for m in methods:
        line = {"method": m}
        for r in rows:
            if r.method == m:
                line.update({f"{r.task}/{k}": r.metrics.get(k) for k in tasks[r.task]})
                line.setdefault("dataset", r.dataset)
                line.setdefault("backbone", r.backbone)
                line.setdefault("recipe", r.recipe or ("published" if is_reference(r) else ""))
                if refs or marked:
                    line.setdefault("source", r.extra.get("reference") or r.extra.get("comparable") or "measured")
        data.append(line)
    columns = (["method"] + [f"{t}/{k}" for t, ks in tasks.items() for k in ks] + ["dataset", "backbone", "recipe"]
               + (["source"] if refs or marked else []))
    return pd.DataFrame(data, columns=columns)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.2f}" if isinstance(v, (int, float)) else str(v)


def render(rows: list[Row], title: str = "Leaderboard", console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    df = to_frame(rows)
    table = Table(title=title, title_justify="left")
    for col in df.columns:
        table.add_column(col, justify="left" if col in ("method", "dataset", "backbone", "recipe", "source") else "right",
                         style="bold" if col == "method" else None)
    # the terminal shows reference sources as numbered notes under the table (CSV/markdown keep the text)
    notes = (list(dict.fromkeys(s for s, m in zip(df["source"], df["method"]) if m in {r.method for r in rows if is_reference(r)}))
             if "source" in df.columns else [])
    primaries = {f"{r.task}/{r.primary}" for r in rows}
    refs = {r.method for r in rows if is_reference(r)}
    measured = df[~df["method"].isin(refs)]
    best = {c: measured[c].max() for c in df.columns if c in primaries and measured[c].notna().any()}
    last_measured = len(measured) - 1  # references follow the measured rows: a rule between the two
    for i, (_, line) in enumerate(df.iterrows()):
        cells = []
        ref = line["method"] in refs
        for col in df.columns:
            text = _fmt(line[col])
            if col == "source" and ref:
                text = f"[{notes.index(line[col]) + 1}]"
            if col in best and line[col] == best[col] and not ref:
                text = f"[green]{text}[/green]"
            if col == "method" and line[col] == BASELINE:
                text = f"[dim]{text}[/dim]"
            if ref:
                text = f"[dim italic]{escape(text)}[/dim italic]"
            cells.append(text)
        table.add_row(*cells, end_section=bool(refs) and i == last_measured)
    console.print(table)
    protocols = {r.task: r.protocol for r in rows if r.protocol and not is_reference(r)}
    for task, proto in protocols.items():
        console.print(f"[dim]{task}: {proto}[/dim]")
    if refs:
        console.print("[dim italic]ref: rows are published numbers (results/reference.yaml), not measured here; "
                      "shown where dataset and protocol match. Sources:[/dim italic]")
        for i, note in enumerate(notes, start=1):
            console.print(f"[dim italic]  \\[{i}] {escape(note)}[/dim italic]")


def to_markdown(rows: list[Row]) -> str:
    df = to_frame(rows)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    refs = {r.method for r in rows if is_reference(r)}
    for _, line in df.iterrows():
        cells = [_fmt(line[c]) for c in df.columns]
        if line["method"] in refs:  # published, not measured: italic
            cells = [f"*{c}*" if c != "–" else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    protocols = {r.task: r.protocol for r in rows if r.protocol and not is_reference(r)}
    if protocols:
        lines.append("")
        lines.extend(f"- `{t}`: {p}" for t, p in protocols.items())
    if refs:
        lines.append("- *ref:* rows (italic) are published numbers from `results/reference.yaml`, not measured "
                     "here; shown where dataset and protocol match.")
    return "\n".join(lines) + "\n"


def export(rows: list[Row], results_dir: str, name: str) -> list[str]:
    """Write ``<results_dir>/<name>.md`` and ``.csv`` atomically; returns the paths."""
    try:
        os.makedirs(results_dir, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"run.results_dir {results_dir}: cannot create it ({exc.strerror})") from None
    if not os.access(results_dir, os.W_OK):
        raise BenchError(f"run.results_dir {results_dir}: not writable")
    md = os.path.join(results_dir, f"{name}.md")
    csv = os.path.join(results_dir, f"{name}.csv")
    atomic_write_bytes(md, lambda fh: fh.write(to_markdown(rows).encode()))
    atomic_write_bytes(csv, lambda fh: fh.write(to_frame(rows).to_csv(index=False).encode()))
    return [md, csv]


def rows_from_mlflow(tracker, bench_run_id: str | None = None, best: bool = True) -> list[Row]:
    """Evaluation rows of one ``bench run`` (its run id), or of the whole experiment (best per method × task)."""
    filt = "tags.`bench.kind` = 'eval' and attributes.status = 'FINISHED'"
    if bench_run_id:
        filt += f" and tags.`bench.run_id` = '{bench_run_id}'"
    runs = tracker.find_runs(filt)
    if bench_run_id and not runs:
        raise BenchError(f"--run-id {bench_run_id}: no finished evaluations in experiment '{tracker.experiment}'")
    chosen: dict[tuple[str, str], Row] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags = run.data.tags
        task, primary = tags.get("task", ""), tags.get("bench.primary", "")
        metrics = {k.split("/", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith(f"{task}/")}
        row = Row(method=tags.get("method", "?"), task=task, metrics=metrics, primary=primary,
                  dataset=tags.get("dataset", ""), backbone=tags.get("backbone", ""),
                  protocol=tags.get("bench.protocol", ""), run=run.info.run_id, recipe=row_recipe(tags))
        key = (row.method, row.task)
        old = chosen.get(key)
        if old is None or not best or (row.metrics.get(primary, -math.inf) or -math.inf) > (
                old.metrics.get(primary, -math.inf) or -math.inf):
            chosen[key] = row
    return list(chosen.values())
