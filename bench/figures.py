"""Pictures for MLflow: PCA-to-RGB of dense features and predictions next to ground truth.

- ``pca_rgb(feats)``: B×C×h×w features -> B×h×w×3 uint8. One PCA over all B·h·w tokens (so colours mean the
  same thing across the images of a figure), the first three components as red, green and blue, each clipped
  to its 1st..99th percentile (ViTs have a few high-norm tokens that would otherwise wash everything out)
  and scaled to 0..255. Each component's sign is fixed by its skewness (the projection's third moment is
  made non-negative), so the picture does not depend on the SVD's arbitrary signs or on a rotation or shift
  of the feature space.
- ``mask_rgb(mask)``: H×W class ids -> H×W×3 with the fixed ``PALETTE`` (255 = ignore is black).
- ``feature_figure`` / ``feature_grid``: images with the PCA picture of one method (or of several methods,
  one column each, the figure every dense SSL paper shows); ``prediction_figure``: image | ground truth |
  prediction rows with a legend of the classes shown. All return PNG bytes (matplotlib, Agg canvas, no
  pyplot state).
- ``method_feature_figure``: the harness side: a method's (or the untrained backbone's) features on a few
  fixed validation images of the evaluation dataset, written to ``<out_dir>/features_pca.png`` and ``.npz``
  (the npz feeds the side-by-side grid that ``bench run`` logs on its parent run).
"""

from __future__ import annotations

import colorsys
import io
import os

import numpy as np
import torch

IGNORE = 255

# Hand-picked, well separated colours for the first classes (27 covers COCO-Stuff-27 and Cityscapes-27);
# further ids get golden-ratio hues, so the colour of a class id never depends on the dataset or the figure.
_BASE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128), (255, 255, 255), (100, 60, 160), (30, 90, 40), (200, 120, 120),
    (90, 160, 255), (180, 180, 60), (255, 100, 0),
]


def _palette() -> np.ndarray:
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(_BASE)] = _BASE
    for i in range(len(_BASE), IGNORE):
        h = (i * 0.618033988749895) % 1.0
        s = 0.55 + 0.35 * ((i * 7) % 3) / 2
        v = 0.65 + 0.3 * ((i * 5) % 2)
        pal[i] = [round(255 * c) for c in colorsys.hsv_to_rgb(h, s, v)]
    pal[IGNORE] = (0, 0, 0)
    return pal


PALETTE = _palette()  # 256×3 uint8: class id -> colour, 255 (ignore) -> black


def mask_rgb(mask) -> np.ndarray:
    """H×W integer class ids (tensor or array; values outside 0..255 count as ignore) -> H×W×3 uint8."""
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    m = m.astype(np.int64)
    m = np.where((m < 0) | (m > IGNORE), IGNORE, m)
    return PALETTE[m]


def pca_components(tokens: torch.Tensor, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """N×C tokens -> (mean C, C×n principal directions with skewness-fixed signs; zero columns if C < n)."""
    x = tokens.detach().double().cpu()
    mean = x.mean(0)
    xc = x - mean
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    k = min(n, vh.shape[0])
    dirs = vh[:k].T.clone()  # C×k
    proj = xc @ dirs
    third = (proj ** 3).mean(0)
    dirs[:, third < 0] *= -1
    if k < n:
        dirs = torch.cat([dirs, torch.zeros(x.shape[1], n - k, dtype=dirs.dtype)], 1)
    return mean, dirs


def pca_rgb(feats: torch.Tensor, clip: float = 1.0) -> np.ndarray:
    """B×C×h×w features -> B×h×w×3 uint8: a joint PCA over all tokens, components 1-3 as R, G, B.

    Each channel is clipped to its [clip, 100 - clip] percentiles over all tokens and stretched to 0..255;
    a component with no spread (e.g. C < 3 or constant features) is drawn as mid-grey (128).
    """
    if feats.dim() != 4:
        raise ValueError(f"pca_rgb expects B×C×h×w features, got shape {tuple(feats.shape)}")
    b, c, h, w = feats.shape
    tokens = feats.detach().permute(0, 2, 3, 1).reshape(-1, c)
    mean, dirs = pca_components(tokens, 3)
    proj = ((tokens.double().cpu() - mean) @ dirs).numpy()  # N×3
    lo = np.percentile(proj, clip, axis=0)
    hi = np.percentile(proj, 100.0 - clip, axis=0)
    span = hi - lo
    scale = np.max(np.abs(proj), axis=0) + 1e-30
    flat = span <= 1e-9 * scale  # no spread relative to the values: rounding noise, not a direction
    out = np.clip((proj - lo) / np.where(flat, 1.0, span), 0.0, 1.0)
    out[:, flat] = 0.5
    return np.round(out * 255).astype(np.uint8).reshape(b, h, w, 3)


def _to_hwc(image) -> np.ndarray:
    """3×H×W or H×W×3 uint8 (tensor or array) -> H×W×3 uint8 array."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    return a.astype(np.uint8)


def _layout(fig, title: str, bottom_in: float = 0.0) -> None:
    """Tight grid below an optional suptitle and above ``bottom_in`` inches kept free (for a legend)."""
    height = fig.get_figheight()
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.04 / height, va="top")
        top = 1.0 - 0.25 / height
    fig.tight_layout(pad=0.3, h_pad=0.2, w_pad=0.2, rect=(0, bottom_in / height, 1, top))


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def _figure(rows: int, cols: int, cell: float = 1.9, extra_h: float = 0.0):
    """A rows×cols grid of bare axes, ``cell`` inches each, plus 0.25 in for column titles and ``extra_h``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cell * cols, cell * rows + 0.25 + extra_h), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    return fig, axes


def feature_grid(images: list, columns: dict, title: str = "") -> bytes:
    """Rows = images (H×W×3 / 3×H×W uint8), columns = the image then one PCA picture per entry of
    ``columns`` (name -> list of h×w×3 uint8, one per image, any resolution: drawn at the image's extent)."""
    names = list(columns)
    fig, axes = _figure(len(images), 1 + len(names), extra_h=0.25 if title else 0.0)
    for r, img in enumerate(images):
        img = _to_hwc(img)
        H, W = img.shape[:2]
        axes[r, 0].imshow(img, interpolation="nearest")
        for c, name in enumerate(names, start=1):
            axes[r, c].imshow(columns[name][r], interpolation="nearest", extent=(0, W, H, 0))
    axes[0, 0].set_title("image", fontsize=9)
    for c, name in enumerate(names, start=1):
        axes[0, c].set_title(name, fontsize=9)
    _layout(fig, title)
    return _png(fig)


def feature_figure(images: list, feats: list, name: str = "features", title: str = "") -> bytes:
    """Images plus the joint PCA picture of their features (a list of C×h×w, one per image; grids may differ)."""
    return feature_grid(images, {name: pca_rgb_list(feats)}, title)


def pca_rgb_list(feats: list) -> list[np.ndarray]:
    """A list of C×h×w feature maps (sizes may differ) -> list of h×w×3 uint8 from one joint PCA."""
    tokens = torch.cat([f.detach().reshape(f.shape[0], -1).T for f in feats], 0)  # N×C
    n = tokens.shape[0]
    rgb = pca_rgb(tokens.T.reshape(1, -1, n, 1))[0, :, 0]  # N×3
    out, start = [], 0
    for f in feats:
        h, w = f.shape[-2:]
        out.append(rgb[start:start + h * w].reshape(h, w, 3))
        start += h * w
    return out


def prediction_figure(images: list, gt: list, pred: list, class_names: list | None = None,
                      title: str = "") -> bytes:
    """Rows of image | ground truth | prediction (H×W class ids; 255 = ignore, black) with a legend of the
    class ids that appear. Ids at or beyond ``len(class_names)`` (e.g. unmatched clusters) are listed by id."""
    class_names = list(class_names or [])
    present: set[int] = set()
    for m in list(gt) + list(pred):
        arr = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
        present.update(int(v) for v in np.unique(arr) if 0 <= v < IGNORE)
    ncol = 4
    legend_in = 0.18 * -(-len(present) // ncol) + 0.1 if present else 0.0
    fig, axes = _figure(len(images), 3, extra_h=legend_in + (0.25 if title else 0.0))
    for r, (img, g, p) in enumerate(zip(images, gt, pred)):
        img = _to_hwc(img)
        H, W = img.shape[:2]
        axes[r, 0].imshow(img, interpolation="nearest")
        for c, m in ((1, g), (2, p)):
            arr = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
            axes[r, c].imshow(mask_rgb(arr), interpolation="nearest", extent=(0, W, H, 0))
    for c, label in enumerate(("image", "ground truth", "prediction")):
        axes[0, c].set_title(label, fontsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(color=PALETTE[k] / 255.0, label=class_names[k] if k < len(class_names) else f"id {k}")
               for k in sorted(present)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), ncol), fontsize=7, frameon=False,
                   handlelength=1.2, columnspacing=1.0, borderaxespad=0.1)
    _layout(fig, title, legend_in)
    return _png(fig)


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
    from bench import plugins
    from bench.evaluate import feature_fn, load_eval_data

    plugins.load_all()
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
