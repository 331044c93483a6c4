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
