"""The ``cluster`` task: torch k-means against scikit-learn (inertia), and the full task on toy features whose
answer is known by hand (perfect features -> 100 mIoU; merged classes -> a hand-computed mIoU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from bench.config import build
from bench.data import SegDataset
from bench.errors import BenchError
from tasks.base import EvalData
from tasks.cluster import ClusterConfig, Clustering, assign, kmeans



# ------------------------------------------------------------------------------------------ k-means

def _blobs(n, d, centers, spread, seed):
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 1, size=(centers, d))
    lab = rng.integers(0, centers, size=n)
    return (c[lab] + spread * rng.normal(0, 1, size=(n, d))).astype(np.float32), lab


@pytest.mark.parametrize("n,d,k,centers,spread", [(4000, 16, 8, 8, 0.3), (4000, 32, 10, 25, 0.5),
                                                    (2000, 8, 8, 1, 1.0)])
def test_kmeans_inertia_no_worse_than_sklearn(n, d, k, centers, spread):
    """Same budget (best of 3 k-means++ runs, <= 300 Lloyd iterations) on separated blobs, overlapping blobs
    and one Gaussian; single runs differ by their local minimum, so the mean over 4 seeds is compared."""
    from sklearn.cluster import KMeans

    x, _ = _blobs(n, d, centers, spread, seed=n + d + k)
    ours, theirs = [], []
    for seed in range(4):
        c, inertia = kmeans(torch.from_numpy(x), k, iters=300, seed=seed, n_init=3)
        _, d2 = assign(torch.from_numpy(x).double(), c.double())
        assert inertia == pytest.approx(float(d2.sum()), rel=1e-4)  # the returned inertia is the real one
        ours.append(inertia)
        theirs.append(KMeans(k, n_init=3, max_iter=300, random_state=seed).fit(x).inertia_)
    assert np.mean(ours) <= 1.01 * np.mean(theirs)
    # and far below an unfitted clustering (k random points as centroids)
    rnd = torch.from_numpy(x[np.random.default_rng(0).choice(n, k, replace=False)])
    assert np.mean(ours) < 0.9 * float(assign(torch.from_numpy(x), rnd)[1].sum())


def test_kmeans_recovers_separated_blobs_and_survives_duplicates():
    x, lab = _blobs(600, 5, 4, 0.01, seed=0)
    c, inertia = kmeans(torch.from_numpy(x), 4, seed=1)
    pred, _ = assign(torch.from_numpy(x), c)
    pairs = set(zip(lab.tolist(), pred.tolist()))
    assert len(pairs) == 4 and len({p for _, p in pairs}) == 4  # a bijection between blobs and clusters
    # fewer distinct points than clusters: no crash, zero inertia
    dup = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 0.0]]).repeat(20, 1)
    _, inertia = kmeans(dup, 5, seed=0)
    assert inertia == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(BenchError, match="K=5"):
        kmeans(torch.zeros(3, 2), 5)


# ------------------------------------------------------------------------------------ the task

class _Blocks(SegDataset):
    """Images of 4×4-pixel blocks, one class per block; the block colour is ``palette[class]``."""

    def __init__(self, n, num_classes, palette, seed, ignore_frac=0.1, size=16):
        self.num_classes = num_classes
        self.class_names = [f"c{i}" for i in range(num_classes)]
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            cls = rng.integers(0, num_classes, size=(size // 4, size // 4))
            cls.reshape(-1)[:num_classes] = np.arange(num_classes)  # every class in every image
            mask = np.kron(cls, np.ones((4, 4), dtype=np.int64))
            img = np.asarray(palette, dtype=np.uint8)[mask].transpose(2, 0, 1)
            mask = np.where(rng.random(mask.shape) < ignore_frac, 255, mask)
            self.items.append({"index": i, "image": torch.from_numpy(np.ascontiguousarray(img)),
                               "mask": torch.from_numpy(mask)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _block_features(images):
    """B×3×H×W normalised images -> B×3×H/4×W/4: each token is its block's colour."""
    return F.avg_pool2d(images, 4)


PALETTE = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10), (10, 250, 250)]


def _data(palette=PALETTE, n_val=6, n_train=4):
    c = len(palette)
    return EvalData("toy", _Blocks(n_train, c, palette, 1), _Blocks(n_val, c, palette, 2), c,
                    [f"c{i}" for i in range(c)])


def _run(data, **kw):
    cfg = build(ClusterConfig, kw, "tasks.cluster")
    return Clustering(cfg).evaluate(_block_features, data, torch.device("cpu"))


def test_perfect_features_give_100_miou_for_every_seed():
    res = _run(_data(), seeds=3, upsample="nearest")
    assert res.metrics["miou"] == pytest.approx(100.0) and res.metrics["pixel_acc"] == pytest.approx(100.0)
    assert res.metrics["miou_std"] == pytest.approx(0.0)
    assert res.per_class["miou_per_seed"] == pytest.approx([100.0] * 3)
    mapping = res.per_class["mapping_seed0"]
    assert sorted(mapping) == list(range(5))  # a permutation (Hungarian, K = C)
    assert "3 seeds" in res.protocol and "hungarian" in res.protocol


def test_overclustering_majority_vote_and_fit_on_train():
    res = _run(_data(), k=9, seeds=2, upsample="nearest", fit_on="train")
    assert res.metrics["miou"] == pytest.approx(100.0)
    assert len(res.per_class["mapping_seed0"]) == 9 and "majority" in res.protocol and "train tokens" in res.protocol


def test_merged_classes_give_the_hand_computed_miou():
    # classes 0 and 1 share one colour, so no clustering can separate them: the larger takes the shared
    # cluster, the smaller gets none. IoU_a = n_a / (n_a + n_b), IoU_b = 0, the others 1.
    palette = [(250, 10, 10), (250, 10, 10), (10, 10, 250), (10, 250, 10)]
    data = _data(palette)
    counts = np.zeros(4, dtype=np.int64)
    for i in range(len(data.val)):
        m = data.val[i]["mask"].numpy()
        counts += np.bincount(m[m != 255], minlength=4)
    big, small = (0, 1) if counts[0] >= counts[1] else (1, 0)
    expect = 100.0 * (counts[big] / (counts[0] + counts[1]) + 0.0 + 1.0 + 1.0) / 4
    res = _run(data, seeds=2, upsample="nearest")
    assert res.metrics["miou"] == pytest.approx(expect)
    assert res.metrics["pixel_acc"] == pytest.approx(100.0 * (counts.sum() - counts[small]) / counts.sum())
    assert res.per_class["iou"][small] == pytest.approx(0.0)


def test_bilinear_upsampling_errs_only_at_block_borders():
    res = _run(_data(), seeds=1, upsample="bilinear")
    # scores are interpolated between token centres: interior pixels of each 4×4 block stay right
    assert 75.0 <= res.metrics["pixel_acc"] < 100.0 and res.metrics["miou"] > 60.0


def test_synthetic_default_runs_with_three_seeds():
    from bench.backbones import create_backbone
    from bench.data.synthetic import SyntheticConfig, SyntheticScenes

    cfg = SyntheticConfig(num_train=8, num_val=8)
    data = EvalData("synthetic", SyntheticScenes(cfg, "train"), SyntheticScenes(cfg, "val"), 10,
                    list(SyntheticScenes.class_names))
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_d4_p8", "", 0.0).eval()
    res = Clustering(build(ClusterConfig, {}, "tasks.cluster")).evaluate(model.forward_dense, data,
                                                                        torch.device("cpu"))
    assert set(res.metrics) == {"miou", "miou_std", "pixel_acc"}
    assert res.metrics["pixel_acc"] == pytest.approx(np.mean(res.per_class["pixel_acc_per_seed"]))
    assert len(res.per_class["miou_per_seed"]) == 3 and len(res.per_class["iou"]) == 10
    assert res.metrics["miou"] == pytest.approx(np.mean(res.per_class["miou_per_seed"]))
    assert res.metrics["miou_std"] == pytest.approx(np.std(res.per_class["miou_per_seed"], ddof=1))
    assert 0.0 < res.metrics["pixel_acc"] < 100.0


def test_config_errors():
    with pytest.raises(BenchError, match="upsample"):
        build(ClusterConfig, {"upsample": "cubic"}, "tasks.cluster")
    with pytest.raises(BenchError, match="fit_on"):
        build(ClusterConfig, {"fit_on": "test"}, "tasks.cluster")
    with pytest.raises(BenchError, match="k: 3 clusters for 5 classes"):
        _run(_data(), k=3)
