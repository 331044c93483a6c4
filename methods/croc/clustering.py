"""CrOC's cross-view online clustering: join → locate → split (methods.md §3.3, ``Clustering`` in the reference).

Every (image, attention head) pair is one independent problem over the **joint** set of both views' tokens.
Shapes: P problems (= B·h), N tokens per view, M = 2N joint tokens (view 1 first, then view 2), d key width,
S seeds (``n_seeds``, the largest K), K clusters, C token width.

1. **Join**: unit keys of both views, one token marginal ``a = softmax(r/τ_r)`` with r the cosine of each token's
   key to its own view's [CLS] key; S seeds drawn from ``a`` without replacement; centroid marginal
   ``b = softmax(r_seeds/τ_c)``.
2. **Locate**: for K = S … 2, cost ``M = −k̂·μ + λ_pos·‖p − π‖ / max‖p − π‖`` (the max per problem), min–max
   normalised over the whole batch; Sinkhorn plan (given marginals, ``methods/common/sinkhorn.py``); transport cost
   ``Σ P·M``; then the two most similar centroids merge (their plan columns add, the merged column goes last).
3. **Split**: the candidate with the lowest transport cost among K ≤ ``k_max`` wins; its plan is
   column-normalised within each view, hard-masked (each token keeps only its largest value, as the soft value),
   and clusters present in both views are the valid ones. Centroids are the masked weighted sums of last-layer
   tokens, rescaled to the mean [CLS] norm.

Distributed: the batch-wide min/max of the cost goes through ``all_reduce_max`` so W workers normalise like one
process (the reference normalises per GPU). Seeds come from caller-supplied uniform noise (Gumbel top-k, the same
distribution as ``torch.multinomial`` without replacement) so a sample's clustering does not depend on which
worker holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from methods.common.dist import all_reduce_max
from methods.common.sinkhorn import sinkhorn_plan


@dataclass
class ClusterResult:
    """weights P×2×N×k_max: hard-masked, view-wise column-normalised plan values (zero columns pad K* < k_max).
    valid P×k_max: the cluster holds tokens of both views. n_clusters P: the chosen K*.
    costs P×(S−1): transport cost of K = S, S−1, …, 2 (in that order)."""

    weights: torch.Tensor
    valid: torch.Tensor
    n_clusters: torch.Tensor
    costs: torch.Tensor


def token_scores(keys: torch.Tensor, cls_keys: torch.Tensor) -> torch.Tensor:
    """keys P×2×N×d, cls_keys P×2×d (both unit) -> r P×2N: each token's cosine to its own view's [CLS] key."""
    return torch.einsum("pvnd,pvd->pvn", keys, cls_keys).flatten(1)


def sample_seeds(logits: torch.Tensor, n_seeds: int, uniform_noise: torch.Tensor) -> torch.Tensor:
    """logits P×M (log-probabilities up to a constant), noise P×M in [0, 1) -> P×n_seeds distinct token indices.

    Gumbel top-k: the indices of the n largest ``logits + Gumbel`` are a draw without replacement from
    softmax(logits), i.e. what ``multinomial(softmax(logits), n, replacement=False)`` samples.
    """
    u = uniform_noise.clamp(1e-12, 1.0 - 1e-7)
    return (logits - torch.log(-torch.log(u))).topk(n_seeds, dim=1).indices


def position_distance(positions: torch.Tensor, centroid_positions: torch.Tensor) -> torch.Tensor:
    """positions P×M×2, centroid positions P×K×2 -> P×M×K Euclidean distances divided by their per-problem max."""
    # the root of explicit squared differences, as the authors: torch.cdist's matrix-product path (> 25 rows)
    # leaves a token's distance to its own position non-zero (2.7e-4 of the normalised distance at 2N = 128)
    dist = (positions[:, :, None, :] - centroid_positions[:, None, :, :]).pow(2).sum(-1).sqrt()
    return dist / dist.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def cost_matrix(keys: torch.Tensor, centroids: torch.Tensor, positions: torch.Tensor,
                centroid_positions: torch.Tensor, lambda_pos: float) -> torch.Tensor:
    """keys P×M×d (unit), centroids P×K×d, positions P×M×2, centroid positions P×K×2 -> cost P×M×K in [0, 1].

    M = −k̂·(μ/‖μ‖) + λ_pos · D (D: ``position_distance``), then (M − min)/(max − min) with the min and max over
    the whole batch (all problems, all workers), as the reference does over its batch tensor.
    """
    sim = torch.einsum("pmd,pkd->pmk", keys, F.normalize(centroids, dim=-1))
    cost = -sim
    if lambda_pos != 0:
        cost = cost + lambda_pos * position_distance(positions, centroid_positions)
    ext = all_reduce_max(torch.stack([cost.amax(), -cost.amin()]))
    lo, hi = -ext[1], ext[0]
    return (cost - lo) / (hi - lo).clamp_min(1e-12)


def merge_most_similar(plan: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """plan P×M×K, keys P×M×d -> plan P×M×(K−1): the two clusters whose centroids have the largest dot product
    (centroids = column-normalised plan · keys, not re-normalised; diagonal excluded) become one column
    P_i + P_j, appended last; the other columns keep their order."""
    p, m, k = plan.shape
    mu = torch.einsum("pmk,pmd->pkd", plan / plan.sum(dim=1, keepdim=True), keys)
    sim = mu @ mu.transpose(1, 2)
    sim = sim.masked_fill(torch.eye(k, dtype=torch.bool, device=plan.device), float("-inf"))
    flat = sim.flatten(1).argmax(dim=1)
    i, j = flat // k, flat % k
    cols = torch.arange(k, device=plan.device).expand(p, k)
    keep = (cols != i[:, None]) & (cols != j[:, None])
    kept_idx = cols[keep].view(p, k - 2)
    kept = plan.gather(2, kept_idx[:, None, :].expand(p, m, k - 2))
    merged = plan.gather(2, i.view(p, 1, 1).expand(p, m, 1)) + plan.gather(2, j.view(p, 1, 1).expand(p, m, 1))
    return torch.cat([kept, merged], dim=2)


def select_k(costs: torch.Tensor, n_seeds: int, k_max: int) -> torch.Tensor:
    """costs P×(S−1) for K = S … 2 -> P chosen K: the lowest cost among K ≤ k_max (ties: the larger K).

    The reference keeps the last ``n_centroids_max − 1`` costs, so with S = 5 and k_max = 4, K = 5 never wins.
    """
    eligible = costs[:, n_seeds - k_max:]  # K = k_max, …, 2
    return k_max - eligible.argmin(dim=1)


def view_split(plan: torch.Tensor) -> torch.Tensor:
    """Joint plan P×2N×K -> P×2×N×K with each column normalised to sum 1 within each view."""
    p, m, k = plan.shape
    per_view = plan.view(p, 2, m // 2, k)
    return per_view / per_view.sum(dim=2, keepdim=True).clamp_min(1e-30)


def hard_mask(weights: torch.Tensor) -> torch.Tensor:
    """P×2×N×K -> same shape: each token keeps only its largest value (ties keep all maxima), as the soft value."""
    return weights * (weights == weights.amax(dim=-1, keepdim=True)).to(weights.dtype)


@torch.no_grad()
def cluster_views(keys: torch.Tensor, cls_keys: torch.Tensor, positions: torch.Tensor, noise: torch.Tensor, *,
                  n_seeds: int = 5, k_max: int = 4, lambda_pos: float = 4.0, sinkhorn_lambda: float = 20.0,
                  sinkhorn_iterations: int = 5, temp_r: float = 2.0, temp_c: float = 2.0,
                  uniform_marginals: bool = False) -> ClusterResult:
    """keys P×2×N×d and cls_keys P×2×d (need not be unit), positions P×2×N×2 (original-image pixels),
    noise P×2N uniform in [0, 1) for the seed draw -> :class:`ClusterResult`."""
    p, _, n, _ = keys.shape
    keys = F.normalize(keys.float(), dim=-1)
    cls_keys = F.normalize(cls_keys.float(), dim=-1)
    joint = keys.reshape(p, 2 * n, -1)
    pos = positions.float().reshape(p, 2 * n, 2)
    r = token_scores(keys, cls_keys)  # P×2N
    if uniform_marginals:
        # the reference's uniform option: a and b uniform; the seed draw is then uniform too
        r = torch.full_like(r, 1.0 / (2 * n))
    seeds = sample_seeds(r / temp_r, n_seeds, noise)  # P×S
    if uniform_marginals:
        a = torch.full_like(r, 1.0 / (2 * n))
        b = torch.full((p, n_seeds), 1.0 / n_seeds, device=r.device)
    else:
        a = F.softmax(r / temp_r, dim=1)
        b = F.softmax(r.gather(1, seeds) / temp_c, dim=1)
    mu = joint.gather(1, seeds[..., None].expand(-1, -1, joint.shape[-1]))  # P×S×d
    pi = pos.gather(1, seeds[..., None].expand(-1, -1, 2))  # P×S×2

    costs, plans = [], []
    for k in range(n_seeds, 1, -1):
        cost = cost_matrix(joint, mu, pos, pi, lambda_pos)
        plan = sinkhorn_plan(cost, a, b, sinkhorn_lambda, sinkhorn_iterations)
        costs.append((plan * cost).sum(dim=(1, 2)))
        if k <= k_max:
            plans.append(F.pad(view_split(plan), (0, k_max - k)))
        if k == 2:
            break
        plan = merge_most_similar(plan, joint)
        plan_n = plan / plan.sum(dim=1, keepdim=True)
        mu = torch.einsum("pmk,pmd->pkd", plan_n, joint)
        pi = torch.einsum("pmk,pmc->pkc", plan_n, pos)
        b = torch.einsum("pm,pmk->pk", a, plan_n)
        b = b / b.sum(dim=1, keepdim=True)
    costs_t = torch.stack(costs, dim=1)  # P×(S−1)
    chosen = select_k(costs_t, n_seeds, k_max)
    stacked = torch.stack(plans, dim=1)  # P×(k_max−1)×2×N×k_max, K = k_max … 2
    pick = (k_max - chosen).view(p, 1, 1, 1, 1).expand(-1, 1, *stacked.shape[2:])
    weights = hard_mask(stacked.gather(1, pick).squeeze(1))
    valid = (weights.sum(dim=2) > 0).all(dim=1)  # P×k_max
    return ClusterResult(weights=weights, valid=valid, n_clusters=chosen, costs=costs_t)


def view_centroids(tokens: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens 2×B×N×C (per view), weights P×2×N×K with P = B·h (problem = image·h + head), valid P×K, scale a
    0-d tensor -> (view-1 centroids, view-2 centroids), each n_valid×C, rescaled to norm ``scale``.

    c_k^(v) = Σ_{n ∈ view v} W_nk z_n; the same W serves the teacher's and the student's tokens.
    """
    _, bsz, n, c = tokens.shape
    p, _, _, k = weights.shape
    h = p // bsz
    w = weights.view(bsz, h, 2, n, k).to(tokens.dtype)
    cents = torch.einsum("bhvnk,vbnc->vbhkc", w, tokens).reshape(2, p * k, c)
    keep = valid.reshape(-1)
    c1, c2 = cents[0][keep], cents[1][keep]
    return scale * F.normalize(c1, dim=-1), scale * F.normalize(c2, dim=-1)
