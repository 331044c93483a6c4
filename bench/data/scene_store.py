"""Rendered synthetic scenes kept on disk, so that every process of a run (each pretraining's loader worker, each
evaluation task) reads a split instead of rendering it again: 1.8 ms a scene on one core, 2.8 s for the 1536
train scenes, paid once per machine instead of once per process (docs/speed.md).

One uncompressed ``.npz`` per split and settings (no pickles): ``image`` N×S×S×3 uint8, ``mask`` N×S×S uint8 class
ids, ``instances`` N×S×S uint8 (0 = none, i+1 = the scene's i-th kept instance) and ``category`` N×M int16 (the
instances' COCO category ids, 0 = padding). Boxes and areas are recomputed from the instance masks exactly as the
renderer computes them. The file name is a digest of the settings, the split and the renderer's source, so a
change to either is a new file. Written atomically; an unreadable or mismatched file is rendered again.

Where: ``$BENCH_DATA_CACHE`` (``off`` disables the disk store), else ``$XDG_CACHE_HOME/bench/scenes``, else
``~/.cache/bench/scenes``. Failing to write it is never an error: the scenes are then rendered as before.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Callable

import numpy as np

from bench.checkpoint import atomic_write_bytes


def store_dir() -> str | None:
    """The folder of the disk store, or None when ``BENCH_DATA_CACHE=off``."""
    env = os.environ.get("BENCH_DATA_CACHE", "")
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bench", "scenes")


@functools.lru_cache(maxsize=8)
def _source_digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def store_path(settings: dict, split: str, renderer_file: str) -> str | None:
    """The file of one split's scenes for ``settings`` (the dataset's render settings) drawn by the code in
    ``renderer_file``, or None (disabled)."""
    folder = store_dir()
    if folder is None:
        return None
    key = json.dumps({"settings": settings, "split": split, "renderer": _source_digest(renderer_file)}, sort_keys=True)
    return os.path.join(folder, f"scenes-{split}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz")


def pack(scenes: list[dict]) -> dict[str, np.ndarray]:
    """Scenes as ``render_scene`` returns them (mask as uint8) -> the store's arrays."""
    n, size = len(scenes), scenes[0]["image"].shape[0]
    most = max((len(s["instances"]) for s in scenes), default=0)
    inst = np.zeros((n, size, size), np.uint8)
    cat = np.zeros((n, max(most, 1)), np.int16)
    for i, s in enumerate(scenes):
        for j, obj in enumerate(s["instances"]):
            inst[i][obj["mask"]] = j + 1
            cat[i, j] = obj["category_id"]
    return {"image": np.stack([s["image"] for s in scenes]), "mask": np.stack([s["mask"] for s in scenes]),
            "instances": inst, "category": cat}


def unpack(arrays: dict[str, np.ndarray], i: int) -> dict:
    """Scene ``i`` of the store's arrays, as ``render_scene`` returned it (boxes, areas from the masks)."""
    instances = []
    for j, category in enumerate(arrays["category"][i]):
        if category == 0:
            break
        m = arrays["instances"][i] == j + 1
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        instances.append({"category_id": int(category), "mask": m,
                          "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "area": float(m.sum()),
                          "iscrowd": 0})
    return {"image": arrays["image"][i], "mask": arrays["mask"][i], "instances": instances}


def load(path: str | None, n: int, size: int) -> dict[str, np.ndarray] | None:
    """The store's arrays if ``path`` holds ``n`` scenes of ``size`` px, else None."""
    if path is None or not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("image", "mask", "instances", "category")}
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if arrays["image"].shape != (n, size, size, 3) or arrays["mask"].shape != (n, size, size):
        return None
    return arrays


def save(path: str | None, arrays: dict[str, np.ndarray]) -> bool:
    """Write the store's arrays to ``path`` atomically; False (and nothing written) when that is not possible."""
    if path is None:
        return False
    try:
        atomic_write_bytes(path, lambda fh: np.savez(fh, **arrays))
    except OSError:
        return False
    return True


def materialize(path: str | None, n: int, size: int, render: Callable[[int], dict]) -> dict[str, np.ndarray]:
    """The split's arrays: read from ``path``, or rendered (``render(i)`` for i < n) and written there."""
    arrays = load(path, n, size)
    if arrays is None:
        arrays = pack([render(i) for i in range(n)])
        save(path, arrays)
    return arrays
