"""k-means of token features, shared by the ``cluster`` task and the pretraining proxy (``bench/proxy.py``):
k-means++ seeding and Lloyd iterations in torch, on the features' device. Shapes: N points, D feature width, K
clusters.
"""

from __future__ import annotations

import math

import torch

from bench.errors import BenchError


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


def kmeans(x: torch.Tensor, k: int, iters: int = 100, seed: int = 0, tol: float = 1e-4, n_init: int = 1,
           init_points: int = 0, chunk: int = 32768) -> tuple[torch.Tensor, float]:
    """x N×D float -> (centroids K×D on x's device, inertia = Σ squared distance to the nearest centroid), the
    best of ``n_init`` runs (k-means++ seeding + Lloyd).

    Seeding (``kmeans_pp``) runs on at most ``init_points`` random points
    (0: max(50,000, 1024·K); scikit-learn seeds on all points, faiss on 256 per centroid), Lloyd on all of them
    until the squared centroid shift is below ``tol`` × the mean feature variance or after ``iters`` iterations.
    Lloyd runs in torch on x's device (chunked fused E+M steps; empty clusters re-seeded with the points farthest
    from their centroids, as scikit-learn). ``faiss.Clustering`` from the same seeding was measured slower at equal
    inertia on the cluster task's sizes (0.56× and 0.67× of this engine's speed, results/perf-after.md), so it
    was removed.
    """
    x = x.float()
    n = x.shape[0]
    if n < k:
        raise BenchError(f"cluster: {n} feature vectors for K={k} clusters; use more images or a smaller k")
    gen = torch.Generator().manual_seed(seed)
    thresh = tol * float(x.var(0).mean())
    x_sq = (x * x).sum(1)
    init_points = init_points or max(50_000, 1024 * k)
    best: tuple[torch.Tensor, float] | None = None
    for _ in range(max(1, n_init)):
        sub = x if n <= init_points else x[torch.randperm(n, generator=gen)[:init_points].to(x.device)]
        c0 = kmeans_pp(sub, k, gen)
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
