"""CLoVE's loss (spec §2.4): PixPro's positive rule between two views' cells, then a margin ranking loss per
(query view, key view) pair between the mean positive distance and the mean of the hardest negatives."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from methods.common.geometry import cell_centers, cell_size, normalized_positions


def relative_center_distance(boxes_q: torch.Tensor, flips_q: torch.Tensor, grid_q: tuple[int, int],
                             boxes_k: torch.Tensor, flips_k: torch.Tensor, grid_k: tuple[int, int],
                             sizes: torch.Tensor | None = None) -> torch.Tensor:
    """PixPro's cell distance: ‖c_p − c_q‖ / max(diag_q, diag_k), as B×Nq×Nk (N = h·w, row-major cells).

    ``c`` are the feature-cell centres of each view in the source image (flips mirror them) and ``diag`` is
    the diagonal of one cell of that view, so the threshold is relative to the coarser of the two grids.
    With ``sizes`` (B×2, (H, W)) coordinates are first divided by the image width/height, as the PixPro/CLoVE
    code does with its normalised boxes (it divides by W−1 and H−1); this only matters for non-square images.
    Without it, the distance is measured in source pixels.
    """
    cq = cell_centers(boxes_q, flips_q, grid_q).flatten(1, 2)  # B×Nq×2
    ck = cell_centers(boxes_k, flips_k, grid_k).flatten(1, 2)  # B×Nk×2
    sq, sk = cell_size(boxes_q.float(), grid_q), cell_size(boxes_k.float(), grid_k)  # B×2 (w, h)
    if sizes is not None:
        cq, ck = normalized_positions(cq, sizes), normalized_positions(ck, sizes)
        sq, sk = normalized_positions(sq, sizes), normalized_positions(sk, sizes)
    diag = torch.maximum(sq.norm(dim=-1), sk.norm(dim=-1))  # B
    # explicit differences, not cdist: cdist's matmul path loses precision near zero distance
    dist = (cq[:, :, None, :] - ck[:, None, :, :]).norm(dim=-1)
    return dist / diag[:, None, None]


def pixpro_positive_mask(boxes_q: torch.Tensor, flips_q: torch.Tensor, grid_q: tuple[int, int],
                         boxes_k: torch.Tensor, flips_k: torch.Tensor, grid_k: tuple[int, int],
                         t_pos: float = 0.7, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """B×Nq×Nk bool: query cell p and key cell q are positives when their centres are closer than ``t_pos``
    times the larger cell diagonal of the two views (PixPro / CLoVE rule, ``pos_ratio`` 0.7).

    With T_pos = 0.7 < 1/√2, two views with the same box and grid match cell-to-cell only (identity mask).
    """
    return relative_center_distance(boxes_q, flips_q, grid_q, boxes_k, flips_k, grid_k, sizes) < t_pos


def pair_terms(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, n_neg: int = 10,
               drop_hardest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and hard-negative terms of one (query view, key view) pair, per image.

    ``q`` B×Nq×C and ``k`` B×Nk×C unit vectors, ``pos`` B×Nq×Nk bool. With ℓ = −2 q·k:
    ``P`` (B) = mean of ℓ over positive pairs (Σ A ℓ / (Σ A + 1e-6)); ``Neg`` (B) = for each query the
    ``n_neg`` smallest ℓ among non-positive keys, the first dropped, averaged, then averaged over queries.
    Top-k is clamped to Nk and +∞ (positive) entries are left out (the reference would average +∞);
    queries without any negative are left out of the query mean.
    """
    logits = -2.0 * torch.bmm(q, k.transpose(1, 2))  # B×Nq×Nk
    posf = pos.to(logits.dtype)
    p_term = (logits * posf).sum(dim=(1, 2)) / (posf.sum(dim=(1, 2)) + 1e-6)
    masked = logits.masked_fill(pos, float("inf"))
    neg = masked.topk(min(n_neg, k.shape[1]), dim=-1, largest=False).values  # B×Nq×k, ascending
    if drop_hardest:
        neg = neg[..., 1:]  # the most similar non-positive key is probably a false negative (spec §2.8)
    valid = torch.isfinite(neg)
    per_query = torch.where(valid, neg, torch.zeros_like(neg)).sum(-1) / valid.sum(-1).clamp(min=1)
    has = valid.any(-1).to(logits.dtype)
    n_term = (per_query * has).sum(-1) / has.sum(-1).clamp(min=1)
    return p_term, n_term


class CLoVELoss(nn.Module):
    """The 2·(V − 1)-pair CLoVE loss on one worker's batch (spec §2.4).

    ``queries``: V online maps B×C×h_v×w_v (unit norm; the globals first); ``keys``: the G momentum maps of the
    global views (unit norm); ``boxes`` B×V×4 source pixels, ``flips`` B×V, ``sizes`` B×2 (H, W) or None.
    For each key view j and each query view i ≠ j: ``max(0, λ·P − Neg + μ)`` per image (:func:`pair_terms`);
    the result is the mean over images and pairs (every pair has weight 1).

    The loss is computed in the dtype of ``queries``/``keys`` (the caller's): nothing is cast to float32 before
    the margin μ is added, so a bf16 caller gets bf16 terms whose gradients carry λ·P − Neg (the hinge's value
    is μ plus that part; its gradient is the part's). Positive masks are geometry and stay in float32.
    Returns (loss, logs: pos_term, neg_term, positives_per_query as floats, pairs).
    """

    def __init__(self, pos_ratio: float = 0.7, n_neg: int = 10, lamb: float = 2.0, margin: float = 100.0,
                 drop_hardest: bool = True):
        super().__init__()
        self.pos_ratio, self.n_neg, self.lamb, self.margin = pos_ratio, n_neg, lamb, margin
        self.drop_hardest = drop_hardest

    def forward(self, queries: list[torch.Tensor], keys: list[torch.Tensor], boxes: torch.Tensor,
                flips: torch.Tensor, sizes: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        terms, p_all, n_all, npos = [], [], [], []
        for j, kmap in enumerate(keys):
            kj = kmap.flatten(2).transpose(1, 2)  # B×Nk×C
            for i, qmap in enumerate(queries):
                if i == j:
                    continue
                pos = pixpro_positive_mask(boxes[:, i], flips[:, i], tuple(qmap.shape[-2:]),
                                           boxes[:, j], flips[:, j], tuple(kmap.shape[-2:]), self.pos_ratio, sizes)
                qi = qmap.flatten(2).transpose(1, 2)  # B×Nq×C
                p_term, n_term = pair_terms(qi, kj.to(qi.dtype), pos, self.n_neg, self.drop_hardest)
                terms.append(F.relu(self.lamb * p_term - n_term + self.margin))
                p_all.append(p_term.detach())
                n_all.append(n_term.detach())
                npos.append(pos.sum(-1).float().mean(-1))
        loss = torch.stack(terms).mean()
        logs = {"pos_term": float(torch.stack(p_all).float().mean()),
                "neg_term": float(torch.stack(n_all).float().mean()),
                "positives_per_query": float(torch.stack(npos).mean()), "pairs": len(terms)}
        return loss, logs


def clove_loss(queries: list[torch.Tensor], keys: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor,
               sizes: torch.Tensor | None, pos_ratio: float = 0.7, n_neg: int = 10, lamb: float = 2.0,
               margin: float = 100.0, drop_hardest: bool = True) -> tuple[torch.Tensor, dict]:
    """Functional form of :class:`CLoVELoss`."""
    return CLoVELoss(pos_ratio, n_neg, lamb, margin, drop_hardest)(queries, keys, boxes, flips, sizes)
