"""Nothing lost: the MLflow store fails mid-run (the sqlite file removed; a real ``mlflow server`` over HTTP,
artifacts proxied, stopped during pretraining). Pretraining and evaluation finish with their results in the
run folder, the run says so, and the same command run again logs everything without recomputing."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from bench.cli import main
from tests.support import tiny_argv

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _ray_down():
    yield
    import ray

    ray.shutdown()


def _break_when_training(run_dir, action):
    """Call ``action`` once the first pretraining has logged a step (the store then fails mid-run)."""
    done = threading.Event()

    def watch():
        deadline = time.time() + 900
        path = os.path.join(run_dir, "dino", "metrics.jsonl")
        while time.time() < deadline:
            if os.path.exists(path) and os.path.getsize(path) > 0:
                action()
                done.set()
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    return done


def _check_logged(client, exp_name, run_dir):
    exp = client.get_experiment_by_name(exp_name)
    runs = client.search_runs([exp.experiment_id], "tags.`bench.run_id` = 'lost'")
    assert sorted(r.data.tags["bench.kind"] for r in runs) == ["eval", "eval", "pretrain", "run"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        if r.data.tags["bench.kind"] == "eval":
            method = "dino" if r.data.tags["method"] == "dino" else "random-init"
            res = json.load(open(os.path.join(run_dir, method, "eval_linseg.json")))
            assert r.data.metrics["linseg/miou"] == pytest.approx(res["metrics"]["miou"])
    pre = [r for r in runs if r.data.tags["bench.kind"] == "pretrain"][0]
    assert [m.step for m in client.get_metric_history(pre.info.run_id, "train/loss")] == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(pre.info.run_id, "checkpoint")] == ["checkpoint/final.pt"]
    return runs


def _rerun_logs_without_recomputing(argv, capsys):
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # messages may wrap at the console's width
    assert "pretrained 3 steps" not in out and "final checkpoint found), logging it" in out
    assert "not logged to MLflow" not in out
    return out


def test_sqlite_store_removed_mid_pretraining(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlruns.db"
    run_dir = tmp_path / "bench_runs" / "lost"
    argv = ["run", "--methods", "dino", "--tasks", "linseg", "--run-id", "lost", "--no-progress"] + tiny_argv()
    broken = _break_when_training(str(run_dir), lambda: os.remove(db))
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert broken.is_set()
    assert "cannot be written" in out and "not logged to MLflow" in out and "--run-id lost" in out
    for method in ("dino", "random-init"):
        assert (run_dir / method / "eval_linseg.json").exists()
    assert (run_dir / "dino" / "final.pt").exists() and (tmp_path / "results" / "lost.md").exists()
    _rerun_logs_without_recomputing(argv, capsys)  # into a new store at the same place
    from mlflow.tracking import MlflowClient

    _check_logged(MlflowClient(f"sqlite:///{db}"), "bench", str(run_dir))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp, port):
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "server-artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    _stop_server(proc)
    raise AssertionError("mlflow server did not come up")


def _stop_server(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: its own process group
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_http_server_outage_mid_run_loses_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    run_dir = tmp_path / "bench_runs" / "lost"
    argv = ["run", "--methods", "dino", "--tasks", "linseg", "--run-id", "lost", "--no-progress",
            "--tracking-uri", uri] + tiny_argv()
    server = {"proc": _start_server(tmp_path, port)}
    try:
        broken = _break_when_training(str(run_dir), lambda: _stop_server(server["proc"]))
        assert main(argv) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert broken.is_set() and "not logged to MLflow" in out
        assert (run_dir / "dino" / "eval_linseg.json").exists()
        server["proc"] = _start_server(tmp_path, port)  # the server is back, with its store
        _rerun_logs_without_recomputing(argv, capsys)
        from mlflow.tracking import MlflowClient

        runs = _check_logged(MlflowClient(uri), "bench", str(run_dir))
        pre = [r for r in runs if r.data.tags["bench.kind"] == "pretrain"][0]
        proxied = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "server-artifacts") for f in fs]
        assert any(p.endswith(os.path.join(pre.info.run_id, "artifacts", "checkpoint", "final.pt")) for p in proxied)
    finally:
        _stop_server(server["proc"])
