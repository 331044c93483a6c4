"""Micro-benchmarks of ``bench perf``: Sinkhorn against POT, and k-means (the torch Lloyd engine, with
scikit-learn as the reference) at the cluster task's sizes."""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.perf.common import _timeit

# (N points, D width, K clusters): the synthetic default (192 val images × 12×12 tokens of the 192-d ViT, 10
# classes), and COCO-Stuff-27 with ViT-S/16 at 320 px (2,175 curated val images × 20×20 tokens = 870k, K=27),
# subsampled to 200k on CPU and full on a GPU
KMEANS_CASES = [(27_648, 192, 10), (200_000, 384, 27)]
KMEANS_GPU_CASES = [(870_000, 384, 27)]
KMEANS_ITERS = 30  # tasks/cluster.py's default
KMEANS_SEEDS = 5


def bench_sinkhorn(tiny: bool = False) -> list[dict]:
    import ot

    from methods.common.sinkhorn import sinkhorn_plan, swav_sinkhorn

    rows = []
    rep = 2 if tiny else 10
    g = torch.Generator().manual_seed(0)
    # ViCE / Leopart: regions or tokens of a batch × prototypes, epsilon 0.05, 3 iterations
    for b, k in ([(256, 32)] if tiny else [(4096, 128), (16384, 128)]):
        s = torch.nn.functional.normalize(torch.randn(b, 16, generator=g), dim=1) @ \
            torch.nn.functional.normalize(torch.randn(k, 16, generator=g), dim=1).t()
        ours = lambda: swav_sinkhorn(s, 0.05, 3)  # noqa: E731
        m = (-s).double().numpy()
        a, bb = np.full(b, 1.0 / b), np.full(k, 1.0 / k)
        # POT iterates u then v: 3 of its iterations are the same 3 row/column scalings
        pot = lambda: ot.sinkhorn(a, bb, m, 0.05, numItermax=3, stopThr=0.0, warn=False)  # noqa: E731
        q, p = ours().double(), pot()
        err_ours = float(np.abs(q.sum(0).numpy() / b - 1.0 / k).sum())
        err_pot = float(np.abs(p.sum(0) - bb).sum() + np.abs(p.sum(1) - a).sum())
        t_ours, t_pot = _timeit(ours, rep), _timeit(pot, rep)
        rows.append({"case": f"swav B={b} K={k} it=3", "ours_s": t_ours, "pot_s": t_pot, "speedup": t_pot / t_ours,
                     "ours_marginal_err": err_ours, "pot_marginal_err": err_pot})
    # CrOC: (images × heads) problems of 2N joint tokens × K clusters, lambda 20, 5 iterations
    for pn, n, k in ([(4, 128, 5)] if tiny else [(24, 128, 5), (96, 392, 5)]):
        cost = torch.rand(pn, n, k, generator=g)
        a = torch.softmax(torch.randn(pn, n, generator=g), 1)
        bk = torch.softmax(torch.randn(pn, k, generator=g), 1)
        ours = lambda: sinkhorn_plan(cost, a, bk, 20.0, 5)  # noqa: E731
        cn, an, bn = cost.double().numpy(), a.double().numpy(), bk.double().numpy()
        pot = lambda: [ot.sinkhorn(an[i], bn[i], cn[i], 1.0 / 20.0, numItermax=5, stopThr=0.0, warn=False)  # noqa: E731
                       for i in range(pn)]
        pl, pp = ours().double().numpy(), np.stack(pot())
        # both marginals: ours ends on the column scaling, POT on the row scaling
        err_ours = float((np.abs(pl.sum(1) - bn).sum() + np.abs(pl.sum(2) - an).sum()) / pn)
        err_pot = float((np.abs(pp.sum(1) - bn).sum() + np.abs(pp.sum(2) - an).sum()) / pn)
        t_ours, t_pot = _timeit(ours, rep), _timeit(pot, rep)
        rows.append({"case": f"croc P={pn} N={n} K={k} it=5", "ours_s": t_ours, "pot_s": t_pot,
                     "speedup": t_pot / t_ours, "ours_marginal_err": err_ours, "pot_marginal_err": err_pot})
    return rows


def _blobs(n: int, d: int, k: int, g: torch.Generator) -> torch.Tensor:
    """N×D points around 3K Gaussian centres (more modes than clusters, as real token features)."""
    centres = torch.randn(k * 3, d, generator=g) * 3
    return centres[torch.randint(0, k * 3, (n,), generator=g)] + torch.randn(n, d, generator=g)


def _engine_row(x: torch.Tensor, k: int, seeds: int) -> tuple[float, list[float]]:
    """(seconds per k-means, inertias per seed): one untimed warm-up, then every seed in one block (interleaving
    with scikit-learn made each pay for the other's OpenMP threads still spinning)."""
    from methods.common.clustering import kmeans

    def run(seed: int) -> float:
        return kmeans(x, k, iters=KMEANS_ITERS, seed=seed)[1]

    run(seeds)
    if x.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    inertias = [run(seed) for seed in range(seeds)]
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / seeds, inertias


def bench_kmeans(tiny: bool = False, seeds: int = KMEANS_SEEDS, gpu: bool = False) -> list[dict]:
    """``methods.common.clustering.kmeans`` (torch) against scikit-learn (n_init=1, same iterations and tolerance),
    each case's time and inertia averaged over ``seeds`` seeds. (A faiss Lloyd engine from the same seeding was
    measured here too and removed: 0.56-0.67x the torch engine's speed at equal inertia, results/perf-after.md.)
    ``gpu``: the torch engine on the GPU, at the full real-data size as well."""
    from sklearn.cluster import KMeans

    rows = []
    g = torch.Generator().manual_seed(0)
    seeds = 2 if tiny else seeds
    cases = [(2000, 32, 10)] if tiny else KMEANS_CASES + (KMEANS_GPU_CASES if gpu else [])
    for n, d, k in cases:
        x = _blobs(n, d, k, g)
        xt = x.cuda() if gpu else x
        t_torch, in_torch = _engine_row(xt, k, seeds)
        row = {"case": f"N={n} D={d} K={k}", "seeds": seeds, "iters": KMEANS_ITERS,
               "torch_device": "cuda" if gpu else "cpu", "torch_s": t_torch, "torch_inertia": float(np.mean(in_torch))}
        if not gpu and n <= 200_000:
            def sk(seed: int) -> float:
                return float(KMeans(n_clusters=k, n_init=1, max_iter=KMEANS_ITERS, tol=1e-4, random_state=seed)
                             .fit(x.numpy()).inertia_)

            sk(seeds)
            t = time.perf_counter()
            in_sk = [sk(seed) for seed in range(seeds)]
            sk_s = (time.perf_counter() - t) / seeds
            row.update({"sklearn_s": sk_s, "sklearn_inertia": float(np.mean(in_sk)), "speedup_vs_sklearn": sk_s / t_torch,
                        "inertia_ratio": float(np.mean(in_torch)) / float(np.mean(in_sk))})
        rows.append(row)
    return rows
