"""``bench ui`` ends with its parent: the signal it gets reaches the server's whole process group, and it returns
only once no process of that group is left and the port is free, however it was started.

A shell starts a background job (``bench ui &``) with SIGINT and SIGQUIT ignored; the server inherited that, so
forwarding Ctrl-C alone left MLflow's job runner and huey consumers (which the runner restarts) running with the
port taken. The fast test uses a stand-in server with the same shape (a leader answering /health, children in its
group that ignore SIGINT and are restarted when they die); the slow one the real ``python -m bench ui``.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from bench.procgroup import end_group, group_members

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAKE_SERVER = textwrap.dedent('''
    import http.server, os, signal, subprocess, sys, threading, time
    port = int(sys.argv[1])
    child = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"]
    kids = [subprocess.Popen(child) for _ in range(3)]
    def respawn():  # like MLflow's job runner: a consumer that dies is started again
        while True:
            for i, k in enumerate(kids):
                if k.poll() is not None:
                    kids[i] = subprocess.Popen(child)
            time.sleep(0.05)
    threading.Thread(target=respawn, daemon=True).start()
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"OK")
        def log_message(self, *a):
            pass
    http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
''')

DRIVER = textwrap.dedent('''
    import sys
    from bench import ui
    fake, store, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ui.UIServer.command = lambda self: [sys.executable, fake, str(self.port)]
    ui.locate = lambda uri, experiment: ("0", None)
    sys.exit(ui.serve(store, port=port, open_browser=False))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _like_a_shell_background_job():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)


def _wait_health(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"no server on port {port} after {timeout}s")


def _server_group(port: int) -> int:
    """The process group of whatever listens on ``port`` (the stand-in or mlflow), found through /proc."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                f = line.split()
                if int(f[1].split(":")[1], 16) == port and f[3] == "0A":  # LISTEN
                    inode = f[9]
    assert inode, f"nothing listens on {port}"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return os.getpgid(int(pid))
            except OSError:
                continue
    raise AssertionError(f"no process holds the socket of port {port}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop_and_check(proc, port: int, sig: int, within: float) -> None:
    group = _server_group(port)
    assert group != proc.pid and len(group_members(group)) >= 2  # the server runs in its own group, with children
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=within)
    finally:
        if proc.poll() is None:
            proc.kill()
        end_group(group, signal.SIGKILL, (5.0,))  # never leave the server behind, whatever the outcome
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout.read() if proc.stdout else ""
    assert group_members(group) == [], f"left running in group {group} after {elapsed:.1f}s"
    assert _port_free(port)


@pytest.fixture()
def store(tmp_path):
    import sqlite3

    path = tmp_path / "mlruns.db"
    con = sqlite3.connect(path)
    for table in ("experiments", "runs", "metrics", "tags"):
        con.execute(f"CREATE TABLE {table} (x TEXT)")
    con.commit()
    con.close()
    return f"sqlite:///{path}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_ui_started_as_background_job_ends_its_whole_server_group(tmp_path, store, sig):
    fake, driver = tmp_path / "fake_server.py", tmp_path / "driver.py"
    fake.write_text(FAKE_SERVER)
    driver.write_text(DRIVER)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(driver), str(fake), store, str(port)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_like_a_shell_background_job)
    try:
        _wait_health(port, 60)
    except AssertionError:
        proc.kill()
        raise
    # the stand-in's children ignore SIGINT and are restarted: only escalation to the whole group ends them
    _stop_and_check(proc, port, sig, within=30)


def test_end_group_escalates_past_ignored_signals():
    proc = subprocess.Popen([sys.executable, "-c", "import signal, subprocess, sys, time\n"
                             "signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                             "time.sleep(600)"], start_new_session=True)
    time.sleep(1.0)
    assert len(group_members(proc.pid)) == 2
    t0 = time.monotonic()
    assert end_group(proc.pid, signal.SIGINT, (0.5, 0.5, 5.0), reap=proc.poll)
    assert time.monotonic() - t0 < 8 and group_members(proc.pid) == []
    assert proc.wait(timeout=5) == -signal.SIGKILL


@pytest.mark.slow
def test_real_bench_ui_background_job_sigterm_frees_port_and_group(tmp_path):
    from bench.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    Tracker(uri, "bench").start_run("run-a", {"bench.kind": "run", "bench.run_id": "a"})
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench", "ui", "--tracking-uri", uri, "--port", str(port),
                             "--no-browser"], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_like_a_shell_background_job)
    try:
        _wait_health(port, 180)
    except AssertionError:
        proc.kill()
        raise
    _stop_and_check(proc, port, signal.SIGTERM, within=60)
