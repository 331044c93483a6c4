"""Atomic checkpoint files: written to a temporary name, fsynced, then renamed into place.

A reader never sees a half-written file: either the previous checkpoint or the new one exists.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile

import torch

from bench.errors import BenchError


def atomic_write_bytes(path: str, write) -> None:
    """Call ``write(fileobj)`` on a temp file in the target folder, fsync, then ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_torch(obj: dict, path: str) -> None:
    atomic_write_bytes(path, lambda fh: torch.save(obj, fh))


def save_json(obj, path: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(json.dumps(obj, indent=2, default=str).encode()))


def load_torch(path: str) -> dict:
    """Load a checkpoint with ``weights_only=True``; a corrupted file is one clear error."""
    if not os.path.isfile(path):
        raise BenchError(f"checkpoint {path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BenchError(f"checkpoint {path}: corrupted or not a torch checkpoint ({type(exc).__name__}); "
                         f"delete it to start that stage again") from None


def load_json(path: str):
    with open(path) as fh:
        return json.load(fh)


_STEP = re.compile(r"step_(\d+)\.pt$")


def step_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(step, path) of every step checkpoint in ``folder``, oldest first."""
    out = []
    for p in glob.glob(os.path.join(folder, "step_*.pt")):
        m = _STEP.search(p)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def prune(folder: str, keep: int = 2) -> None:
    for _, path in step_checkpoints(folder)[:-keep]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


CORRUPT_SUFFIX = ".corrupt"


def load_latest_step(folder: str, warn=None) -> dict | None:
    """The newest step checkpoint in ``folder`` that loads, or None when there is none.

    A newer one that is truncated or corrupt (a disk that filled up, a copy cut short: the atomic writes above
    never leave one themselves) is renamed to ``<name>.corrupt``, kept for inspection, and ``warn`` is called
    with one line; the previous checkpoint is tried next, so a resume loses at most ``checkpoint_every`` steps
    more instead of failing. Several Ray Train workers may call this at once: each ends on the same file.
    """
    for step, path in reversed(step_checkpoints(folder)):
        try:
            state = load_torch(path)
            if not isinstance(state, dict) or int(state.get("step", -1)) != step:
                raise BenchError(f"checkpoint {path}: not a step checkpoint of step {step}")
            return state
        except (BenchError, TypeError, ValueError) as exc:
            try:
                os.replace(path, path + CORRUPT_SUFFIX)
            except FileNotFoundError:
                pass  # another worker moved it first
            older = [s for s, _ in step_checkpoints(folder) if s < step]
            then = f"resuming from step {older[-1]}" if older else "no older checkpoint: starting from step 0"
            line = f"warning: {str(exc).split(';')[0]}, moved to {os.path.basename(path)}{CORRUPT_SUFFIX}; {then}"
            (warn or (lambda msg: print(msg, flush=True)))(line)
    return None
