"""Leopart's overclustering of frozen patch features (protocols.md §7.2; ``tasks.cluster.preset=overcluster``).

Tokens N×D -> standard scaling (per-dimension mean 0, variance 1, population statistics as scikit-learn's
``StandardScaler``) -> PCA to ``pca_dim`` (faiss ``PCAMatrix``) -> faiss k-means (``niter`` Lloyd iterations,
the best of ``nredo`` restarts by objective) for each K. Scaler, PCA and centroids are fitted on the fit tokens
and applied to the evaluation tokens (the same set when fitting on val, as Leopart and NeCo do).
Scoring (many-to-one by precision, zero-fill) is :func:`tasks.metrics.overcluster_miou`.
"""

from __future__ import annotations

import numpy as np
import torch


class ScaledPCA:
    """Standard scaling then PCA, fitted on N×D float32 points; ``apply`` maps M×D -> M×dim float32."""

    def __init__(self, points: np.ndarray, dim: int):
        import faiss

        x = np.ascontiguousarray(points, dtype=np.float32)
        self.mean = x.mean(0, dtype=np.float64).astype(np.float32)
        std = x.std(0, dtype=np.float64)
        self.scale = np.where(std > 0, std, 1.0).astype(np.float32)  # constant dimensions: left at 0
        self.dim = min(dim, x.shape[1])
        self.pca = faiss.PCAMatrix(x.shape[1], self.dim)
        self.pca.train(self._scale(x))

    def _scale(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((np.asarray(x, dtype=np.float32) - self.mean) / self.scale, dtype=np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.pca.apply_py(self._scale(x)), dtype=np.float32)


class FaissKMeans:
    """faiss k-means on N×d float32 points; ``assign`` gives the nearest centroid of M×d points (int64 M)."""

    def __init__(self, points: np.ndarray, k: int, seed: int, niter: int = 100, nredo: int = 5, gpu: bool = False):
        import faiss

        x = np.ascontiguousarray(points, dtype=np.float32)
        use_gpu = bool(gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)
        # max_points_per_centroid: faiss subsamples above 256 points per centroid by default; Leopart keeps it
        self.km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, gpu=use_gpu, verbose=False)
        self.km.train(x)
        self.objective = float(self.km.obj[-1]) if len(self.km.obj) else float("nan")

    @property
    def centroids(self) -> np.ndarray:
        return self.km.centroids

    def assign(self, x: np.ndarray, chunk: int = 262_144) -> np.ndarray:
        out = [self.km.index.search(np.ascontiguousarray(x[s:s + chunk], dtype=np.float32), 1)[1][:, 0]
               for s in range(0, x.shape[0], chunk)]
        return np.concatenate(out).astype(np.int64)


def token_matrix(feats: list[torch.Tensor]) -> np.ndarray:
    """Per-image D×h×w token grids -> (Σ h·w)×D float32, images in order, tokens row-major."""
    return np.concatenate([f.float().permute(1, 2, 0).reshape(-1, f.shape[0]).numpy() for f in feats], 0)


def _label_grid(masks: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Masks H×W uint8 -> nearest-resized to ``size`` square (0: unchanged), int64."""
    out = []
    for m in masks:
        m = m.long()
        if size and tuple(m.shape) != (size, size):
            m = torch.nn.functional.interpolate(m[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
        out.append(m)
    return out


def _void_free(feats: list[torch.Tensor], masks: list[torch.Tensor]) -> np.ndarray:
    """Token rows whose label at the token centre is not ignore (the fit when ``exclude_void``)."""
    from bench.data import IGNORE_INDEX

    keep = []
    for f, m in zip(feats, masks):
        h, w = f.shape[-2:]
        lab = torch.nn.functional.interpolate(m[None, None].float(), size=(h, w), mode="nearest-exact").reshape(-1)
        keep.append((lab != IGNORE_INDEX).numpy())
    return np.concatenate(keep)


def evaluate_overcluster(val_feats, val_masks, fit, data, cfg, seeds: int, device):
    """``cluster`` with ``preset=overcluster``: a TaskResult with ``miou_k<K>`` per K (mean over seeds),
    ``miou`` = the largest K's, and per-seed values in per_class."""
    from tasks.base import TaskResult
    from tasks.metrics import confusion_matrix, overcluster_miou

    C = data.num_classes
    fit_feats, fit_masks = fit if fit is not None else (val_feats, val_masks)
    fit_x = token_matrix(fit_feats)
    same = fit is None and not cfg.exclude_void  # the fit points are the evaluation tokens themselves
    if cfg.exclude_void:
        fit_x = fit_x[_void_free(fit_feats, fit_masks)]
    if cfg.max_fit_points and fit_x.shape[0] > cfg.max_fit_points:
        rows = np.random.default_rng(cfg.seed).permutation(fit_x.shape[0])[:cfg.max_fit_points]
        fit_x = fit_x[np.sort(rows)]
        same = False
    proj = ScaledPCA(fit_x, cfg.pca_dim)
    fit_p = proj.apply(fit_x)
    val_p = fit_p if same else proj.apply(token_matrix(val_feats))
    labels = _label_grid(val_masks, cfg.mask_size)
    grids = [tuple(f.shape[-2:]) for f in val_feats]
    metrics, per_class = {}, {}
    for K in cfg.ks:
        if fit_p.shape[0] < K:
            from bench.errors import BenchError

            raise BenchError(f"cluster: only {fit_p.shape[0]} feature vectors to fit K={K} clusters "
                             f"(tasks.cluster.ks); use more images or smaller K")
        scores, ious = [], []
        for s in range(seeds):
            km = FaissKMeans(fit_p, K, seed=cfg.seed + s, niter=cfg.iters, nredo=cfg.n_init,
                             gpu=getattr(device, "type", "cpu") == "cuda")
            assign = torch.from_numpy(km.assign(val_p))
            conf = torch.zeros(C, K, dtype=torch.long)
            start = 0
            for (h, w), lab in zip(grids, labels):
                tok = assign[start:start + h * w].reshape(1, 1, h, w).float()
                start += h * w
                pred = torch.nn.functional.interpolate(tok, size=tuple(lab.shape), mode="nearest")[0, 0].long()
                conf += confusion_matrix(pred, lab, C, K)
            miou, iou, _mapping = overcluster_miou(conf.numpy(), C)
            scores.append(100.0 * miou)
            ious.append(100.0 * iou)
        metrics[f"miou_k{K}"] = float(np.mean(scores))
        per_class[f"miou_k{K}_per_seed"] = [float(v) for v in scores]
        per_class[f"iou_k{K}"] = [float(v) for v in np.mean(ious, 0)]
    last = cfg.ks[-1] if cfg.ks == sorted(cfg.ks) else max(cfg.ks)
    metrics = {"miou": metrics[f"miou_k{last}"], **metrics}
    per_class["iou"] = per_class[f"iou_k{last}"]
    protocol = protocol_line(cfg, proj.dim, fit is not None, len(fit_feats), seeds, C, last)
    return TaskResult(metrics=metrics, per_class=per_class, protocol=protocol)


def protocol_line(cfg, pca_dim: int, on_train: bool, n_fit: int, seeds: int, num_classes: int, last: int) -> str:
    """The leaderboard's protocol line; results/reference.yaml matches on its head and substrings."""
    return (f"cluster[overcluster]: frozen features, standard scaling + PCA to {pca_dim}, faiss k-means "
            f"({cfg.iters} iters, best of {cfg.n_init}) K={','.join(str(k) for k in cfg.ks)} fitted on "
            f"{'train' if on_train else 'val'} tokens ({n_fit} images{', void excluded' if cfg.exclude_void else ''}), "
            f"{seeds} seeds (mean), input {cfg.input_size or 'native'}, nearest upsampling to "
            f"{cfg.mask_size or 'native'} masks, many-to-one matching by precision, mIoU over {num_classes} classes "
            f"(zero-fill); miou = K={last}")
