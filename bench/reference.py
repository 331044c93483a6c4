"""Published reference numbers (``results/reference.yaml``) and which of them belong beside measured rows.

A reference row is shown next to measured leaderboard rows only when a measured row of the same task has the
same evaluation ``dataset`` and the same protocol: the measured row's protocol key, the head of its protocol
line before the colon (``linseg[leopart]``, ``cluster``, ``det[1x]``), is one of the reference's ``protocol``
keys, and every ``requires`` substring occurs in the measured protocol line (``K=256``, ``majority``). Only
the metric columns the measured rows of that task have are kept, so references never add columns.
Published numbers belong only beside rows that ran the published configuration: measured rows whose recipe
is ``paper`` with no value changed (``comparable``); the others are marked "not comparable" and never matched.
Reference rows become ``leaderboard.Row`` objects with ``extra["reference"]`` set to their source, which
the leaderboard renders marked (``ref:`` prefix, dimmed, never highlighted as best).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from bench.errors import BenchError
from bench.leaderboard import Row

REFERENCE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results",
                              "reference.yaml")
EVIDENCE = ("R", "P", "poster", "paper", "I")
_REQUIRED = ("label", "method", "task", "protocol", "dataset", "backbone", "metrics", "source")
_OPTIONAL = ("requires", "pretrain", "evidence", "note")


@dataclass
class Reference:
    label: str
    method: str
    task: str
    protocols: tuple  # accepted protocol keys
    dataset: str
    backbone: str
    metrics: dict  # metric name -> float (percent)
    source: str
    requires: tuple = ()
    pretrain: str = ""
    evidence: str = ""
    note: str = ""

    def to_row(self, metrics: dict | None = None, primary: str = "") -> Row:
        m = dict(self.metrics if metrics is None else metrics)
        primary = primary or next(iter(self.metrics))
        return Row(method=f"ref: {self.label}", task=self.task, metrics=m, primary=primary, dataset=self.dataset,
                   backbone=self.backbone, protocol=" | ".join(self.protocols),
                   extra={"reference": self.source, "evidence": self.evidence, "pretrain": self.pretrain})


def protocol_key(protocol: str) -> str:
    """The comparable head of a measured protocol line: ``"linseg[leopart]: frozen ..."`` -> ``linseg[leopart]``."""
    return (protocol or "").split(":", 1)[0].strip()


def _strings(value, where: str) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise BenchError(f"{where}: expected a non-empty string or list of strings")
    return tuple(v.strip() for v in value)


def parse(data, path: str = "reference.yaml") -> list[Reference]:
    """Validated references from the parsed YAML (a mapping with a ``rows`` list)."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise BenchError(f"{path}: expected a mapping with a 'rows' list")
    out: list[Reference] = []
    seen: set = set()
    for i, item in enumerate(data["rows"]):
        where = f"{path}: rows[{i}]"
        if not isinstance(item, dict):
            raise BenchError(f"{where}: expected a mapping")
        missing = [k for k in _REQUIRED if k not in item]
        if missing:
            raise BenchError(f"{where}: missing {', '.join(missing)}")
        unknown = sorted(set(item) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise BenchError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(_REQUIRED + _OPTIONAL)}")
        for key in ("label", "method", "task", "dataset", "backbone", "source"):
            if not isinstance(item[key], str) or not item[key].strip():
                raise BenchError(f"{where}.{key}: expected a non-empty string")
        metrics = item["metrics"]
        if not isinstance(metrics, dict) or not metrics:
            raise BenchError(f"{where}.metrics: expected a non-empty mapping metric -> number")
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 100:
                raise BenchError(f"{where}.metrics.{k}: expected a number in percent (0..100), got {v!r}")
        evidence = str(item.get("evidence", ""))
        if evidence and evidence not in EVIDENCE:
            raise BenchError(f"{where}.evidence: '{evidence}' is not one of {', '.join(EVIDENCE)}")
        ref = Reference(label=item["label"].strip(), method=item["method"].strip(), task=item["task"].strip(),
                        protocols=_strings(item["protocol"], f"{where}.protocol"), dataset=item["dataset"].strip(),
                        backbone=item["backbone"].strip(), metrics={k: float(v) for k, v in metrics.items()},
                        source=item["source"].strip(),
                        requires=_strings(item["requires"], f"{where}.requires") if "requires" in item else (),
                        pretrain=str(item.get("pretrain", "")), evidence=evidence, note=str(item.get("note", "")))
        key = (ref.label, ref.task, ref.dataset, ref.protocols, ref.requires)
        if key in seen:
            raise BenchError(f"{where}: duplicate of an earlier row (label '{ref.label}', task {ref.task}, "
                             f"dataset {ref.dataset}, same protocol)")
        seen.add(key)
        out.append(ref)
    return out


def load(path: str | None = None) -> list[Reference]:
    """Read and validate a reference file (default: the repository's ``results/reference.yaml``)."""
    import yaml

    path = path or REFERENCE_FILE
    if not os.path.isfile(path):
        raise BenchError(f"--reference {path}: file not found")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise BenchError(f"--reference {path}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None
    except OSError as exc:
        raise BenchError(f"--reference {path}: cannot read it ({exc.strerror})") from None
    return parse(data, path)


def matches(ref: Reference, row: Row) -> bool:
    """Whether ``ref`` is comparable with the measured ``row``: same task, dataset and protocol."""
    return (row.task == ref.task and row.dataset == ref.dataset and protocol_key(row.protocol) in ref.protocols
            and all(s in (row.protocol or "") for s in ref.requires))


def comparable(row: Row) -> bool:
    """A measured row that ran its method's ``paper`` recipe unchanged (the random-init baseline never is)."""
    return row.recipe == "paper"


def mark_comparability(rows: list[Row]) -> list[Row]:
    """Sets ``extra["comparable"]`` to "not comparable (recipe X)" on measured rows that are not ``paper``."""
    for r in rows:
        if not r.extra.get("reference") and not comparable(r):
            r.extra["comparable"] = f"not comparable (recipe {r.recipe or 'unrecorded'})"
    return rows


def matching_rows(measured: list[Row], refs: list[Reference]) -> list[Row]:
    """Reference rows for the comparable measured rows (:func:`comparable`), metrics cut to the measured columns
    of their task, file order."""
    measured = [r for r in measured if not r.extra.get("reference") and comparable(r)]
    columns: dict[str, set] = {}
    for r in measured:
        columns.setdefault(r.task, set()).update(k for k, v in r.metrics.items() if isinstance(v, (int, float)))
    out = []
    for ref in refs:
        hit = next((r for r in measured if matches(ref, r)), None)
        if hit is None:
            continue
        kept = {k: v for k, v in ref.metrics.items() if k in columns.get(ref.task, set())}
        if kept:
            out.append(ref.to_row(kept, hit.primary))
    return out


def coverage(refs: list[Reference]) -> list[str]:
    """``dataset/protocol`` pairs the references cover, for the message when nothing matches."""
    seen: list[str] = []
    for ref in refs:
        item = f"{ref.dataset}/{ref.protocols[0]}"
        if item not in seen:
            seen.append(item)
    return seen


__all__ = ["Reference", "REFERENCE_FILE", "load", "parse", "matches", "matching_rows", "protocol_key", "coverage",
           "comparable", "mark_comparability"]
