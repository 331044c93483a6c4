"""``bench ui`` under load (slow): the runs list and a leaderboard page answer 200 times in a row each while a
run logs to the same SQLite store (metrics, curves and artifacts, as ``bench.pipeline`` logs them)."""

import json
import os
import socket
import threading
import time
import urllib.request

import pandas as pd
import pytest

from bench import ui
from bench.tracking import Tracker

pytestmark = pytest.mark.slow
N = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_answers_runs_list_and_leaderboard_200_times_while_a_run_logs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = Tracker(uri, "bench")
    parent = tracker.start_run("board", {"bench.kind": "run", "bench.run_id": "board"})
    board = pd.DataFrame([{"method": "dino", "task": "linseg", "linseg/miou": 58.3},
                          {"method": "random-init", "task": "linseg", "linseg/miou": 53.6}])
    tracker.log_table(parent, board, "leaderboard.json")
    tracker.finish(parent)

    stop = threading.Event()
    logged = {"n": 0, "errors": []}

    def writer():  # a second bench run logging all along: nested runs, curves, params, artifacts
        w = Tracker(uri, "bench")
        live = w.start_run("live", {"bench.kind": "run", "bench.run_id": "live"})
        child = w.start_run("pretrain-dino", {"bench.kind": "pretrain", "method": "dino"}, parent=live)
        step = 0
        while not stop.is_set():
            try:
                w.log_metrics(child, {"pretrain/loss": 1.0 / (step + 1), "pretrain/lr": 1e-4}, step=step)
                if step % 20 == 0:
                    w.log_text(child, f"step {step}\n", f"notes/step_{step}.txt")
                step += 1
                logged["n"] = step
            except Exception as exc:  # noqa: BLE001 - counted and asserted below
                logged["errors"].append(repr(exc))
            time.sleep(0.01)
        w.finish(child)
        w.finish(live)

    port = _free_port()
    with ui.UIServer(ui.check_store(uri), "127.0.0.1", port).start():
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        exp = tracker.experiment_id
        search = json.dumps({"experiment_ids": [exp], "max_results": 100}).encode()
        codes = {"runs": [], "leaderboard": []}
        try:
            for _ in range(N):
                req = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/runs/search", data=search,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as r:
                    codes["runs"].append(r.status)
                    runs = json.loads(r.read())["runs"]
                with urllib.request.urlopen(f"{base}/get-artifact?path=leaderboard.json&run_uuid={parent}",
                                            timeout=30) as r:
                    codes["leaderboard"].append(r.status)
                    table = json.loads(r.read())
        finally:
            stop.set()
            thread.join(timeout=60)
    assert codes["runs"] == [200] * N and codes["leaderboard"] == [200] * N
    assert len(runs) >= 3 and "dino" in json.dumps(table)
    assert logged["n"] > 50 and logged["errors"] == []  # the run really logged meanwhile, and never failed
