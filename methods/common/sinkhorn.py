"""Sinkhorn-Knopp, in the two forms the methods use (methods.md §0.1 and §3.3).

``swav_sinkhorn``: SwAV/SeLa equipartition codes over a batch (ViCE, Leopart). Distributed-correct: the
global max, the total mass and the prototype (row) sums are all-reduced across workers; sample (column)
sums are local because each sample lives on one worker. Computed in the log domain's safe form: scores are
shifted by their global max before ``exp`` (VISSL/ViCE), which leaves the result unchanged.

``sinkhorn_plan``: entropic optimal transport with given marginals and cost (CrOC), batched over problems:
P ∝ exp(−λ M), rows scaled to ``a`` then columns to ``b``, ``n_iter`` times.
"""

from __future__ import annotations

import torch

from methods.common.dist import all_reduce_max, all_reduce_sum, world_size


@torch.no_grad()
def swav_sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iter: int = 3) -> torch.Tensor:
    """scores B×K (local samples × prototypes) -> codes B×K, each row summing to 1.

    Q = exp(S/ε)ᵀ (K×B_glob), Q /= ΣQ; repeat: rows to 1/K (all-reduced sums), columns to 1/B_glob; then
    each column is scaled to sum 1. With the reference's 3 iterations prototype masses are not yet equal.
    """
    s = scores.float() / epsilon
    s = s - all_reduce_max(s.max().clone())
    q = torch.exp(s).t()  # K×B
    k, b_local = q.shape
    b_glob = b_local * world_size()
    q /= all_reduce_sum(q.sum().clone())
    for _ in range(n_iter):
        row = all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= row
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b_glob
    q *= b_glob
    return q.t()


@torch.no_grad()
def sinkhorn_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lam: float = 20.0,
                  n_iter: int = 5) -> torch.Tensor:
    """cost P×N×K, a P×N (row marginals), b P×K (column marginals) -> plan P×N×K.

    Starts from exp(−λ M) normalised to mass 1 per problem; each iteration scales rows to ``a`` then columns
    to ``b``. NaNs (from empty rows/columns) become 1e-8, as in the reference.
    """
    logits = -lam * cost.float()
    logits = logits - logits.amax(dim=(1, 2), keepdim=True)  # exp-safe; cancels in the normalisation
    p = torch.exp(logits)
    p = p / p.sum(dim=(1, 2), keepdim=True)
    for _ in range(n_iter):
        p = p * (a / p.sum(dim=2).clamp_min(1e-30)).unsqueeze(2)
        p = p * (b / p.sum(dim=1).clamp_min(1e-30)).unsqueeze(1)
    return torch.nan_to_num(p, nan=1e-8)
