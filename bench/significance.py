"""Paired bootstrap between two leaderboard rows of one column (same evaluation images, same protocol).

Each row is a list of seeds; each seed holds per-image statistics saved by the task (``TaskResult.per_image``):

- ``confusion``: N×C×P pixel counts per image (or N×S×C×P with S k-means restarts, the cluster task); the
  statistic of a resample is the mIoU (percent, NaN-skip over classes) of the summed counts, averaged over S;
- ``score``: N values per image; the statistic is their mean.

One replicate draws N images with replacement, the *same* draw for both rows (paired: the comparison is on the
same images), and, for a row with n ≥ 3 seeds, n of its seeds with replacement (seeds are not paired across
methods). The row is *indistinguishable from the best* when the 95 % percentile interval of
``best − row`` over the replicates contains 0.
"""

from __future__ import annotations

import numpy as np

ALPHA = 0.05
REPLICATES = 1000
LEGEND = ("≈: not distinguishable from the column's best at 95 % (paired bootstrap, {b} resamples of the "
          "evaluation images{seeds}; interval of the difference contains 0)")


def _flat(stats: dict) -> tuple[str, np.ndarray]:
    if "confusion" in stats:
        conf = np.asarray(stats["confusion"], dtype=np.float64)
        if conf.ndim == 3:
            conf = conf[:, None]
        return "confusion", conf
    if "score" in stats:
        return "score", np.asarray(stats["score"], dtype=np.float64)
    raise ValueError("per-image statistics need a 'confusion' or a 'score' array")


def miou_batch(conf: np.ndarray) -> np.ndarray:
    """...×C×P counts -> ... mIoU in percent (classes with an empty denominator skipped; columns beyond C count
    as false negatives, as ``tasks.metrics.iou_per_class``)."""
    c = conf.shape[-2]
    tp = np.diagonal(conf[..., :, :c], axis1=-2, axis2=-1)
    denom = conf[..., :, :c].sum(-2) + conf.sum(-1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)
        valid = (denom > 0).sum(-1)
        out = np.nansum(iou, -1) / np.where(valid > 0, valid, 1)
    return 100.0 * np.where(valid > 0, out, np.nan)


def replicate_stats(seeds: list[dict], weights: np.ndarray) -> np.ndarray:
    """Per-seed statistic under each image resample: ``weights`` B×N counts -> B×n."""
    cols = []
    for stats in seeds:
        kind, x = _flat(stats)
        if x.shape[0] != weights.shape[1]:
            raise ValueError(f"per-image statistics over {x.shape[0]} images, expected {weights.shape[1]}")
        if kind == "score":
            cols.append(weights @ x / weights.shape[1])
        else:
            n, s = x.shape[:2]
            summed = (weights @ x.reshape(n, -1)).reshape((weights.shape[0], s) + x.shape[2:])
            cols.append(np.nanmean(miou_batch(summed), axis=1))
    return np.stack(cols, 1)


def n_images(stats: dict) -> int:
    return int(_flat(stats)[1].shape[0])


def paired_bootstrap(best: list[dict], other: list[dict], replicates: int = REPLICATES, alpha: float = ALPHA,
                     seed: int = 0, higher_is_better: bool = True) -> dict:
    """Compare two rows (lists of per-seed statistics); returns diff (best − other on the observed data),
    the (1 − alpha) interval of the difference, and ``same`` (the interval contains 0)."""
    n = n_images(best[0])
    if any(n_images(s) != n for s in best + other):
        raise ValueError("rows evaluated on different numbers of images cannot be paired")
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)
    rows = []
    for seeds in (best, other):
        stats = replicate_stats(seeds, weights)  # B×n
        k = stats.shape[1]
        if k >= 3:
            pick = rng.integers(0, k, size=(replicates, k))
            rows.append(np.take_along_axis(stats, pick, 1).mean(1))
        else:
            rows.append(stats.mean(1))
    sign = 1.0 if higher_is_better else -1.0
    diff = sign * (rows[0] - rows[1])
    lo, hi = np.nanquantile(diff, [alpha / 2, 1 - alpha / 2])
    ones = np.ones((1, n))
    observed = sign * (replicate_stats(best, ones).mean() - replicate_stats(other, ones).mean())
    return {"diff": float(observed), "lo": float(lo), "hi": float(hi), "same": bool(lo <= 0.0 <= hi)}
