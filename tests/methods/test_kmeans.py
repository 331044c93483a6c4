"""k-means of methods/common/clustering.py: the same inertia as scikit-learn, deterministic per seed, the reported
inertia is the assignment cost, and bad input is one clear line."""

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from methods.common.clustering import assign, kmeans


def _blobs(n=3000, d=16, centres=12, spread=1.0, seed=0):
    g = np.random.default_rng(seed)
    c = g.normal(size=(centres, d)) * 4
    return torch.from_numpy((c[g.integers(0, centres, n)] + spread * g.normal(size=(n, d))).astype(np.float32))


def test_matches_sklearn_inertia():
    from sklearn.cluster import KMeans

    x = _blobs()
    ours = np.mean([kmeans(x, 8, iters=100, seed=s)[1] for s in range(4)])
    sk = np.mean([KMeans(8, n_init=1, max_iter=100, tol=1e-4, random_state=s).fit(x.numpy()).inertia_
                  for s in range(4)])
    assert ours == pytest.approx(sk, rel=0.03)


def test_inertia_is_the_assignment_cost():
    x = _blobs(spread=0.5)
    c, inertia = kmeans(x, 12, seed=3)
    assert c.shape == (12, 16) and c.dtype == torch.float32
    _, d = assign(x, c)
    assert inertia == pytest.approx(float(((x[:, None] - c[None]) ** 2).sum(-1).min(1).values.sum()), rel=1e-4)
    assert float(d.sum()) == pytest.approx(inertia, rel=1e-4)


def test_deterministic_per_seed():
    x = _blobs(spread=2.0)
    a, b = kmeans(x, 10, seed=5), kmeans(x, 10, seed=5)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_too_few_points_is_one_line():
    with pytest.raises(BenchError, match="3 feature vectors for K=5"):
        kmeans(torch.zeros(3, 2), 5)
