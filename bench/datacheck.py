"""``bench data check --data NAME``: build a dataset's splits and report what was found.

Prints the image count of each split (against the standard split size when the loader knows it), the
loader's notes (layout found, curated-list checksum, ...) and the class histogram of the labels after the
loader's mapping and resize/crop, over ``--max-images`` images of one split picked evenly (0 = all). A missing
root or a wrong layout is the loader's one-line error (exit code 2).
"""

from __future__ import annotations

import numpy as np

from bench.errors import BenchError

SPLITS = ("train", "val")


def _even_sample(n: int, limit: int) -> list[int]:
    if not limit or limit >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, limit).round()})


def class_histogram(dataset, indices: list[int]) -> np.ndarray:
    """Pixel counts per class; the last entry counts ignore (255) pixels."""
    k = dataset.num_classes
    counts = np.zeros(k + 1, dtype=np.int64)
    load = getattr(dataset, "load_mask", None)
    for i in indices:
        mask = load(i) if load is not None else dataset[i]["mask"]
        m = np.asarray(mask).reshape(-1)
        m = np.where((m >= 0) & (m < k), m, k)
        counts += np.bincount(m, minlength=k + 1)
    return counts


def check(name: str, cfg, split: str = "val", max_images: int = 500, out=print) -> dict:
    """Build both splits of dataset ``name`` with config ``cfg``, print the report, return it as a dict."""
    from bench.data import build_dataset

    datasets = {s: build_dataset(name, cfg, s) for s in SPLITS}  # errors here are the loaders' one-liners
    root = getattr(cfg, "root", "")
    out(f"{name}" + (f" (root {root})" if root else ""))
    report: dict = {"name": name, "splits": {}}
    for s, ds in datasets.items():
        expected = (getattr(ds, "expected_sizes", {}) or {}).get(s)
        tail = ""
        if expected:
            tail = f"  (standard {expected:,}: {'ok' if expected == len(ds) else 'different'})"
        out(f"  {s:5s} {len(ds):>9,} images{tail}")
        report["splits"][s] = {"images": len(ds), "expected": expected}
    for s, ds in datasets.items():
        for note in getattr(ds, "notes", []) or []:
            out(f"  note: {note}")
    ds = datasets[split]
    idx = _even_sample(len(ds), max_images)
    counts = class_histogram(ds, idx)
    total = max(int(counts.sum()), 1)
    names = list(getattr(ds, "class_names", [])) or [str(i) for i in range(ds.num_classes)]
    out(f"  class histogram over {split} ({len(idx):,} of {len(ds):,} images, pixels after the loader's "
        f"mapping and resize/crop):")
    width = max(len(n) for n in names + ["ignore (255)"])
    for c, n in enumerate(names):
        out(f"    {c:3d} {n:{width}s} {100.0 * counts[c] / total:6.2f}%  {int(counts[c]):>14,}")
    out(f"        {'ignore (255)':{width}s} {100.0 * counts[-1] / total:6.2f}%  {int(counts[-1]):>14,}")
    absent = [names[c] for c in range(len(names)) if counts[c] == 0]
    if absent:
        out(f"  classes with no pixels in this sample: {', '.join(absent)}")
    report["histogram"] = {"split": split, "images": len(idx), "counts": counts[:-1].tolist(),
                           "ignore": int(counts[-1])}
    return report


def cmd_data(args) -> int:
    """CLI entry: ``bench data check --data NAME [--set data.NAME.root=...]``."""
    from bench.config import build, load_config
    from bench.registry import DATASETS

    if args.action != "check":
        raise BenchError(f"data: unknown action '{args.action}'; valid: check")
    if args.split not in SPLITS:
        raise BenchError(f"--split {args.split}: expected one of {', '.join(SPLITS)}")
    if args.max_images < 0:
        raise BenchError(f"--max-images {args.max_images}: expected >= 0 (0 = all)")
    cfg = load_config(args.config, args.sets, {"run": {"data": args.data}})  # validates names and types
    cls = DATASETS.get(args.data)
    dcfg = build(cls.config_class, (cfg.user.get("data") or {}).get(args.data), f"data.{args.data}")
    check(args.data, dcfg, args.split, args.max_images)
    return 0
