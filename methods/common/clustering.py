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

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from bench.errors import BenchError
from methods.common.dist import all_reduce_max, all_reduce_sum
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
    dist = torch.cdist(positions, centroid_positions)
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


class _AllReduceSum(torch.autograd.Function):
    """Sum over workers whose backward is again a sum over workers, so that the data-parallel average of the
    workers' gradients equals the one-process gradient of a loss that uses a global statistic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone())


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a 1-D tensor over every worker's entries (differentiable; a plain mean in one process)."""
    count = values.new_tensor(float(values.numel())).detach()
    stats = _AllReduceSum.apply(torch.stack([values.sum(), count]))
    return stats[0] / stats[1]


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


# ------------------------------------------------------------------------------------------- k-means
# k-means of token features (the cluster task, bench/proxy.py): k-means++ seeding and Lloyd iterations by one of
# two engines. Shapes: N points, D feature width, K clusters.

def _sq_dists(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor | None = None,
              x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """x N×D, c K×D -> N×K squared Euclidean distances (clamped at 0); ``x_sq``/``c_sq``: precomputed norms²."""
    c_sq = (c * c).sum(1) if c_sq is None else c_sq
    x_sq = (x * x).sum(1) if x_sq is None else x_sq
    d = torch.addmm(c_sq[None, :], x, c.T.contiguous(), alpha=-2.0)
    return d.add_(x_sq[:, None]).clamp_min_(0)


def _nearest(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor, x_sq: torch.Tensor):
    """(squared distance to the nearest centroid N, its index N); ‖x‖² is added after the min (same argmin)."""
    m, lab = torch.addmm(c_sq[None, :], x, c.T.contiguous(), alpha=-2.0).min(1)
    return (m + x_sq).clamp_min_(0), lab


def assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """x N×D, c K×D -> (labels N int64, squared distance to the assigned centroid N)."""
    c_sq = (c * c).sum(1)
    labels, dists = [], []
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        m, i = _nearest(xs, c, c_sq, (xs * xs).sum(1))
        labels.append(i)
        dists.append(m)
    return torch.cat(labels), torch.cat(dists)


def kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (2 + ⌊ln k⌋ candidates per step, keep the one lowering the potential most)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    x_sq = (x * x).sum(1)
    closest = _sq_dists(x, x[first:first + 1], x_sq=x_sq)[:, 0]
    for _ in range(1, k):
        pot = closest.double().cumsum(0)
        if float(pot[-1]) <= 0:  # fewer distinct points than k: any point will do
            idx = torch.randint(n, (trials,), generator=gen).to(x.device)
        else:
            r = torch.rand(trials, generator=gen, dtype=torch.float64).to(x.device) * pot[-1]
            idx = torch.searchsorted(pot, r).clamp_max_(n - 1)
        d = _sq_dists(x, x[idx], x_sq[idx], x_sq)  # N×trials
        cand = torch.minimum(closest[:, None], d)
        best = int(cand.sum(0).argmin())
        closest = cand[:, best].contiguous()
        centres.append(x[idx[best]])
    return torch.stack(centres)


KMEANS_ENGINES = ("faiss", "torch")
# The Lloyd engine of ``kmeans`` on CPU tensors (a GPU tensor always runs the torch engine, faiss-cpu has no GPU).
# `bench perf --only kmeans` compares both at equal seeds (docs/perf.md); the slower one is to be deleted.
KMEANS_ENGINE = "faiss"


def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0, tol: float = 1e-4, n_init: int = 1,
           init_points: int = 0, chunk: int = 32768, engine: str = "") -> tuple[torch.Tensor, float]:
    """x N×D float -> (centroids K×D on x's device, inertia = Σ squared distance to the nearest centroid), the
    best of ``n_init`` runs (k-means++ seeding + Lloyd).

    Seeding (``kmeans_pp``, the same for both engines and seeds) runs on at most ``init_points`` random points
    (0: max(50,000, 1024·K); scikit-learn seeds on all points, faiss on 256 per centroid), Lloyd on all of them
    until the squared centroid shift is below ``tol`` × the mean feature variance or after ``iters`` iterations.
    ``engine``: ``torch`` (chunked fused E+M steps; empty clusters re-seeded with the points farthest from their
    centroids, as scikit-learn) or ``faiss`` (``faiss.Clustering`` on all points, no subsampling; empty clusters
    split from large ones, as faiss does); '' = ``KMEANS_ENGINE`` on CPU, torch on a GPU.
    """
    x = x.float()
    n = x.shape[0]
    if n < k:
        raise BenchError(f"cluster: {n} feature vectors for K={k} clusters; use more images or a smaller k")
    engine = engine or ("torch" if x.device.type != "cpu" else KMEANS_ENGINE)
    if engine not in KMEANS_ENGINES:
        raise BenchError(f"kmeans engine '{engine}': expected one of {', '.join(KMEANS_ENGINES)}")
    gen = torch.Generator().manual_seed(seed)
    thresh = tol * float(x.var(0).mean())
    x_sq = (x * x).sum(1)
    init_points = init_points or max(50_000, 1024 * k)
    best: tuple[torch.Tensor, float] | None = None
    for _ in range(max(1, n_init)):
        sub = x if n <= init_points else x[torch.randperm(n, generator=gen)[:init_points].to(x.device)]
        c0 = kmeans_pp(sub, k, gen)
        if engine == "faiss":
            c = _lloyd_faiss(x.cpu(), c0.cpu(), iters, thresh, seed).to(x.device)
        else:
            c = _lloyd(x, x_sq, c0, iters, thresh, chunk)
        _, d = assign(x, c)
        inertia = float(d.double().sum())
        if best is None or inertia < best[1]:
            best = (c, inertia)
    return best


def _lloyd(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor, iters: int, thresh: float,
           chunk: int) -> torch.Tensor:
    n, k = x.shape[0], c.shape[0]
    for _ in range(iters):
        # E and M step fused per chunk (one pass over the points per iteration)
        sums = torch.zeros_like(c)
        counts = torch.zeros(k, device=x.device, dtype=torch.long)
        dists = []
        c_sq = (c * c).sum(1)
        for s in range(0, n, chunk):
            xs = x[s:s + chunk]
            m, lab = _nearest(xs, c, c_sq, x_sq[s:s + chunk])
            sums.index_add_(0, lab, xs)
            counts += torch.bincount(lab, minlength=k)
            dists.append(m)
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty):
            far = torch.cat(dists).topk(len(empty)).indices
            sums[empty] = x[far]
            counts[empty] = 1
        new = sums / counts[:, None].to(sums.dtype)
        shift = float(((new - c) ** 2).sum())
        c = new
        if shift <= thresh:
            break
    return c


def _lloyd_faiss(x: torch.Tensor, c: torch.Tensor, iters: int, thresh: float, seed: int,
                 block: int = 5) -> torch.Tensor:
    """Lloyd iterations by ``faiss.Clustering`` from the centroids ``c`` (K×D), on every point of x (N×D, CPU),
    in blocks of ``block`` iterations: faiss has no tolerance, so the loop stops when a block moved the centroids
    less than ``thresh`` (squared shift summed over the block's start and end: at least as strict as the torch
    engine's per-iteration test)."""
    import faiss

    n, d = x.shape
    k = c.shape[0]
    faiss.omp_set_num_threads(torch.get_num_threads())  # a Ray worker's share, not the whole machine
    xs = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    index = faiss.IndexFlatL2(d)
    cur = np.ascontiguousarray(c.numpy(), dtype=np.float32)
    done = 0
    while done < iters:
        step = min(block, iters - done)
        cp = faiss.ClusteringParameters()
        cp.niter, cp.seed, cp.verbose = step, seed, False
        cp.max_points_per_centroid = n // k + 1  # never subsample: Lloyd on all points, as the torch engine
        cp.min_points_per_centroid = 1  # no warning for small fits
        clus = faiss.Clustering(d, k, cp)
        faiss.copy_array_to_vector(cur.ravel(), clus.centroids)  # initialised centroids are used as the start
        index.reset()
        clus.train(xs, index)
        new = faiss.vector_float_to_array(clus.centroids).reshape(k, d)
        done += step
        shift = float(((new.astype(np.float64) - cur) ** 2).sum())
        cur = new
        if shift <= thresh:
            break
    return torch.from_numpy(cur.copy())
