"""``bench perf``'s Markdown report: one table per benchmark; the headline's phases and, when profiled, its step
and evaluation op shares."""

from __future__ import annotations


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no rows)", ""]
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                       for c in cols) + " |")
    return lines + [""]


def _percent(rows: list[dict], keys=("share",)) -> list[dict]:
    return [{k: (f"{100 * v:.1f} %" if k in keys and isinstance(v, float) else v) for k, v in r.items()} for r in rows]


def _headline(res: dict) -> list[str]:
    lines = _table([{"phase": k, "seconds": v} for k, v in res.get("phases_s", {}).items()]
                   + [{"phase": "total (wall)", "seconds": res.get("wall_s")}])
    if res.get("scene_store"):
        lines += [f"Scene store at the start: {res['scene_store']} (bench/data/scene_store.py; cold = as on a fresh "
                  f"machine).", ""]
    prof = res.get("profile")
    if not prof:
        return lines
    lines += ["Op profile (torch.profiler, shares within one profiled run: where time goes, not a timing).", ""]
    for step in prof.get("steps", []):
        lines += [f"### {step['method']}: {step['steps']} training steps, batch {step['batch']}", ""]
        lines += _table(_percent(step["regions"])) + _table(_percent(step["top_ops"]))
    ev = prof.get("eval")
    if ev:
        lines += ["### linseg evaluation (untrained backbone)", ""]
        lines += _table(_percent(ev["regions"])) + _table(_percent(ev["top_ops"]))
    return lines


def to_markdown(report: dict, title: str = "bench perf") -> str:
    lines = [f"# {title}", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in report["env"].items()), ""]
    for name, rows in report["results"].items():
        lines += [f"## {name}", ""]
        lines += _headline(rows) if isinstance(rows, dict) else _table(rows)
    return "\n".join(lines) + "\n"
