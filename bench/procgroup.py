"""Ending a child's whole process group, and knowing when it is really gone.

``mlflow ui`` is a tree: the CLI, its uvicorn server, a job runner and the job runner's huey consumers (which it
restarts when they die). Signalling the leader alone, or only waiting for it, leaves the rest running and the
port taken. ``end_group`` signals every process of the group, escalates (the given signal, then SIGTERM, then
SIGKILL), and returns only when no live process of the group is left (zombies do not count: they hold no port).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is ``pgid``."""
    if sys.platform.startswith("linux") and os.path.isdir("/proc"):
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    raw = fh.read().decode(errors="replace")
            except OSError:
                continue
            fields = raw[raw.rfind(")") + 2:].split()  # fields[0] = state, fields[2] = pgrp
            if len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                out.append(int(entry))
        return out
    try:  # elsewhere: whether the group has any process at all (zombies included)
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    return [pgid]


def end_group(pgid: int, first: int = signal.SIGTERM, grace: tuple[float, ...] = (10.0, 5.0, 5.0),
              reap: Callable[[], object] | None = None, poll_s: float = 0.1) -> bool:
    """Signal group ``pgid`` with ``first``, then SIGTERM, then SIGKILL, each after its ``grace`` seconds;
    True once no process of the group is left. ``reap`` (e.g. ``Popen.poll``) collects our own child."""
    plan = [first] + [s for s in (signal.SIGTERM, signal.SIGKILL) if s != first]
    for sig, wait in zip(plan, list(grace) + [grace[-1]] * len(plan)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if reap is not None:
                reap()
            if not group_members(pgid):
                return True
            time.sleep(poll_s)
    if reap is not None:
        reap()
    return not group_members(pgid)


__all__ = ["group_members", "end_group"]


# ------------------------------------------------------------------------------------ the reaper
def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live, non-zombie ``pid``; None otherwise (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def tree(roots: dict[int, int]) -> dict[int, int]:
    """``roots`` (pid -> start time) still alive as the same processes, and all their descendants."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents.setdefault(st[0], []).append(int(entry))
                starts[int(entry)] = st[1]
    out = {p: s for p, s in roots.items() if starts.get(p) == s}
    todo = list(out)
    while todo:
        for kid in parents.get(todo.pop(), []):
            if kid not in out:
                out[kid] = starts[kid]
                todo.append(kid)
    return out


def reap_when_gone(owner: int, owner_start: int, roots: dict[int, int], poll_s: float = 2.0) -> int:
    """Watch ``owner``; once it is gone, end every process of ``roots``' trees as last seen (SIGTERM, then
    SIGKILL 5 s later); returns how many were signalled. Returns 0 at once when the roots end first (a
    ``ray.shutdown`` did the job)."""
    seen: dict[int, int] = {}
    while True:
        st = _stat(owner)
        gone = st is None or st[1] != owner_start
        now = tree(roots)
        seen.update(now)
        if gone:  # what the roots started may already be orphaned (not below them any more): use what we saw
            break
        if not now:
            return 0
        time.sleep(poll_s)
    victims = {p: s for p, s in seen.items() if (_stat(p) or (0, -1))[1] == s}
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        for pid, start in victims.items():
            if (_stat(pid) or (0, -1))[1] == start:  # the same process, not a reused pid
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any((_stat(p) or (0, -1))[1] == s for p, s in victims.items()):
            time.sleep(0.2)
    return len(victims)


def start_reaper(roots: list[int]):
    """A detached watcher (``python -m bench.procgroup``) that ends ``roots``' process trees if this process dies
    without doing it itself (SIGKILL, OOM killer). Linux only; returns the Popen or None."""
    import subprocess

    me = _stat(os.getpid()) if sys.platform.startswith("linux") else None
    if me is None or not roots:
        return None
    spec = ",".join(f"{p}:{(_stat(p) or (0, -1))[1]}" for p in roots if _stat(p) is not None)
    return subprocess.Popen([sys.executable, "-m", "bench.procgroup", str(os.getpid()), str(me[1]), spec],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


if __name__ == "__main__":  # the reaper: python -m bench.procgroup OWNER_PID OWNER_START PID:START,...
    _roots = {int(p): int(s) for p, s in (item.split(":") for item in sys.argv[3].split(",") if item)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the owner's terminal is the owner's to handle
    reap_when_gone(int(sys.argv[1]), int(sys.argv[2]), _roots)
