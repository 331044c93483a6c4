"""k-means of methods/common/clustering.py: both Lloyd engines (faiss, torch) from the same k-means++ seeding reach
the same inertia as scikit-learn, and bad input is one clear line."""

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from methods.common.clustering import KMEANS_ENGINES, assign, kmeans


def _blobs(n=3000, d=16, centres=12, spread=1.0, seed=0):
    g = np.random.default_rng(seed)
    c = g.normal(size=(centres, d)) * 4
    return torch.from_numpy((c[g.integers(0, centres, n)] + spread * g.normal(size=(n, d))).astype(np.float32))


@pytest.mark.parametrize("engine", KMEANS_ENGINES)
def test_engine_matches_sklearn_inertia(engine):
    from sklearn.cluster import KMeans

    assert len(KMEANS_ENGINES) == 2
    x = _blobs()
    ours = np.mean([kmeans(x, 8, iters=100, seed=s, engine=engine)[1] for s in range(4)])
    sk = np.mean([KMeans(8, n_init=1, max_iter=100, tol=1e-4, random_state=s).fit(x.numpy()).inertia_
                  for s in range(4)])
    assert ours == pytest.approx(sk, rel=0.03)


def test_engines_agree_from_the_same_seeding_and_inertia_is_the_assignment_cost():
    x = _blobs(spread=0.5)
    (cf, inf), (ct, int_) = (kmeans(x, 12, seed=3, engine=e) for e in ("faiss", "torch"))
    assert inf == pytest.approx(int_, rel=1e-3)  # separated blobs: both converge to the same partition
    for c, inertia in ((cf, inf), (ct, int_)):
        assert c.shape == (12, 16) and c.dtype == torch.float32
        _, d = assign(x, c)
        assert inertia == pytest.approx(float(((x[:, None] - c[None]) ** 2).sum(-1).min(1).values.sum()), rel=1e-4)
        assert float(d.sum()) == pytest.approx(inertia, rel=1e-4)


def test_faiss_engine_is_deterministic_per_seed():
    x = _blobs(spread=2.0)
    a, b = kmeans(x, 10, seed=5, engine="faiss"), kmeans(x, 10, seed=5, engine="faiss")
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_bad_engine_and_too_few_points_are_one_line():
    with pytest.raises(BenchError, match="kmeans engine 'sklearn'"):
        kmeans(_blobs(n=100), 3, engine="sklearn")
    with pytest.raises(BenchError, match="3 feature vectors for K=5"):
        kmeans(torch.zeros(3, 2), 5, engine="faiss")
