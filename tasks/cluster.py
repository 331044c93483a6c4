"""Unsupervised semantic segmentation by clustering frozen dense features (protocols.md §2, PiCIE/STEGO style).

1. Frozen features of the evaluation images (B×D×h×w token grids; the dataset gives the protocol's resolution,
   e.g. 320×320 centre crops for ``coco_stuff27`` / ``cityscapes27``), optionally L2-normalised (PiCIE's cosine).
2. K-means with K = number of classes (``k``; K > classes = overclustering) on the token features, ``seeds``
   restarts (each its own k-means++ init and token subsample), reported as mean ± std (≥ 5 on real data, as the
   protocol asks; 3 on the synthetic default to stay fast). Centroids are fitted on the train split's tokens
   (``fit_on=train``, the default: PiCIE's final evaluation fits on train images, issue 17) or on the evaluation
   images (``fit_on=val``, labels unused except that tokens on void labels are left out, protocols.md §2.9).
3. Every pixel at label resolution gets the cluster with the highest score ``2 f·c − ‖c‖²`` (= nearest centroid),
   the scores bilinearly upsampled from the token grid (``upsample=bilinear``; PiCIE's logit upsampling, which is
   the same as upsampling the features, the score being linear in f), or the token assignment nearest-upsampled
   (``upsample=nearest``, Leopart). No CRF.
4. One confusion matrix over the whole evaluation set, then Hungarian matching (scipy, pixel-count objective,
   PiCIE/STEGO) for K = C or majority vote for K > C (``match=auto``), then mIoU (NaN-skip) and pixel accuracy.

Metrics: ``miou`` (mean over seeds), ``miou_std`` (sample std over seeds), ``pixel_acc`` (mean); per_class
holds the mean per-class IoU, the per-seed mIoU / accuracy, the k-means inertia per point and seed 0's
cluster→class mapping.

K-means (``methods.common.clustering.kmeans``) runs on the task's device: greedy k-means++ seeding (as
scikit-learn, on a ≤ max(50k, 1024·K)-point sample) and Lloyd iterations in torch on all fit points until the centroid shift is below ``tol`` × the mean feature variance (at most ``iters``).

Deviations: PiCIE fits faiss K-means then mini-batch updates on the curated *train* images; this is plain
batch K-means on (a ≤ ``max_fit_points`` subsample of) at most ``max_fit_images`` train images' tokens, which
the protocol line records. ``preset=overcluster`` is Leopart's overclustering instead (tasks/overcluster.py:
standard scaling, PCA to 50, faiss k-means, K = 100, 300, 500, one ``miou_k<K>`` metric each).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F

from bench.data import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from bench.errors import BenchError
from bench.ranges import at_least
from bench.registry import TASKS
from methods.common.clustering import assign, kmeans, kmeans_pp  # noqa: F401 (k-means lives there; re-exported)
from tasks.base import EvalData, FeatureFn, Task, TaskResult, batched_pairs, resize_pair
from tasks.metrics import confusion_matrix, iou_per_class, match_clusters, remap_confusion, summarize

# --------------------------------------------------------------------------------------------- task


PRESETS = {
    # PiCIE / STEGO style (protocols.md §2): K = classes, Hungarian, centroids fitted on train tokens (issue 17)
    "default": dict(fit_on="train", normalize=True, iters=30, n_init=1, upsample="bilinear", exclude_void=True,
                    ks=[], input_size=0, mask_size=0),
    # Leopart / NeCo overclustering (protocols.md §7.2): 448-px square inputs, standard scaling + PCA to 50,
    # faiss k-means (100 iterations, best of 5) for K = 100, 300, 500 on all val tokens, nearest upsampling of
    # the token assignment to 100×100 masks, many-to-one matching by precision, zero-fill over the classes
    "overcluster": dict(fit_on="val", normalize=False, iters=100, n_init=5, upsample="nearest", exclude_void=False,
                        ks=[100, 300, 500], input_size=448, mask_size=100),
}


@dataclass
class ClusterConfig:
    preset: str = "default"  # default | overcluster; unset (None) fields below take the preset's value
    k: int = at_least(0, 0)  # clusters; 0 = the number of classes; more = overclustering (default preset)
    ks: Optional[list] = None  # overcluster preset: one K-means per K, one metric each (miou_k100, ...)
    match: str = "auto"  # auto (hungarian when k = classes, majority when k > classes) | hungarian | majority
    seeds: int = at_least(0, 0)  # k-means restarts, reported as mean ± std; 0 = 5 on real data (protocol), 3 on synthetic
    fit_on: Optional[str] = None  # train: centroids from train-split tokens (default) | val: from the eval images
    max_fit_images: int = at_least(5000, 0)  # fit_on=train: at most this many random train images (0 = all)
    max_fit_points: int = at_least(1_000_000, 0)  # random token subsample per seed for fitting (0 = all)
    exclude_void: Optional[bool] = None  # leave tokens whose label is ignore (255) out of the fit
    normalize: Optional[bool] = None  # L2-normalise features (cosine, PiCIE)
    iters: Optional[int] = None  # max Lloyd iterations per seed (PiCIE faiss: 20, Leopart: 100)
    n_init: Optional[int] = None  # k-means runs per seed, the lowest inertia kept (Leopart's faiss nredo: 5)
    upsample: Optional[str] = None  # bilinear (cluster scores to label resolution) | nearest (token map)
    input_size: Optional[int] = None  # square resize of the images (0 = the dataset's resolution)
    mask_size: Optional[int] = None  # overcluster: labels nearest-resized to this square side (0 = native)
    pca_dim: int = at_least(50, 1)  # overcluster: PCA dimensions after standard scaling
    batch_size: int = at_least(32, 1)
    seed: int = at_least(0, 0)

    def validate(self, where: str) -> None:
        if self.preset not in PRESETS:
            raise BenchError(f"{where}.preset: unknown preset '{self.preset}'; valid: {', '.join(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, list(value) if isinstance(value, list) else value)
        if self.k < 0 or self.seeds < 0 or self.iters < 1 or self.batch_size < 1 or self.n_init < 1:
            raise BenchError(f"{where}: k and seeds must be >= 0, iters, n_init and batch_size >= 1")
        if self.input_size < 0 or self.mask_size < 0 or self.pca_dim < 1:
            raise BenchError(f"{where}: input_size and mask_size must be >= 0, pca_dim >= 1")
        if self.preset == "overcluster" and (not self.ks or not all(isinstance(k, int) and k > 0 for k in self.ks)):
            raise BenchError(f"{where}.ks: expected a non-empty list of positive cluster counts, got {self.ks}")
        choices = {"match": ("auto", "hungarian", "majority"), "fit_on": ("val", "train"),
                   "upsample": ("bilinear", "nearest")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise BenchError(f"{where}.{key}: unknown value '{getattr(self, key)}'; valid: {', '.join(valid)}")


def _normalize_images(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=img.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img.device).view(1, 3, 1, 1)
    return (img.float() / 255.0 - mean) / std


normalize_images = _normalize_images  # uint8 B×3×H×W -> ImageNet-normalised float (shared with hbird, vos)


def _extract(features: FeatureFn, dataset, indices: list[int], batch_size: int, normalize: bool,
             device: torch.device, size: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image: token features D×h×w (fp16, CPU) and the mask H×W (uint8, CPU; 255 = ignore); ``size`` > 0
    square-resizes image (bilinear) and mask (nearest) first, as Leopart's evaluation transform."""
    feats, masks = [], []
    for images, labels in batched_pairs(dataset, indices, batch_size, lambda img, m: resize_pair(img, m, size)):
        with torch.no_grad():
            f = features(_normalize_images(images.to(device))).float()
            if normalize:
                f = F.normalize(f, dim=1)
        feats.extend(f.half().cpu().unbind(0))
        masks.extend(labels.clamp(0, 255).to(torch.uint8).unbind(0))
    return feats, masks


def _token_points(feats: list[torch.Tensor], masks: list[torch.Tensor], exclude_void: bool) -> torch.Tensor:
    """N×D fit points: every token, minus those whose label (sampled at the token centre) is ignore."""
    pts = []
    for f, m in _same_shape_groups(feats, masks, 256):
        b, d, h, w = f.shape
        flat = f.permute(0, 2, 3, 1).reshape(-1, d)
        if exclude_void:
            lab = F.interpolate(m[:, None].float(), size=(h, w), mode="nearest-exact").reshape(-1)
            flat = flat[lab != IGNORE_INDEX]
        pts.append(flat)
    return torch.cat(pts) if pts else torch.empty(0)


def _same_shape_groups(feats: list[torch.Tensor], masks: list[torch.Tensor], size: int):
    """Yields (B×D×h×w features, B×H×W masks) of consecutive images with equal shapes, at most ``size`` each."""
    start = 0
    while start < len(feats):
        end = start + 1
        while (end < len(feats) and end - start < size and feats[end].shape == feats[start].shape
               and masks[end].shape == masks[start].shape):
            end += 1
        yield torch.stack(feats[start:end]), torch.stack(masks[start:end])
        start = end


@TASKS.register("cluster")
class Clustering(Task):
    config_class = ClusterConfig
    # published protocol per dataset (bench.config resolves it below the user's settings): PiCIE / STEGO's
    # K = number of classes (27), Hungarian matching, 5 k-means seeds on COCO-Stuff-27 and Cityscapes-27
    dataset_defaults = {"coco_stuff27": {"k": 27, "match": "hungarian", "seeds": 5},
                        "cityscapes27": {"k": 27, "match": "hungarian", "seeds": 5}}
    primary = "miou"
    display_metrics = ("miou", "miou_std")  # seed mean ± seed std, then the (smaller) k-means-restart std

    def evaluate(self, features: FeatureFn, data: EvalData, device: torch.device, backbone=None) -> TaskResult:
        cfg = self.cfg
        C = data.num_classes
        K = cfg.k or C
        if K < C:
            raise BenchError(f"tasks.cluster.k: {K} clusters for {C} classes; expected k >= {C} (or 0)")
        how = cfg.match if cfg.match != "auto" else ("hungarian" if K == C else "majority")
        seeds = cfg.seeds or (3 if data.name == "synthetic" else 5)

        val_feats, val_masks = _extract(features, data.val, list(range(len(data.val))), cfg.batch_size,
                                        cfg.normalize, device, cfg.input_size)
        if cfg.preset == "overcluster":
            from tasks.overcluster import evaluate_overcluster

            fit = None
            if cfg.fit_on == "train":
                fit = _extract(features, data.train, self._train_indices(data), cfg.batch_size, cfg.normalize,
                               device, cfg.input_size)
            return evaluate_overcluster(val_feats, val_masks, fit, data, cfg, seeds, device)
        if cfg.fit_on == "val":
            points = _token_points(val_feats, val_masks, cfg.exclude_void)
            fit_desc = f"val tokens ({len(data.val)} images)"
        else:
            idx = self._train_indices(data)
            n = len(idx)
            tr_feats, tr_masks = _extract(features, data.train, idx, cfg.batch_size, cfg.normalize, device,
                                          cfg.input_size)
            points = _token_points(tr_feats, tr_masks, cfg.exclude_void)
            del tr_feats, tr_masks
            fit_desc = f"train tokens ({n} images)"
        if points.shape[0] < K:
            raise BenchError(f"cluster: only {points.shape[0]} non-void feature vectors to fit K={K} clusters")

        mious, accs, ious, inertias, mappings, per_image = [], [], [], [], [], []
        for s in range(seeds):
            seed = cfg.seed + s
            fit = points
            if cfg.max_fit_points and points.shape[0] > cfg.max_fit_points:
                g = torch.Generator().manual_seed(10_007 * seed + 1)
                fit = points[torch.randperm(points.shape[0], generator=g)[:cfg.max_fit_points]]
            centroids, inertia = kmeans(fit.to(device).float(), K, cfg.iters, seed, n_init=cfg.n_init)
            per_img = self._confusion(val_feats, val_masks, centroids, C, K, cfg, device)  # N×C×K
            conf = per_img.sum(0)
            mapping = match_clusters(conf, how)
            merged = remap_confusion(conf, mapping, C, unmatched="extra")
            # per image under this seed's matching (fixed), for the leaderboard's bootstrap over images
            per_image.append(np.stack([remap_confusion(c, mapping, C, unmatched="extra") for c in per_img.numpy()]))
            res = summarize(merged)
            mious.append(res["miou"])
            accs.append(res["pixel_acc"])
            ious.append(100.0 * iou_per_class(merged))
            inertias.append(inertia / fit.shape[0])
            mappings.append(mapping)

        def std(v):
            return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

        with warnings.catch_warnings():  # a class absent from GT and predictions stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            per_class = np.nanmean(np.stack(ious), 0)
        # the accuracy's spread stays in per_class (pixel_acc_per_seed) to keep the leaderboard narrow
        metrics = {"miou": float(np.mean(mious)), "miou_std": std(mious), "pixel_acc": float(np.mean(accs))}
        protocol = (f"cluster: frozen features{' L2-normalised' if cfg.normalize else ''}, torch k-means K={K} "
                    f"(k-means++, <= {cfg.iters} iters, best of {cfg.n_init}) fitted on {fit_desc}"
                    f"{', void tokens excluded' if cfg.exclude_void else ''}, {seeds} seeds (mean ± std), "
                    f"{cfg.upsample} upsampling to label resolution, {how} matching on the dataset confusion "
                    f"matrix, mIoU over {C} classes (NaN-skip), {len(data.val)} val images, no CRF")
        return TaskResult(metrics=metrics, protocol=protocol,
                          per_class={"iou": [float(v) for v in per_class],
                                     "miou_per_seed": [float(v) for v in mious],
                                     "pixel_acc_per_seed": [float(v) for v in accs],
                                     "inertia_per_point": [float(v) for v in inertias],
                                     "mapping_seed0": [int(v) for v in mappings[0]]},
                          per_image={"confusion": np.stack(per_image, 1).astype(np.int64)})  # N×seeds×C×(C+1)

    def _train_indices(self, data: EvalData) -> list[int]:
        """At most ``max_fit_images`` random train images (seeded), in dataset order."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        n = len(data.train) if not cfg.max_fit_images else min(cfg.max_fit_images, len(data.train))
        return sorted(torch.randperm(len(data.train), generator=gen)[:n].tolist())

    @staticmethod
    def _confusion(feats, masks, centroids, C, K, cfg, device) -> torch.Tensor:
        """N×classes×clusters pixel counts per evaluation image at label resolution (images in
        ``_same_shape_groups`` order, the same for every method)."""
        per_image = []
        c_sq = (centroids * centroids).sum(1)
        for f, m in _same_shape_groups(feats, masks, cfg.batch_size):
            f, m = f.to(device).float(), m.to(device).long()
            scores = 2.0 * torch.einsum("bdhw,kd->bkhw", f, centroids) - c_sq.view(1, -1, 1, 1)
            if cfg.upsample == "bilinear":
                pred = F.interpolate(scores, size=m.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
            else:
                pred = F.interpolate(scores.argmax(1, keepdim=True).float(), size=m.shape[-2:],
                                     mode="nearest-exact")[:, 0].long()
            per_image.extend(confusion_matrix(p, g, C, K) for p, g in zip(pred, m))
        return torch.stack(per_image)
