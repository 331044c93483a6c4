"""``bench ui``: the MLflow UI on a bench tracking store, opened on the experiment with the leaderboard.

``python -m bench ui [--port P] [--tracking-uri URI] [--experiment NAME] [--host H] [--no-browser]`` checks
the store first (it must exist and be an MLflow SQLite store, not a corrupt or foreign file: one clear line
otherwise), checks that the port is free, then runs ``mlflow ui`` on that store bound to 127.0.0.1 (``--host``
only when asked: anything else exposes the runs to the network), waits until it answers ``/health``, and
prints two addresses: the experiment's runs table and the newest ``bench run``'s leaderboard artifact.
It opens the experiment in a browser only when a graphical session is present (a console browser would take
over the terminal). Ctrl-C stops the server.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

from bench.errors import BenchError
from bench.tracking import resolve_uri

DEFAULT_PORT = 5000
MLFLOW_TABLES = {"experiments", "runs", "metrics", "tags"}


def check_store(uri: str) -> str:
    """The resolved tracking URI, after checking that it names an existing, readable MLflow store."""
    uri = resolve_uri(uri or "")
    if uri.startswith(("http://", "https://", "databricks")):
        raise BenchError(f"--tracking-uri {uri}: that is already a tracking server; open it in a browser "
                         f"(bench ui serves a local sqlite:/// or file: store)")
    if uri.startswith("file:"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):]
        if not os.path.isdir(path):
            raise BenchError(f"--tracking-uri {uri}: no MLflow file store at {path} (run `python -m bench run` "
                             f"first, or pass the store of an earlier run)")
        return uri
    if not uri.startswith("sqlite:///"):
        return uri  # another SQLAlchemy database: mlflow reports its own connection errors
    path = uri[len("sqlite:///"):]
    if not os.path.exists(path):
        raise BenchError(f"--tracking-uri {uri}: no MLflow store at {path} (run `python -m bench run` first, "
                         f"or pass the store of an earlier run)")
    if not os.path.isfile(path):
        raise BenchError(f"--tracking-uri {uri}: {path} is not a file (expected an MLflow SQLite database)")
    try:
        # read-only: a foreign database must not be turned into an MLflow store by mlflow's migrations
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise BenchError(f"--tracking-uri {uri}: {path} is not a readable SQLite database, corrupt or another "
                         f"kind of file ({exc})") from None
    missing = MLFLOW_TABLES - tables
    if missing:
        raise BenchError(f"--tracking-uri {uri}: {path} is an SQLite database but not an MLflow store "
                         f"(no {', '.join(sorted(missing))} table)")
    return uri


def check_port(host: str, port: int) -> None:
    """BenchError unless ``port`` can be bound on ``host`` right now."""
    if not 1 <= int(port) <= 65535:
        raise BenchError(f"--port {port}: expected a TCP port 1..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BenchError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR as the server itself uses: a port in TIME_WAIT is free, one with a listener is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise BenchError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); another program "
                             f"uses it: pick another with --port") from None


def locate(uri: str, experiment: str) -> tuple[str, str | None]:
    """(experiment id, MLflow run id of the newest finished ``bench run`` parent, or None)."""
    from bench.tracking import Tracker

    tracker = Tracker(uri, experiment, create=False)
    try:
        runs = tracker.client.search_runs([tracker.experiment_id], "tags.`bench.kind` = 'run'",
                                          order_by=["attributes.start_time DESC"], max_results=1)
    except Exception as exc:  # noqa: BLE001 - a store mlflow can open but not query
        raise BenchError(f"--tracking-uri {uri}: cannot read runs ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    return tracker.experiment_id, (runs[0].info.run_id if runs else None)


def urls(host: str, port: int, experiment_id: str, run_id: str | None) -> dict:
    """Browser addresses: ``base``, ``experiment`` (runs table) and ``leaderboard`` (the parent run's table)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    base = f"http://{shown}:{port}"
    out = {"base": base, "experiment": f"{base}/#/experiments/{experiment_id}"}
    if run_id:
        out["run"] = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        out["leaderboard"] = f"{out['run']}/artifacts/leaderboard.json"
    return out


class UIServer:
    """``mlflow ui`` in a child process (its own session, so stopping it stops its workers too)."""

    def __init__(self, uri: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, log_path: str | None = None):
        self.uri, self.host, self.port = uri, host, int(port)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._own_log = log_path is None  # a temporary log, removed when the server stops

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", self.uri, "--host", self.host,
               "--port", str(self.port), "--workers", "1"]
        if self.uri.startswith("sqlite:///"):
            # where bench.tracking keeps artifacts, so the server never creates ./mlartifacts in the cwd
            root = os.path.join(os.path.dirname(self.uri[len("sqlite:///"):]), "mlartifacts")
            cmd += ["--artifacts-destination", root]
        return cmd

    def start(self, timeout: float = 120.0) -> UIServer:
        import tempfile

        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="bench-ui-", suffix=".log")
            os.close(fd)
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        probe = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)
        probe = f"[{probe}]" if ":" in probe else probe
        url = f"http://{probe}:{self.port}/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                raise BenchError(f"bench ui: mlflow ui exited with code {self.proc.returncode}: {self.log_tail()} "
                                 f"(log {self.log_path})")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise BenchError(f"bench ui: mlflow ui did not answer on {url} within {timeout:.0f}s: {tail}")

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                lines = [ln for ln in fh.read()[-8000:].decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        return (errors or lines or ["no output"])[-1].strip()[:300]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group of the server this object started
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
            if self._own_log and self.proc is not None and self.proc.returncode in (0, -signal.SIGTERM):
                os.unlink(self.log_path)

    def __enter__(self) -> UIServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve(tracking_uri: str | None, experiment: str = "bench", port: int = DEFAULT_PORT, host: str = "127.0.0.1",
          open_browser: bool = True, out=None) -> int:
    """Check the store and port, start the UI, print its addresses, block until Ctrl-C."""
    out = out or sys.stdout
    uri = check_store(tracking_uri or "")
    check_port(host, port)
    exp_id, run_id = locate(uri, experiment)
    server = UIServer(uri, host, port)
    server.start()
    links = urls(host, port, exp_id, run_id)
    print(f"MLflow UI for {uri} (experiment '{experiment}') at {links['experiment']}", file=out)
    if "leaderboard" in links:
        print(f"latest leaderboard: {links['leaderboard']}", file=out)
    else:
        print("no `bench run` in this experiment yet: the leaderboard appears once one finishes", file=out)
    print("Ctrl-C stops the server", file=out, flush=True)
    if open_browser and _has_display():
        import webbrowser

        webbrowser.open(links["experiment"])
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        code = server.proc.poll()
        tail = server.log_tail() if code not in (None, 0, -signal.SIGTERM) else ""
        server.stop()
    if tail:
        raise BenchError(f"bench ui: mlflow ui stopped with code {code}: {tail} (log {server.log_path})")
    return 0


__all__ = ["serve", "check_store", "check_port", "locate", "urls", "UIServer", "DEFAULT_PORT"]
