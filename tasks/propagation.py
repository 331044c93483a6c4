"""Label propagation by feature affinity (DINO's ``eval_video_segmentation``; protocols.md §7.3).

Shapes: features are D×h×w token grids (L2-normalised over D here), label maps (N+1)×h×w soft one-hot
(channel 0 = background). For a target frame, every token's affinity to the tokens of the context frames
(the first frame and the ``n_last_frames`` previous ones) is its cosine similarity, restricted to a square
spatial window of ``radius`` tokens (0 = no restriction); the ``topk`` largest affinities over all context
tokens are kept and weighted by softmax(similarity / temperature) (= DINO's exp(sim / T) normalised over the
kept entries); the target label map is the weighted sum of the context labels.
"""

from __future__ import annotations

from collections import deque

import torch
from torch.nn import functional as F


def window_mask(h: int, w: int, radius: int, device=None) -> torch.Tensor:
    """(h·w)×(h·w) bool: query token (i, j) may attend to key (p, q) when |i−p| <= radius and |j−q| <= radius."""
    ii, jj = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)
    return ((ii[:, None] - ii[None, :]).abs() <= radius) & ((jj[:, None] - jj[None, :]).abs() <= radius)


def propagate(target: torch.Tensor, ctx_feats: list[torch.Tensor], ctx_labels: list[torch.Tensor], topk: int,
              temperature: float, mask: torch.Tensor | None) -> torch.Tensor:
    """target D×h×w, contexts n × (D×h×w, L×h×w) -> L×h×w propagated labels (rows sum to 1 over L)."""
    d, h, w = target.shape
    q = F.normalize(target.reshape(d, -1), dim=0).T  # hw×D
    keys = torch.stack([F.normalize(f.reshape(d, -1), dim=0) for f in ctx_feats])  # n×D×hw
    sims = torch.einsum("qd,ndk->qnk", q, keys)  # hw_q × n × hw_k
    if mask is not None:
        sims = sims.masked_fill(~mask[:, None, :], float("-inf"))
    sims = sims.reshape(h * w, -1)
    vals, idx = sims.topk(min(topk, sims.shape[1]), dim=1)
    weights = torch.softmax(vals / temperature, dim=1)  # hw×k
    labels = torch.stack([lab.reshape(lab.shape[0], -1) for lab in ctx_labels])  # n×L×hw
    flat = labels.permute(0, 2, 1).reshape(-1, labels.shape[1])  # (n·hw)×L
    out = (weights[..., None] * flat[idx]).sum(1)  # hw×L
    return out.T.reshape(-1, h, w)


def min_max_per_channel(x: torch.Tensor) -> torch.Tensor:
    """L×H×W: each channel with a positive maximum rescaled to [0, 1] (DINO's ``norm_mask`` before argmax)."""
    out = x.clone()
    for c in range(x.shape[0]):
        if float(x[c].max()) > 0:
            v = x[c] - x[c].min()
            out[c] = v / v.max().clamp_min(1e-12)
    return out


def propagate_video(feats: torch.Tensor, first_labels: torch.Tensor, n_last: int, radius: int, topk: int,
                    temperature: float) -> list[torch.Tensor]:
    """feats T×D×h×w, first_labels L×h×w -> T−1 soft label maps L×h×w for frames 1..T−1 (each frame's
    prediction joins the queue of the ``n_last`` previous frames, the first frame always stays)."""
    t, d, h, w = feats.shape
    mask = window_mask(h, w, radius, feats.device) if radius > 0 else None
    queue: deque = deque(maxlen=n_last)
    outs = []
    for i in range(1, t):
        ctx_f = [feats[0]] + [f for f, _ in queue]
        ctx_l = [first_labels] + [lab for _, lab in queue]
        lab = propagate(feats[i], ctx_f, ctx_l, topk, temperature, mask)
        if n_last > 0:
            queue.append((feats[i], lab))
        outs.append(lab)
    return outs
