"""One run at a time per run id (bench.runlock): refused while held, released on exit, stale after a crash."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bench.errors import BenchError
from bench.runlock import LOCK_FILE, RunLock, holder_alive, process_start

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLD = ("import sys, time; from bench.runlock import RunLock\n"
        "lock = RunLock(sys.argv[1], 'X').acquire(); print('held', flush=True); time.sleep(600)")


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env={**os.environ, "PYTHONPATH": REPO},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_while_the_first_runs_is_refused_in_one_line(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(BenchError) as exc:
            RunLock(str(tmp_path), "X").acquire()
        line = str(exc.value)
        assert "\n" not in line and line.startswith("--run-id X: this run is already running")
        assert f"pid {proc.pid} on {socket.gethostname()}" in line and "pick another --run-id" in line
    finally:
        proc.kill()
        proc.wait()


def test_lock_released_on_exit_and_stale_after_sigkill(tmp_path):
    with RunLock(str(tmp_path), "X"):
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()  # released

    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)  # a crash: the file stays
    proc.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid
    said = []
    with RunLock(str(tmp_path), "X", say=said.append) as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock.held
    assert len(said) == 1 and "ended without releasing its lock; taking it over" in said[0]
    assert not list(tmp_path.glob("run.lock*"))


def test_reused_pid_with_another_start_time_is_stale_and_other_hosts_cannot_be_judged():
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}
    assert holder_alive(me) is True
    if me["start"] is not None:
        assert holder_alive({**me, "start": me["start"] - 1}) is False  # same pid, another process
    assert holder_alive({**me, "pid": 2 ** 22 + 12345}) is False
    assert holder_alive({**me, "host": "elsewhere.example"}) is None


def test_lock_from_another_host_says_which_file_to_delete(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-7", "start": 1, "time": time.time()}))
    with pytest.raises(BenchError) as exc:
        RunLock(str(tmp_path), "X").acquire()
    assert "pid 1 on node-7" in str(exc.value) and f"delete {tmp_path / LOCK_FILE}" in str(exc.value)


def test_release_never_removes_a_lock_taken_over_by_another_run(tmp_path):
    lock = RunLock(str(tmp_path), "X").acquire()
    other = {"pid": 99, "host": "h", "start": 1, "time": 1.0}
    (tmp_path / LOCK_FILE).write_text(json.dumps(other))
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == other


def test_cli_second_bench_run_same_id_refuses(tmp_path, capsys, monkeypatch):
    from bench.cli import main

    monkeypatch.chdir(tmp_path)
    proc = _holder(tmp_path / "bench_runs" / "X")
    try:
        assert main(["run", "--run-id", "X", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --run-id X: this run is already running") and "\n" not in err
    finally:
        proc.kill()
        proc.wait()
