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
