"""Storage folders given on the command line or in the config: created, or one clear line saying why not."""

from __future__ import annotations

import os

from bench.errors import BenchError


def ensure_writable(path: str, option: str) -> str:
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"{option} {path}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise BenchError(f"{option} {path}: not writable")
    return path
