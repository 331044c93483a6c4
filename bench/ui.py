"""``bench ui``: the MLflow UI on a bench tracking store, opened on the experiment with the leaderboard.

``python -m bench ui [--port P] [--tracking-uri URI] [--experiment NAME] [--host H] [--no-browser]
[--screenshot FILE.png]``:

1. checks the store (it must exist and be an MLflow SQLite store, opened read-only for the check, so a
   corrupt or foreign file gives one clear line and is never turned into an MLflow store), then the port;
2. runs ``mlflow ui`` on that store in its own process group, bound to 127.0.0.1 (``--host`` only when the
   user asks: anything else exposes the runs to the network), and waits until ``/health`` answers;
3. prints the experiment address, which opens the runs page in MLflow's "Model training" view comparing the
   ``leaderboard.json`` tables of the bench runs (``compareRunsMode=ARTIFACT``), and the newest bench run's
   leaderboard artifact; opens the experiment in a browser only in a graphical session (a console browser
   would take over the terminal); Ctrl-C, SIGTERM or SIGHUP stops the server: the signal is forwarded to the
   server's whole process group (uvicorn, MLflow's job runner and its huey consumers), escalated to SIGTERM and
   SIGKILL when ignored, and ``bench ui`` returns only once no process of that group is left, so the port is
   free. This holds however ``bench ui`` was started: a shell's background job inherits SIGINT and SIGQUIT as
   ignored, and the server is started with default dispositions for the signals it must obey.

``--screenshot FILE.png`` instead captures the newest leaderboard with headless Chromium and exits.
The Chromium helpers (``find_chromium``, ``dump_dom``, ``screenshot``) drive Debian's ``chromium`` package
(``apt-get install chromium``) with the flags a sandboxed container needs; the browser test uses them too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from bench.errors import BenchError
from bench.procgroup import end_group, group_members
from bench.tracking import resolve_uri

DEFAULT_PORT = 5000
MLFLOW_TABLES = {"experiments", "runs", "metrics", "tags"}
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_INSTALL = "apt-get install chromium (Debian/Ubuntu)"
# headless, in a container without a user namespace sandbox, GPU or network beyond localhost
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--disable-dev-shm-usage")


# ----------------------------------------------------------------------------------------------- checks
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
        # SO_REUSEADDR as the server itself sets it: a port in TIME_WAIT is free, one with a listener is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise BenchError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); another program "
                             f"uses it: pick another with --port") from None


def locate(uri: str, experiment: str) -> tuple[str, str | None]:
    """(experiment id, MLflow run id of the newest ``bench run`` parent run, or None)."""
    from bench.tracking import Tracker

    tracker = Tracker(uri, experiment, create=False)
    try:
        runs = tracker.client.search_runs([tracker.experiment_id], "tags.`bench.kind` = 'run'",
                                          order_by=["attributes.start_time DESC"], max_results=1)
    except Exception as exc:  # noqa: BLE001 - a store mlflow can open but not query
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise BenchError(f"--tracking-uri {uri}: cannot read its runs ({type(exc).__name__}: {first})") from None
    return tracker.experiment_id, (runs[0].info.run_id if runs else None)


def urls(host: str, port: int, experiment_id: str, run_id: str | None) -> dict:
    """Browser addresses: ``base``; ``experiment`` (runs page, the bench runs' leaderboard tables side by side);
    with a run: ``run`` (its overview: metrics, tags, child runs) and ``leaderboard`` (its table artifact)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    base = f"http://{shown}:{port}"
    view = "workflowType=machine_learning"  # MLflow 3 opens experiments in its GenAI view otherwise
    out = {"base": base, "experiment": f"{base}/#/experiments/{experiment_id}/runs?{view}&compareRunsMode=ARTIFACT"}
    if run_id:
        run = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        out["run"] = f"{run}?{view}"
        out["leaderboard"] = f"{run}/artifacts/leaderboard.json?{view}"
    return out


# ----------------------------------------------------------------------------------------------- server
class UIServer:
    """``mlflow ui`` in a child process group; ``stop()`` (or leaving the ``with`` block) ends it."""

    def __init__(self, uri: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT):
        self.uri, self.host, self.port = uri, host, int(port)
        self.proc: subprocess.Popen | None = None
        self.log_path = ""
        self._log = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", self.uri, "--host", self.host,
               "--port", str(self.port), "--workers", "1"]
        if self.uri.startswith("sqlite:///"):
            # where bench.tracking keeps artifacts, so the server never creates ./mlartifacts in the cwd
            root = os.path.join(os.path.dirname(self.uri[len("sqlite:///"):]), "mlartifacts")
            cmd += ["--artifacts-destination", root]
        return cmd

    def start(self, timeout: float = 180.0) -> UIServer:
        fd, self.log_path = tempfile.mkstemp(prefix="bench-ui-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        env = dict(os.environ, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_default_signals)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(keep_log=True)
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        probe = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)
        probe = f"[{probe}]" if ":" in probe else probe
        url = f"http://{probe}:{self.port}/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"bench ui: mlflow ui exited with code {self.proc.returncode}: {self.log_tail()} "
                                 f"(log {self.log_path})")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise BenchError(f"bench ui: mlflow ui did not answer on {url} within {timeout:.0f}s: {self.log_tail()} "
                         f"(log {self.log_path})")

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                lines = [ln for ln in fh.read()[-8000:].decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        errors = [ln for ln in lines if "Error" in ln or "error" in ln]
        return (errors or lines or ["no output"])[-1].strip()[:300]

    def stop(self, keep_log: bool = False, sig: int = signal.SIGINT) -> None:
        """End the process group this object started: ``sig`` first (Ctrl-C by default: ``mlflow ui`` then
        stops its uvicorn worker), SIGTERM if that is ignored, SIGKILL last; return once no process of the group
        is left (the leader may be gone while its job runner's consumers still run). The log is removed unless
        ``keep_log``."""
        if self.proc is not None and (self.proc.poll() is None or group_members(self.proc.pid)):
            if not end_group(self.proc.pid, sig, (10.0, 5.0, 5.0), reap=self.proc.poll):
                print(f"bench ui: processes of group {self.proc.pid} are still running after SIGKILL: "
                      f"{group_members(self.proc.pid)}", file=sys.stderr)
            self.proc.poll()
        if self._log is not None:
            self._log.close()
            self._log = None
            if not keep_log and self.log_path:
                os.unlink(self.log_path)

    def __enter__(self) -> UIServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------- browser
def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary (``$CHROMIUM`` first), or None."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else shutil.which(env)
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(url: str, args: list[str], width: int, height: int, budget_ms: int, timeout: float):
    exe = find_chromium()
    if exe is None:
        raise BenchError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}, $CHROMIUM); install it: "
                         f"{CHROMIUM_INSTALL}")
    with tempfile.TemporaryDirectory(prefix="bench-chromium-") as profile:  # a fresh profile every time
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--virtual-time-budget={budget_ms}", *args, url]
        # its own process group: on a timeout the renderer and zygote children are stopped with it
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=profile,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise BenchError(f"chromium did not finish loading {url} within {timeout:.0f}s") from None
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def dump_dom(url: str, width: int = 1600, height: int = 1000, budget_ms: int = 20000, timeout: float = 180.0) -> str:
    """The page's DOM after its scripts ran (virtual time ``budget_ms``), as HTML text."""
    res = _chromium(url, ["--dump-dom"], width, height, budget_ms, timeout)
    if res.returncode != 0 or not res.stdout:
        raise BenchError(f"chromium --dump-dom {url} failed (exit {res.returncode}): "
                         f"{res.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
    return res.stdout.decode(errors="replace")


def page_text(html: str) -> str:
    """Visible text of a dumped page: scripts, styles and tags removed, whitespace collapsed."""
    import html as html_mod
    import re

    text = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S | re.I)
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", html_mod.unescape(text)).strip()


def screenshot(url: str, path: str, width: int = 1800, height: int = 900, budget_ms: int = 20000,
               timeout: float = 180.0) -> str:
    """PNG screenshot of ``url`` at ``path`` (absolute path returned)."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise BenchError(f"--screenshot {path}: folder {folder} does not exist")
    res = _chromium(url, [f"--screenshot={path}"], width, height, budget_ms, timeout)
    if res.returncode != 0 or not os.path.isfile(path):
        raise BenchError(f"chromium --screenshot {url} failed (exit {res.returncode}): "
                         f"{res.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
    return path


# ----------------------------------------------------------------------------------------------- command
def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve(tracking_uri: str | None, experiment: str = "bench", port: int = DEFAULT_PORT, host: str = "127.0.0.1",
          open_browser: bool = True, screenshot_path: str | None = None, out=None) -> int:
    """Check the store and the port, start the UI, print its addresses; block until Ctrl-C or SIGTERM
    (or, with ``screenshot_path``, capture the newest leaderboard and stop)."""
    out = out or sys.stdout
    uri = check_store(tracking_uri or "")
    check_port(host, port)
    exp_id, run_id = locate(uri, experiment)
    if screenshot_path and find_chromium() is None:
        raise BenchError(f"--screenshot needs Chromium; install it: {CHROMIUM_INSTALL}")
    if screenshot_path and run_id is None:
        raise BenchError(f"--screenshot: experiment '{experiment}' has no bench run with a leaderboard yet")
    links = urls(host, port, exp_id, run_id)
    received: list[int] = []
    previous = _catch_stop_signals(received)  # before the server starts: it inherits default dispositions
    server = UIServer(uri, host, port)
    try:
        server.start()
        if screenshot_path:
            path = screenshot(links["leaderboard"], screenshot_path)
            print(f"wrote {path} ({links['leaderboard']})", file=out)
            return 0
        print(f"MLflow UI for {uri} (experiment '{experiment}'): {links['experiment']}", file=out)
        if run_id:
            print(f"latest leaderboard: {links['leaderboard']}", file=out)
        else:
            print("no `bench run` in this experiment yet: its leaderboard appears here once one finishes", file=out)
        print("Ctrl-C stops the server", file=out, flush=True)
        if open_browser and _has_display():
            import webbrowser

            webbrowser.open(links["experiment"])
        code = server.proc.wait()
        raise BenchError(f"bench ui: mlflow ui stopped by itself (exit {code}): {server.log_tail()}")
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP, also while the server was starting
        return 0
    finally:
        # forward the signal that stopped us (SIGINT for Ctrl-C) to the whole group, and wait until it is empty;
        # a second signal meanwhile must not cut the wait short
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            server.stop(sig=received[0] if received else signal.SIGINT)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _catch_stop_signals(received: list) -> dict:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt (leaving through ``finally`` stops the server), each
    recorded in ``received``; also when inherited as ignored (a shell's background job): a user who sends one
    means it. Returns the previous handlers (empty outside the main thread, where signals cannot be set)."""
    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        for sig, old in previous.items():
            signal.signal(sig, old)
        return {}
    return previous


def _default_signals() -> None:
    """In the server's process, before exec: default SIGINT/SIGQUIT/SIGTERM/SIGHUP, whatever we inherited."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


__all__ = ["serve", "check_store", "check_port", "locate", "urls", "UIServer", "find_chromium", "dump_dom",
           "page_text", "screenshot", "DEFAULT_PORT", "CHROMIUM_INSTALL"]
