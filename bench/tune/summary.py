"""The end of a search: trials.csv, best.json, the MLflow parent run's summary and the console table."""

from __future__ import annotations

import math
import os
import re

from bench import checkpoint as ckpt
from bench.errors import BenchError
from bench.tune.constants import BEST_FILE, OBJECTIVE, PROXY, TRIALS_FILE
from bench.tune.logger import _fmt
from bench.tune.plots import optuna_summary


class SearchSummary:
    """Mixin of ``Search``: needs ``opts``, ``dir``, ``space``, ``mode``, ``primary``, ``parent``, ``tracker`` and
    ``console``."""

    def summarize(self, results, wall: float) -> dict:
        import pandas as pd

        o = self.opts
        history = ckpt.load_json(os.path.join(self.dir, TRIALS_FILE)) if os.path.exists(
            os.path.join(self.dir, TRIALS_FILE)) else {}
        rows = []
        for r in results:
            m = r.metrics or {}
            tid, index = _trial_id_index(r)
            cfg = {k: (r.config or {}).get(k) for k in self.space.domains}
            status = "error" if r.error else ("completed" if OBJECTIVE in m else "early_stopped")
            if not r.error and OBJECTIVE not in m and not history.get(tid, {}).get("done"):
                status = "interrupted"
            rows.append({"trial": index, "trial_id": tid, "status": status, **cfg, OBJECTIVE: m.get(OBJECTIVE),
                         PROXY: m.get(PROXY), "step": m.get("step"), "wall_s": _trial_wall(history.get(tid, {})),
                         "pretrain_s": m.get("pretrain_s"), "train_loop_s": m.get("train_loop_s"),
                         "eval_s": m.get("eval_s"), "mlflow_run": history.get(tid, {}).get("run", "")})
        rows.sort(key=lambda row: (row["trial"], row["trial_id"]))
        df = pd.DataFrame(rows)
        done = [r for r in rows if r["status"] == "completed"]
        interrupted = len([r for r in rows if r["status"] in ("completed", "early_stopped", "error")]) < o.trials
        best = None
        if done:
            pick = max if self.mode == "max" else min
            b = pick(done, key=lambda r: r[OBJECTIVE])
            best = {"name": o.name, "method": o.method, "task": o.task, "metric": f"{o.task}/{self.primary}",
                    OBJECTIVE: b[OBJECTIVE], "trial_id": b["trial_id"], "mlflow_run": b["mlflow_run"],
                    "values": {k: b[k] for k in self.space.domains}, "fixed": self.space.fixed,
                    "overrides": self.space.overrides({k: b[k] for k in self.space.domains}),
                    "complete": not interrupted, "parent_run": self.parent}
            ckpt.save_json(best, os.path.join(self.dir, BEST_FILE))
        csv = os.path.join(self.dir, "trials.csv")
        df.to_csv(csv, index=False)
        self._log_summary(df, rows, best, csv, wall, interrupted)
        self._print(df, best, interrupted)
        if not done and not interrupted:
            errs = [r for r in rows if r["status"] == "error"]
            if errs and len(errs) == len(rows):
                raise BenchError(f"bench tune {o.name}: every trial failed; see the MLflow trial runs' tune.error "
                                 f"tags or {self.dir}")
        return {"name": o.name, "dir": self.dir, "best": best, "trials": rows, "interrupted": interrupted,
                "wall_s": wall, "parent_run": self.parent}

    def _log_summary(self, df, rows, best, csv, wall, interrupted) -> None:
        t = self.tracker
        counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "error")}
        t.log_metrics(self.parent, {f"tune/{k}": v for k, v in counts.items()})
        t.log_metrics(self.parent, {"tune/wall_s": wall})
        if len(df):
            t.log_table(self.parent, df, "tune/trials.json")
            t.log_artifact(self.parent, csv, "tune")
        if best:
            t.client.log_dict(self.parent, best, "tune/best_config.json")
            t.log_metrics(self.parent, {f"best/{OBJECTIVE}": best[OBJECTIVE]})
            t.set_tags(self.parent, {"tune.best_trial": best["trial_id"],
                                     **{f"best.{k}": v for k, v in best["values"].items()}})
        for fname, payload in optuna_summary(self.space.domains, rows, self.mode).items():
            if fname.endswith(".png"):
                t.log_image_bytes(self.parent, payload, f"tune/{fname}")
            elif fname == "param_importances.json":
                t.client.log_dict(self.parent, payload, f"tune/{fname}")
                t.log_metrics(self.parent, {f"importance/{k}": v for k, v in payload.items()})
            else:
                t.log_text(self.parent, str(payload), f"tune/{fname}")
        if interrupted:
            t.set_tags(self.parent, {"tune.state": "interrupted"})
        else:
            t.set_tags(self.parent, {"tune.state": "finished"})
            t.finish(self.parent)

    def _print(self, df, best, interrupted) -> None:
        from rich.table import Table

        table = Table(title=f"bench tune {self.opts.name}")
        cols = [c for c in df.columns if c not in ("mlflow_run", "pretrain_s", "train_loop_s", "eval_s")]
        for col in cols:
            table.add_column(col, justify="right" if col not in ("trial_id", "status") else "left")
        for _, row in df.iterrows():
            table.add_row(*[_cell(row[c]) for c in cols])
        self.console.print(table)
        if best:
            values = " ".join(f"{k}={_fmt(v)}" for k, v in best["values"].items())
            self.console.print(f"best: {best['metric']} {best[OBJECTIVE]:.2f} (trial {best['trial_id']}): {values}")
            self.console.print(f"[dim]pretrain with it: python -m bench run --methods {self.opts.method} "
                               f"--from-tune {self.opts.name}; MLflow run {self.parent} ({self.tracker.uri})[/dim]")
        if interrupted:
            self.console.print(f"[yellow]search interrupted; continue it with: python -m bench tune --resume "
                               f"{self.opts.name}[/yellow]")


def _trial_id_index(result) -> tuple[str, int]:
    """(Tune trial id, creation index) from a Result; its folder is ``<trainable>_<id>_<index>_<params>...``."""
    m = result.metrics or {}
    base = os.path.basename(str(result.path or ""))
    hit = re.search(r"_([0-9a-f]{5,})_(\d+)_", base)
    tid = m.get("trial_id") or (hit.group(1) if hit else base)
    index = int(hit.group(2)) if hit and hit.group(1) == tid else 0
    return tid, index


def _trial_wall(entry: dict) -> float | None:
    """Seconds from the trial's (last) start to its end, as the driver saw them (actor start included)."""
    if "t_start" in entry and "t_end" in entry:
        return float(entry["t_end"] - entry["t_start"])
    return None


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return _fmt(v)
