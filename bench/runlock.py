"""One ``bench run`` at a time per run id: a lock file in the run folder.

``<storage>/<run_id>/run.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local disks and NFSv3+) and holds
who took it: pid, host, the process's start time (``/proc/<pid>/stat`` field 22, clock ticks since boot) and the
command line. It is removed on exit (normal, Ctrl-C, SIGTERM through ``bench.raycluster``'s handler). After a
crash (SIGKILL, power loss) the file stays; the next run recognises it as stale when it was taken on this host
and that pid is gone or now belongs to a process that started at another time (pid reuse), and takes it over.
A lock from another host cannot be checked from here: the message names the host and the file to delete.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from bench.errors import BenchError

LOCK_FILE = "run.lock"


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after its closing one
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_alive(info: dict) -> bool | None:
    """True/False for a lock taken on this host; None when it was taken on another host (cannot tell)."""
    if info.get("host") != socket.gethostname():
        return None
    pid = int(info.get("pid", -1))
    if pid <= 0 or not pid_alive(pid):
        return False
    started = info.get("start")
    now = process_start(pid)
    if started is not None and now is not None and int(started) != now:
        return False  # the pid was reused by another process
    return True


class RunLock:
    """``with RunLock(run_dir, run_id): ...``; raises BenchError when another live process holds the run."""

    def __init__(self, run_dir: str, run_id: str, option: str = "--run-id", say=None):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.run_id, self.option = run_id, option
        self.say = say or (lambda line: print(line, file=sys.stderr))
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid()),
                     "time": time.time(), "argv": sys.argv[:20]}
        self.held = False

    def _read(self) -> dict | None:
        try:
            with open(self.path) as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now, or garbage: treated below

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(self.info, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _take_over(self, stale: dict) -> None:
        """Move the stale file aside atomically; if another process replaced it meanwhile, put theirs back."""
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside) as fh:
                moved = json.load(fh)
        except (OSError, ValueError):
            moved = {}
        if moved and moved != stale:  # a fresh lock taken between our read and our rename: not ours to remove
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.unlink(aside)

    def acquire(self) -> RunLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(50):
            if self._create():
                self.held = True
                return self
            info = self._read()
            if info is None:
                continue  # released between our two calls: try again
            if info == {}:
                # empty or unreadable: a writer between create and fsync, or a crash right there
                time.sleep(0.1)
                if self._read() == {} and time.time() - os.path.getmtime(self.path) > 10:
                    self._take_over({})
                continue
            alive = holder_alive(info)
            if alive is False:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
                self.say(f"{self.option} {self.run_id}: the run started {when} (pid {info.get('pid')}) ended without "
                         f"releasing its lock; taking it over")
                self._take_over(info)
                continue
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
            where = f"pid {info.get('pid')} on {info.get('host')}, since {when}"
            hint = ("wait for it to finish, or pick another --run-id" if alive else
                    f"if that run is gone, delete {self.path}")
            raise BenchError(f"{self.option} {self.run_id}: this run is already running ({where}; lock {self.path}); "
                             f"{hint}")
        raise BenchError(f"{self.option} {self.run_id}: could not take the run lock {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._read() == self.info:  # only our own lock: never one a later run took over
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["RunLock", "LOCK_FILE", "process_start", "holder_alive"]
