"""Pooling of dense maps over integer region maps (superpixels, segments), vectorised with scatter ops.

A region is an (image, id) pair. Several views of the same images carry the same ids (ViCE's superpixels),
so :func:`align_regions` numbers the regions of a reference view once and maps every view onto those
numbers: row r of every view's pooled output is the same (image, id). Ids below ``min_id`` (−1 = ignore)
are dropped. No Python loop runs over regions or images.

Shapes: label maps ``B×N`` (N pixels or cells, flattened row-major); flat indices ``(B·N,)`` with −1 for
pixels that belong to no region; pooled outputs ``R×D``.
"""

from __future__ import annotations

import torch


def align_regions(labels: list[torch.Tensor], ref: int = 0, min_id: int = 0) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                                     torch.Tensor]:
    """Number the (image, id) regions of view ``ref`` and index every view's pixels by them.

    labels: list over views of B×N integer maps (same B). Returns
      index    list over views of (B·N,) long in [0, R) or −1 (ignored, or a region absent from ``ref``),
      image    (R,) long: the image each region belongs to,
      ids      (R,) long: the region id; regions are sorted by (image, id), the reference's ascending order.
    """
    b = labels[ref].shape[0]
    base = int(max(int(lab.max()) if lab.numel() else 0 for lab in labels)) + 1
    offs = torch.arange(b, device=labels[ref].device).view(b, 1) * base

    def keys(lab: torch.Tensor) -> torch.Tensor:
        lab = lab.long()
        return torch.where(lab >= min_id, lab + offs, torch.full_like(lab, -1)).reshape(-1)

    k_ref = keys(labels[ref])
    uniq = torch.unique(k_ref[k_ref >= 0])  # sorted
    out = []
    for lab in labels:
        k = keys(lab)
        pos = torch.searchsorted(uniq, k.clamp_min(0))
        hit = (k >= 0) & (pos < uniq.numel())
        hit &= uniq[pos.clamp_max(max(uniq.numel() - 1, 0))] == k if uniq.numel() else torch.zeros_like(hit)
        out.append(torch.where(hit, pos, torch.full_like(pos, -1)))
    return out, uniq // base, uniq % base


def segment_sum(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """values M×D (or M), index M in [0, n) or −1 -> n×D sums (differentiable in ``values``)."""
    keep = index >= 0
    out = values.new_zeros((n,) + tuple(values.shape[1:]))
    return out.index_add(0, index[keep], values[keep])


def segment_count(index: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) float number of members of each segment."""
    keep = index >= 0
    return torch.zeros(n, device=index.device).index_add(0, index[keep], torch.ones(int(keep.sum()),
                                                                                     device=index.device))


def segment_mean(values: torch.Tensor, index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n×D means, n counts); empty segments give zeros."""
    cnt = segment_count(index, n)
    s = segment_sum(values, index, n)
    denom = cnt.clamp_min(1).view((n,) + (1,) * (values.dim() - 1)).to(s.dtype)
    return s / denom, cnt


def segment_argmax(score: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """score M, index M -> (n,) position in [0, M) of each segment's highest score (the first on ties), −1 if
    the segment is empty."""
    m = score.shape[0]
    keep = index >= 0
    idx, sc = index[keep], score[keep].detach()
    pos_all = torch.arange(m, device=score.device)[keep]
    best = torch.full((n,), float("-inf"), device=score.device, dtype=sc.dtype)
    best = best.scatter_reduce(0, idx, sc, reduce="amax", include_self=True)
    at_best = sc == best[idx]
    first = torch.full((n,), m, device=score.device, dtype=torch.long)
    first = first.scatter_reduce(0, idx[at_best], pos_all[at_best], reduce="amin", include_self=True)
    return torch.where(first < m, first, torch.full_like(first, -1))


def downsample_labels(labels: torch.Tensor, stride: int) -> torch.Tensor:
    """B×H×W label maps -> B×(H/stride)×(W/stride): each cell takes the label of its centre pixel."""
    if stride == 1:
        return labels
    off = stride // 2
    return labels[:, off::stride, off::stride][:, : labels.shape[1] // stride, : labels.shape[2] // stride]
