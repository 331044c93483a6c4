"""SwAV-form Sinkhorn-Knopp (methods.md §0.1): marginals, hand-computed iterations, POT, distributed, queue."""

import os
import tempfile
from fractions import Fraction as Fr

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from methods.common.sinkhorn import EmbeddingQueue, swav_codes, swav_sinkhorn


def _cosine_scores(b: int, k: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.t()


def test_marginals_with_many_iterations():
    b, k = 40, 8
    codes = swav_sinkhorn(_cosine_scores(b, k), epsilon=0.05, n_iter=500).double()
    plan = codes / b  # the transport plan Q^T: samples × prototypes
    assert torch.allclose(plan.sum(dim=1), torch.full((b,), 1 / b, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(plan.sum(dim=0), torch.full((k,), 1 / k, dtype=torch.float64), atol=1e-4)


def test_reference_three_iterations_are_not_converged_but_each_code_sums_to_one():
    b, k = 12, 5
    codes = swav_sinkhorn(_cosine_scores(b, k, seed=3), epsilon=0.05, n_iter=3)
    assert torch.allclose(codes.sum(dim=1), torch.ones(b), atol=1e-6)
    mass = codes.sum(dim=0)
    assert (mass - b / k).abs().max() > 1e-3  # prototype masses still uneven after 3 iterations


def test_iterations_match_hand_computation():
    # ε = 1 and scores = log of small integers, so Q = exp(S/ε)ᵀ = [[1, 3, 1], [2, 1, 1]] (K = 2 × B = 3).
    # Iteration 1 by hand: Q/9; rows to 1/2: [1/10, 3/10, 1/10], [1/4, 1/8, 1/8]; column sums 7/20, 17/40, 9/40;
    # columns to 1/3: [2/21, 4/17, 4/27], [5/21, 5/51, 5/27]; codes = 3·Qᵀ.
    scores = torch.log(torch.tensor([[1.0, 2.0], [3.0, 1.0], [1.0, 1.0]]))
    one = swav_sinkhorn(scores, epsilon=1.0, n_iter=1)
    hand1 = 3 * np.array([[2 / 21, 5 / 21], [4 / 17, 5 / 51], [4 / 27, 5 / 27]])
    assert np.allclose(one.numpy(), hand1, atol=1e-6)
    # two more rounds of the same arithmetic, carried out in exact fractions
    hand3 = np.array([[float(Fr(8655653, 28322602)), float(Fr(19666949, 28322602))],
                      [float(Fr(51933918, 71600867)), float(Fr(19666949, 71600867))],
                      [float(Fr(17311306, 36978255)), float(Fr(19666949, 36978255))]])
    three = swav_sinkhorn(scores, epsilon=1.0, n_iter=3)
    assert np.allclose(three.numpy(), hand3, atol=1e-6)


@pytest.mark.parametrize("eps", [0.05, 0.01])
def test_converged_codes_match_pot(eps):
    ot = pytest.importorskip("ot")
    b, k = 24, 6
    scores = _cosine_scores(b, k, seed=1)
    codes = swav_sinkhorn(scores, epsilon=eps, n_iter=3000).double()
    a = np.full(b, 1 / b)
    bm = np.full(k, 1 / k)
    method = "sinkhorn" if eps >= 0.05 else "sinkhorn_log"  # POT's plain form underflows at ε = 0.01
    plan = ot.sinkhorn(a, bm, -scores.double().numpy(), reg=eps, method=method, numItermax=100000, stopThr=1e-13)
    assert np.all(np.isfinite(codes.numpy()))
    assert np.allclose(codes.numpy(), b * plan, atol=1e-5)


def test_small_epsilon_stays_finite():
    # scores spanning [−1, 1] at ε = 0.005: exp(−400) underflows float32, not float64
    scores = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, -1.0], [0.5, -0.5, 1.0]])
    codes = swav_sinkhorn(scores, epsilon=0.005, n_iter=3)
    assert torch.isfinite(codes).all()
    assert torch.allclose(codes.sum(dim=1), torch.ones(4), atol=1e-6)
    # the same 3 iterations in the log domain (numpy, float64): rows and columns scaled by log-sum-exp
    logq = scores.double().numpy().T / 0.005  # K×B
    logq -= _lse(logq, None)
    k, b = logq.shape
    for _ in range(3):
        logq -= _lse(logq, 1) + np.log(k)
        logq -= _lse(logq, 0) + np.log(b)
    assert np.allclose(codes.numpy(), np.exp(logq + np.log(b)).T, atol=1e-6)


def _lse(x: np.ndarray, axis):
    m = np.max(x, axis=axis, keepdims=axis is not None)
    return m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=axis is not None))


def test_codes_carry_no_gradient():
    scores = _cosine_scores(8, 4).requires_grad_(True)
    assert not swav_sinkhorn(scores).requires_grad


# ---------------------------------------------------------------------------------------- distributed

def _worker(rank: int, world: int, init_file: str, cases: list, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for i, shards in enumerate(cases):
            codes = swav_sinkhorn(shards[rank], epsilon=0.05, n_iter=3)
            torch.save(codes, os.path.join(out_dir, f"codes_{i}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_equals_single_process_on_the_global_batch():
    """Two gloo workers (the collectives Ray Train's CPU workers use) vs one process on the concatenation;
    unequal shards are ViCE's case (different numbers of regions per worker)."""
    layouts = [(10, 10), (5, 13)]
    scores = [_cosine_scores(sum(sz), 7, seed=2 + i) for i, sz in enumerate(layouts)]
    cases = [list(sc.split(list(sz))) for sc, sz in zip(scores, layouts)]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), cases, tmp), nprocs=2, join=True)
        parts = [[torch.load(os.path.join(tmp, f"codes_{i}_{r}.pt")) for r in range(2)] for i in range(2)]
    for i in range(2):
        single = swav_sinkhorn(scores[i], epsilon=0.05, n_iter=3)
        assert torch.allclose(torch.cat(parts[i]), single, atol=1e-6)
    # the collectives matter: one shard on its own gives other codes
    wrong = swav_sinkhorn(cases[1][0], epsilon=0.05, n_iter=3)
    assert not torch.allclose(wrong, parts[1][0], atol=1e-3)


def _ray_loop(config: dict) -> None:
    import ray.train

    from methods.common.sinkhorn import swav_sinkhorn as sk

    rank = ray.train.get_context().get_world_rank()
    codes = sk(config["shards"][rank], epsilon=0.05, n_iter=3)
    torch.save(codes, os.path.join(config["out"], f"codes_{rank}.pt"))


@pytest.mark.slow
def test_distributed_on_two_ray_train_workers(tmp_path):
    from bench.raycluster import init_ray

    init_ray(num_cpus=2)
    from bench.launch import launch_pretraining

    scores = _cosine_scores(18, 5, seed=4)
    shards = list(scores.split([7, 11]))
    launch_pretraining({"shards": shards, "out": str(tmp_path)}, worker=_ray_loop, storage=str(tmp_path / "ray"),
                       name="sk", workers=2, cpus_per_worker=1)
    parts = [torch.load(tmp_path / f"codes_{r}.pt") for r in range(2)]
    assert torch.allclose(torch.cat(parts), swav_sinkhorn(scores, epsilon=0.05, n_iter=3), atol=1e-6)


# ---------------------------------------------------------------------------------------- queue

def test_queue_is_fifo_and_reports_full():
    q = EmbeddingQueue(5, 2, init="zeros")
    q.push(torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    assert not q.full and q.items[:2, 0].tolist() == [1.0, 2.0] and q.items[2:].abs().sum() == 0
    q.push(torch.tensor([[3.0, 3.0], [4.0, 4.0], [5.0, 5.0]]))
    assert q.full
    assert q.items[:, 0].tolist() == [3.0, 4.0, 5.0, 1.0, 2.0]  # newest first, oldest dropped last
    q.push(torch.arange(14.0).view(7, 2))  # more than the length: only the first 5 rows are kept
    assert q.items[:, 0].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_queue_uniform_init_range_and_scores():
    torch.manual_seed(0)
    q = EmbeddingQueue(1000, 12, init="uniform")
    bound = 1 / (12 / 3) ** 0.5
    assert q.items.abs().max() <= bound and q.items.abs().max() > 0.9 * bound
    protos = torch.nn.functional.normalize(torch.randn(4, 12), dim=1)
    assert torch.allclose(q.scores(protos), q.items @ protos.t())


def test_swav_codes_with_queue_keep_the_batch_rows():
    scores = _cosine_scores(6, 4, seed=5)
    queue_scores = _cosine_scores(10, 4, seed=6)
    codes = swav_codes(scores, queue_scores, epsilon=0.05, n_iter=3)
    full = swav_sinkhorn(torch.cat([queue_scores, scores]), epsilon=0.05, n_iter=3)
    assert codes.shape == (6, 4) and torch.allclose(codes, full[10:])
    assert not torch.allclose(codes, swav_sinkhorn(scores, epsilon=0.05, n_iter=3), atol=1e-3)
