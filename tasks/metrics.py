"""Segmentation metrics from one dataset-level confusion matrix (protocols.md §0).

``N[g, p]`` counts valid pixels with ground truth g and prediction p. IoU_c = TP/(TP+FP+FN); classes with
an empty denominator are NaN and skipped by the mean (the cityscapesscripts / STEGO / PiCIE convention).
Cluster-to-class matching: Hungarian (one-to-one, scipy) or majority vote (many-to-one, overclustering).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

IGNORE = 255


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, num_gt: int, num_pred: int | None = None,
                     ignore_index: int = IGNORE) -> torch.Tensor:
    """pred, gt: integer tensors of equal shape -> num_gt×num_pred int64 counts (ignore pixels dropped)."""
    num_pred = num_pred or num_gt
    pred = pred.reshape(-1).long()
    gt = gt.reshape(-1).long()
    valid = (gt != ignore_index) & (gt >= 0) & (gt < num_gt) & (pred >= 0) & (pred < num_pred)
    idx = gt[valid] * num_pred + pred[valid]
    return torch.bincount(idx, minlength=num_gt * num_pred).reshape(num_gt, num_pred).cpu()


def iou_per_class(conf: np.ndarray | torch.Tensor) -> np.ndarray:
    """C×P confusion (P >= C) -> C IoUs; columns beyond C are predictions outside the classes (e.g. void ids or
    unmatched clusters): they count as false negatives of their GT row, as cityscapesscripts does."""
    conf = np.asarray(conf, dtype=np.float64)
    num = conf.shape[0]
    tp = np.diag(conf[:, :num])
    denom = conf[:, :num].sum(0) + conf.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)


def mean_iou(conf, empty: str = "skip") -> float:
    """``empty="skip"``: classes with an empty denominator are left out (NaN-skip, the default); ``"zero"``:
    they count as IoU 0 and the mean is over all C classes (Leopart's ``PredsmIoU``, protocols.md §0)."""
    iou = iou_per_class(conf)
    if empty == "zero":
        return float(np.nan_to_num(iou, nan=0.0).mean())
    return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")


def pixel_accuracy(conf) -> float:
    conf = np.asarray(conf, dtype=np.float64)
    total = conf.sum()
    return float(np.trace(conf[:, :conf.shape[0]]) / total) if total > 0 else float("nan")


def hungarian_match(conf) -> np.ndarray:
    """Square confusion (classes × clusters) -> ``mapping[cluster] = class`` maximising matched pixels."""
    conf = np.asarray(conf)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(conf.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    return mapping


def majority_vote_match(conf) -> np.ndarray:
    """classes × clusters -> ``mapping[cluster] = class`` with the most pixels of that cluster."""
    return np.asarray(conf).argmax(axis=0).astype(np.int64)


def remap_confusion(conf, mapping: np.ndarray, num_classes: int, unmatched: str = "drop") -> np.ndarray:
    """Merge cluster columns into class columns by ``mapping``. Clusters mapped to -1 are dropped
    (``unmatched="drop"``) or summed into an extra column ``num_classes`` (``"extra"``), where
    :func:`iou_per_class` counts them as false negatives."""
    conf = np.asarray(conf)
    out = np.zeros((conf.shape[0], num_classes + (unmatched == "extra")), dtype=conf.dtype)
    for cluster, cls in enumerate(mapping):
        if cls >= 0:
            out[:, cls] += conf[:, cluster]
        elif unmatched == "extra":
            out[:, num_classes] += conf[:, cluster]
    return out


def match_clusters(conf, how: str) -> np.ndarray:
    """classes × clusters -> ``mapping[cluster] = class`` by ``how``: ``hungarian`` (one-to-one, K >= C;
    surplus clusters get -1) or ``majority`` (many-to-one, protocols.md §2.6)."""
    if how == "hungarian":
        return hungarian_match(conf)
    if how == "majority":
        return majority_vote_match(conf)
    raise ValueError(f"unknown matching '{how}'; valid: hungarian, majority")


def summarize(conf) -> dict:
    """mIoU and pixel accuracy in percent, plus the per-class IoU vector (percent, NaN for absent)."""
    iou = iou_per_class(conf)
    return {"miou": 100.0 * mean_iou(conf), "pixel_acc": 100.0 * pixel_accuracy(conf),
            "per_class_iou": [float(100.0 * v) for v in iou]}


# ------------------------------------------------------------------------ overclustering (protocols.md §7.2)

def overcluster_miou(conf, num_classes: int) -> tuple[float, np.ndarray, np.ndarray]:
    """classes × K confusion -> (mIoU in [0, 1], per-class IoU, mapping[cluster] = class).

    Many-to-one by precision: each cluster goes to the class holding most of its pixels (the class that
    maximises the cluster's precision; Leopart's ``many_to_one=True, precision_based=True``); the merged
    classes × classes matrix is scored per class and the mean is over all ``num_classes`` classes, a class
    no cluster was assigned to (or absent altogether) counting as 0 (zero-fill, as Leopart's ``PredsmIoU``).
    """
    mapping = majority_vote_match(conf)
    merged = remap_confusion(conf, mapping, num_classes)
    iou = np.nan_to_num(iou_per_class(merged), nan=0.0)
    return float(iou.mean()), iou, mapping


# ------------------------------------------------------------- DAVIS region and boundary measures (J, F)

def region_j(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """J: IoU of two H×W boolean masks, void pixels left out; both empty counts as 1 (DAVIS convention)."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    if void is not None:
        pred, gt = pred & ~void, gt & ~void
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """H×W bool -> H×W bool boundary: a pixel whose right, lower or lower-right neighbour differs from it
    (the last row compares only to the right, the last column only downwards; DAVIS ``seg2bmap`` for masks
    already at the evaluation size)."""
    m = mask.astype(bool)
    right = np.zeros_like(m)
    down = np.zeros_like(m)
    diag = np.zeros_like(m)
    right[:, :-1] = m[:, 1:]
    down[:-1, :] = m[1:, :]
    diag[:-1, :-1] = m[1:, 1:]
    b = (m ^ right) | (m ^ down) | (m ^ diag)
    b[-1, :] = m[-1, :] ^ right[-1, :]
    b[:, -1] = m[:, -1] ^ down[:, -1]
    b[-1, -1] = False
    return b


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (yy * yy + xx * xx) <= radius * radius


def boundary_f(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None, bound_th: float = 0.008) -> float:
    """F: boundary F-measure of two H×W masks. Boundary pixels match when within ``bound_th`` × the image
    diagonal (rounded up; a value >= 1 is taken as pixels), by dilating the other boundary with a disk.
    Both boundaries empty -> 1; exactly one empty -> 0 (DAVIS ``db_eval_boundary``)."""
    from scipy.ndimage import binary_dilation

    pred, gt = pred.astype(bool), gt.astype(bool)
    if void is not None:
        pred, gt = pred & ~void, gt & ~void
    h, w = gt.shape
    radius = int(bound_th if bound_th >= 1 else np.ceil(bound_th * np.hypot(h, w)))
    bp, bg = boundary_map(pred), boundary_map(gt)
    disk = _disk(radius)
    bp_dil = binary_dilation(bp, structure=disk) if radius > 0 else bp
    bg_dil = binary_dilation(bg, structure=disk) if radius > 0 else bg
    n_p, n_g = int(bp.sum()), int(bg.sum())
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    precision = float((bp & bg_dil).sum()) / n_p
    recall = float((bg & bp_dil).sum()) / n_g
    return 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)
