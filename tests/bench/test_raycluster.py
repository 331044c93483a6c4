"""A local run starts its own Ray (slow: real ``ray start --head`` and real ``bench run`` processes).

Every Ray here lives in a private temp folder (``RAY_TMPDIR``), so its address file never reaches another
user's runs on this machine, and is stopped by process id, never with ``ray stop`` (which ends every Ray of the
user on the machine).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.support import tiny_argv

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        ppid = int(raw[raw.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(pid))
    return kids


def descendants(pid: int) -> set[int]:
    kids, out, todo = _children(), set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


def alive(pids) -> list[int]:
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        if raw[raw.rfind(")") + 2:].split()[0] not in ("Z", "X"):
            out.append(p)
    return out


def _kill_all(pids) -> None:
    for p in alive(pids):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture()
def ray_tmp():
    """A short private Ray temp root (Unix socket paths must stay under 108 characters)."""
    root = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _env(ray_tmp: str) -> dict:
    return {**os.environ, "PYTHONPATH": REPO, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}


def _start_head(ray_tmp: str):
    """``ray start --head --block`` in its own session; returns (process, GCS address) once the address file is up."""
    proc = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port", "0",
                             "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats"],
                            env=_env(ray_tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address_file = os.path.join(ray_tmp, "ray", "ray_current_cluster")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not os.path.exists(address_file):
        assert proc.poll() is None, "ray start --head failed"
        time.sleep(0.5)
    assert os.path.exists(address_file)
    time.sleep(2.0)
    return proc, open(address_file).read().strip()


def _bench_run(tmp_path, ray_tmp, run_id):
    return subprocess.run([sys.executable, "-m", "bench", "run", "--methods", "dino", "--tasks", "linseg", "--run-id",
                           run_id, "--no-progress", "--no-baseline"] + tiny_argv(), cwd=tmp_path, env=_env(ray_tmp),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("head", ["running", "killed"])
def test_plain_bench_run_starts_its_own_ray_next_to_a_ray_start_head(tmp_path, ray_tmp, head):
    proc, address = _start_head(ray_tmp)
    tree = descendants(proc.pid) | {proc.pid}
    try:
        if head == "killed":  # ended by a signal: its address file stays in Ray's temp folder
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(1.0)
            _kill_all(tree)
            assert os.path.exists(os.path.join(ray_tmp, "ray", "ray_current_cluster"))
        res = _bench_run(tmp_path, ray_tmp, f"own-{head}")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert "Leaderboard" in res.stdout and "Traceback" not in res.stderr
        if head == "running":  # the run did not join the head: the head never saw a second driver
            probe = subprocess.run([sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1], "
                                    "logging_level='ERROR'); from ray._private.state import state; "
                                    "print(len(state.job_table()))", address], env=_env(ray_tmp),
                                   capture_output=True, text=True, timeout=120)
            assert probe.stdout.strip().splitlines()[-1] == "1", probe.stdout + probe.stderr
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        _kill_all(tree | descendants(proc.pid))


KILL_CASES = [(sig, mode) for sig in (signal.SIGKILL, signal.SIGTERM) for mode in ("never", "auto")]


def test_kill_case_list_is_not_empty():
    assert len(KILL_CASES) == 4


@pytest.mark.parametrize("sig,local_mode", KILL_CASES)
def test_local_ray_of_a_killed_bench_run_does_not_outlive_it(tmp_path, ray_tmp, sig, local_mode):
    """``never``: killed while a Ray Train worker group pretrains (Ray's processes, the worker, its loader);
    ``auto``: while the loop runs in the bench process itself (Ray not started yet; its DataLoader worker)."""
    argv = [sys.executable, "-m", "bench", "run", "--methods", "dino", "--tasks", "linseg", "--run-id", "k",
            "--no-progress", "--no-baseline"] + tiny_argv("--set", "pretrain.steps_per_epoch=200",
                                                          "--set", f"pretrain.local_mode={local_mode}")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "bench_runs" / "k" / "dino" / "metrics.jsonl"
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 900  # a loaded shared machine needs minutes to get there
        while time.monotonic() < deadline and not metrics.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        assert metrics.exists(), "pretraining never started"
        tree = descendants(proc.pid)
        assert len(tree) >= (3 if local_mode == "never" else 1)  # gcs_server, raylet, workers... / the loader
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and alive(tree):
            time.sleep(0.5)
        assert alive(tree) == [], f"left running after {sig!r}: {alive(tree)}"
        if sig == signal.SIGTERM:  # like Ctrl-C: one line, exit 130, no core-worker stack dump
            assert proc.returncode == 130, err[-2000:]
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert lines[-1].startswith("error: interrupted") and "SIGTERM received" not in err, err[-2000:]
            assert not (tmp_path / "bench_runs" / "k" / "run.lock").exists()  # the run lock was released
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_all(tree)
