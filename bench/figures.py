"""Pictures for MLflow: PCA-to-RGB of dense features and predictions next to ground truth.

The drawing half (``pca_rgb``, ``mask_rgb``, ``feature_figure``, ``feature_grid``, ``prediction_figure``: arrays
in, arrays or PNG bytes out) lives in ``bench.plots`` and is re-exported here under the same names; its
docstring says what each picture shows and how its colours are fixed. This module adds the harness side:

- ``method_feature_figure``: a method's (or the untrained backbone's) features on a few fixed validation images
  of the evaluation dataset, written to ``<out_dir>/features_pca.png`` and ``.npz`` (the npz feeds the
  side-by-side grid that ``bench run`` logs on its parent run).
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

from bench.plots import (  # noqa: F401 (the drawing half, re-exported: bench.figures keeps its names)
    IGNORE, PALETTE, _figure, _layout, _png, _to_hwc, feature_figure, feature_grid, mask_rgb, pca_components,
    pca_rgb, pca_rgb_list, prediction_figure,
)


def fixed_indices(n_items: int, count: int) -> list[int]:
    """``count`` evenly spaced indices of 0..n_items-1 (the same images for every method and run)."""
    if n_items <= 0:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, n_items - 1, min(count, n_items))})


def _normalize(img_u8: torch.Tensor) -> torch.Tensor:
    from bench.data import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=img_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img_u8.device).view(1, 3, 1, 1)
    return (img_u8.float() / 255.0 - mean) / std


def method_feature_figure(method: str, final_path: str | None, spec: dict, out_dir: str, use_gpu: bool = False,
                          n_images: int = 4) -> str:
    """PCA picture of a method's dense features on ``n_images`` fixed val images of the evaluation dataset.

    Writes ``<out_dir>/features_pca.png`` and ``features_pca.npz`` (``image_<i>``: H×W×3 uint8,
    ``pca_<i>``: h×w×3 uint8) atomically and returns the PNG path. Runs wherever ``bench run`` evaluates
    (a Ray task, GPU if the evaluation has one).
    """
    from bench import checkpoint as ckpt
    from bench.evaluate import feature_fn, load_eval_data

    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    data = load_eval_data(spec["eval_dataset"], spec["eval_dataset_cfg"])
    feats_fn, _module = feature_fn(method, final_path, spec, device)
    images, feats = [], []
    with torch.no_grad():
        for i in fixed_indices(len(data.val), n_images):
            img = data.val[i]["image"]
            images.append(_to_hwc(img))
            feats.append(feats_fn(_normalize(img[None].to(device))).float()[0].cpu())
    maps = pca_rgb_list(feats)
    png = feature_figure(images, feats, name=method,
                         title=f"{method}: PCA of dense features ({spec['eval_dataset']} val)")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "features_pca.png")
    arrays = {f"image_{i}": a for i, a in enumerate(images)} | {f"pca_{i}": m for i, m in enumerate(maps)}
    npz = io.BytesIO()
    np.savez_compressed(npz, **arrays)
    ckpt.atomic_write_bytes(os.path.join(out_dir, "features_pca.npz"), lambda fh: fh.write(npz.getvalue()))
    ckpt.atomic_write_bytes(path, lambda fh: fh.write(png))
    return path


def grid_from_npz(paths: dict, title: str = "") -> bytes | None:
    """Side-by-side grid (method -> ``features_pca.npz``) of pictures made by ``method_feature_figure``;
    None when no file exists. Images come from the first file (every method saw the same images)."""
    columns, images = {}, None
    for name, path in paths.items():
        if not os.path.exists(path):
            continue
        with np.load(path) as z:
            n = sum(1 for k in z.files if k.startswith("pca_"))
            columns[name] = [z[f"pca_{i}"] for i in range(n)]
            if images is None:
                images = [z[f"image_{i}"] for i in range(n)]
    if not columns:
        return None
    n = min(len(images), *(len(v) for v in columns.values()))
    return feature_grid(images[:n], {k: v[:n] for k, v in columns.items()}, title)


__all__ = ["PALETTE", "mask_rgb", "pca_components", "pca_rgb", "pca_rgb_list", "feature_grid", "feature_figure",
           "prediction_figure", "fixed_indices", "method_feature_figure", "grid_from_npz"]


def leaderboard_figure(board, title: str = "") -> bytes | None:
    """The leaderboard as bars: one panel per (table, task) with its primary metric, one bar per method with
    the seed std as error bar (none for one seed); ``≈`` over bars the bootstrap cannot tell from the best.
    ``board``: a ``bench.leaderboard.Board``. None when there is nothing measured to draw."""
    from matplotlib.figure import Figure

    panels = []
    for table in board.tables:
        for task in dict.fromkeys(r.task for r in table):
            rows = [r for r in table if r.task == task and not r.extra.get("reference")
                    and isinstance(r.metrics.get(r.primary), (int, float))]
            if rows:
                panels.append((task, rows))
    if not panels:
        return None
    n = len(panels)
    width = max(2.6, 0.55 * max(len(rows) for _, rows in panels) + 1.2)
    fig = Figure(figsize=(width * n, 3.0), dpi=100)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (task, rows) in zip(axes, panels):
        names = [r.method for r in rows]
        means = [r.metrics[r.primary] for r in rows]
        errs = [r.std.get(r.primary, 0.0) for r in rows]
        colors = ["#2a7ab9" if r.mark.get(r.primary) == "best" else "#9bbbd8" for r in rows]
        ax.bar(range(len(rows)), means, yerr=errs, capsize=3, color=colors, edgecolor="#333333", linewidth=0.5)
        for i, r in enumerate(rows):
            if r.mark.get(r.primary) == "≈":
                ax.text(i, means[i] + errs[i], "≈", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        seeds = max(r.n for r in rows)
        ax.set_title(f"{task} · {rows[0].dataset}" + (f" · n={seeds}" if seeds > 1 else ""), fontsize=8)
        ax.set_ylabel(rows[0].primary, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylim(0, max(m + e for m, e in zip(means, errs)) * 1.15 or 1.0)
    _layout(fig, f"Leaderboard {title}".strip())
    return _png(fig)
