"""A single-worker trial's pretraining inside the trial's own process: no Ray Train worker group, no second actor.

``train_loop`` runs in a daemon thread of the Tune trial; the trial's thread forwards every row the loop appends to
``metrics.jsonl`` (the same dicts the loop reports to Ray Train, proxy scores included) to ``tune.report``, so
ASHA sees what it saw through ``TuneReportCallback``. When ASHA stops the trial, Tune ends the trial's actor
(``reuse_actors=False``) and the thread with it. Resume: rows after the newest step checkpoint are dropped before
the loop starts (the loop resumes there and logs them again), and only rows after that step are forwarded.

The lead's ``bench.launch.launch_pretraining`` (issue 20) can replace ``train_in_process``'s thread body.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Callable

from bench import checkpoint as ckpt

POLL_S = 0.2  # seconds between two reads of metrics.jsonl


def _drop_rows_after(path: str, step: int) -> None:
    """Keep the metrics rows up to ``step`` (what the loop itself does when it resumes; done here first, so the
    file is never rewritten while this process reads it)."""
    from bench.pretrain import read_metrics

    if not os.path.exists(path):
        return
    kept = [json.dumps(r) + "\n" for r in read_metrics(os.path.dirname(path)) if int(r.get("step", 0)) <= step]
    ckpt.atomic_write_bytes(path, lambda fh: fh.write("".join(kept).encode()))


def train_in_process(loop: dict, report: Callable[[dict], None], poll_s: float = POLL_S) -> dict:
    """Run ``bench.pretrain.train_loop(loop)`` here; ``report(row)`` for each new metrics row, in step order, from
    the calling thread. Returns the loop's figures; re-raises the loop's exception."""
    from bench.pretrain import read_metrics, train_loop

    out_dir = loop["out_dir"]
    found = ckpt.step_checkpoints(os.path.join(out_dir, "checkpoints"))
    start = found[-1][0] if found else 0
    os.makedirs(out_dir, exist_ok=True)
    _drop_rows_after(os.path.join(out_dir, "metrics.jsonl"), start)
    done: dict = {}

    def body() -> None:
        try:
            done["result"] = train_loop(loop)
        except BaseException as exc:  # noqa: BLE001 - handed to the trial's thread
            done["error"] = exc

    thread = threading.Thread(target=body, name="bench-train-loop", daemon=True)
    thread.start()
    last = start

    def forward() -> None:
        nonlocal last
        for row in read_metrics(out_dir):
            step = int(row.get("step", 0))
            if step > last:
                report(row)
                last = step

    while thread.is_alive():
        thread.join(poll_s)
        forward()
    forward()
    if "error" in done:
        raise done["error"]
    return done["result"]
