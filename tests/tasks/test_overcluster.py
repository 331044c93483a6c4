"""Overclustering (``tasks.cluster.preset=overcluster``): many-to-one matching by precision on a worked example,
the zero-fill rule, standard scaling + PCA, and the preset end to end on block images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from bench.config import build
from bench.data import SegDataset
from bench.errors import BenchError
from tasks.base import EvalData
from tasks.cluster import ClusterConfig, Clustering
from tasks.metrics import overcluster_miou
from tasks.overcluster import ScaledPCA


def test_many_to_one_matching_worked_example():
    # rows = 3 classes, columns = 5 clusters
    conf = np.array([[40, 5, 0, 10, 0],
                     [10, 30, 0, 0, 2],
                     [0, 5, 20, 15, 3]])
    # precision-based: cluster -> the class holding most of its pixels
    # c0 -> 0 (40 of 50), c1 -> 1 (30 of 40), c2 -> 2, c3 -> 2 (15 vs 10), c4 -> 2 (3 vs 2)
    miou, iou, mapping = overcluster_miou(conf, 3)
    assert mapping.tolist() == [0, 1, 2, 2, 2]
    # merged: class0 col = c0 = [40,10,0]; class1 col = c1 = [5,30,5]; class2 col = c2+c3+c4 = [10,2,38]
    # IoU0 = 40/(55+50-40) = 40/65; IoU1 = 30/(42+40-30) = 30/52; IoU2 = 38/(43+50-38) = 38/55
    expect = [40 / 65, 30 / 52, 38 / 55]
    assert iou.tolist() == pytest.approx(expect)
    assert miou == pytest.approx(np.mean(expect))


def test_zero_fill_counts_unassigned_and_absent_classes_as_zero():
    # class 2 is in the ground truth but no cluster is assigned to it; class 3 never occurs at all
    conf = np.array([[50, 0, 5],
                     [0, 40, 0],
                     [5, 0, 0],
                     [0, 0, 0]])
    miou, iou, mapping = overcluster_miou(conf, 4)
    assert mapping.tolist() == [0, 1, 0]
    # class0: TP 55, row 55, col 60 -> 55/60; class1: 1.0; class2: 0; class3: 0 (zero-fill, not NaN-skip)
    assert iou.tolist() == pytest.approx([55 / 60, 1.0, 0.0, 0.0])
    assert miou == pytest.approx((55 / 60 + 1.0) / 4)


def test_scaled_pca_matches_sklearn():
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2000, 12)) @ rng.normal(size=(12, 12)) * rng.uniform(0.1, 10, 12)).astype(np.float32)
    ours = ScaledPCA(x, 5).apply(x)
    ref = PCA(5).fit_transform(StandardScaler().fit_transform(x))
    for j in range(5):  # components agree up to sign
        corr = np.corrcoef(ours[:, j], ref[:, j])[0, 1]
        assert abs(corr) > 0.999
    assert np.var(ours, 0) == pytest.approx(np.var(ref, 0), rel=1e-3)


class _Blocks(SegDataset):
    def __init__(self, n, palette, seed, jitter=8):
        self.num_classes = len(palette)
        self.class_names = [f"c{i}" for i in range(self.num_classes)]
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            cls = rng.integers(0, self.num_classes, size=(4, 4))
            cls.reshape(-1)[:self.num_classes] = rng.permutation(self.num_classes)
            mask = np.kron(cls, np.ones((4, 4), dtype=np.int64))
            pal = np.asarray(palette, dtype=np.int64)[cls] + rng.integers(-jitter, jitter + 1, size=(4, 4, 3))
            img = np.kron(np.clip(pal, 0, 255).transpose(2, 0, 1), np.ones((1, 4, 4), dtype=np.int64))
            self.items.append({"index": i, "image": torch.from_numpy(img.astype(np.uint8)),
                               "mask": torch.from_numpy(mask)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


PALETTE = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]


def _blocks(images):
    return F.avg_pool2d(images, 4)


def test_overcluster_preset_end_to_end():
    data = EvalData("toy", _Blocks(4, PALETTE, 1), _Blocks(12, PALETTE, 2), 3, ["a", "b", "c"])
    cfg = build(ClusterConfig, {"preset": "overcluster", "ks": [4, 8], "input_size": 0, "mask_size": 0,
                                "seeds": 2, "pca_dim": 3}, "tasks.cluster")
    assert (cfg.fit_on, cfg.normalize, cfg.iters, cfg.n_init, cfg.upsample) == ("val", False, 100, 5, "nearest")
    res = Clustering(cfg).evaluate(_blocks, data, torch.device("cpu"))
    # each colour's tokens split into several clusters, each cluster pure: many-to-one gives every block exactly
    assert res.metrics["miou_k4"] == pytest.approx(100.0)
    assert res.metrics["miou_k8"] == pytest.approx(100.0)
    assert res.metrics["miou"] == res.metrics["miou_k8"]  # the largest K is the primary
    assert len(res.per_class["miou_k8_per_seed"]) == 2
    assert res.protocol.startswith("cluster[overcluster]: frozen features, standard scaling + PCA to 3")
    assert "fitted on val tokens" in res.protocol and "(zero-fill)" in res.protocol
    # fitting on train applies the train scaler/PCA/centroids to val tokens
    cfg = build(ClusterConfig, {"preset": "overcluster", "ks": [4], "input_size": 0, "mask_size": 0,
                                "seeds": 1, "pca_dim": 3, "fit_on": "train"}, "tasks.cluster")
    res = Clustering(cfg).evaluate(_blocks, data, torch.device("cpu"))
    assert "fitted on train tokens (4 images)" in res.protocol and res.metrics["miou_k4"] > 90.0
    # too few tokens for K
    cfg = build(ClusterConfig, {"preset": "overcluster", "ks": [5000], "input_size": 0, "mask_size": 0,
                                "seeds": 1}, "tasks.cluster")
    with pytest.raises(BenchError, match="K=5000"):
        Clustering(cfg).evaluate(_blocks, data, torch.device("cpu"))


def test_presets_resolve():
    d = build(ClusterConfig, {}, "tasks.cluster")
    assert (d.preset, d.fit_on, d.normalize, d.upsample) == ("default", "train", True, "bilinear")  # issue 17
    assert build(ClusterConfig, {"fit_on": "val"}, "tasks.cluster").fit_on == "val"
    o = build(ClusterConfig, {"preset": "overcluster"}, "tasks.cluster")
    assert (o.ks, o.input_size, o.mask_size, o.pca_dim) == ([100, 300, 500], 448, 100, 50)
    with pytest.raises(BenchError, match="preset"):
        build(ClusterConfig, {"preset": "leopart"}, "tasks.cluster")
    with pytest.raises(BenchError, match="ks"):
        build(ClusterConfig, {"preset": "overcluster", "ks": [0]}, "tasks.cluster")
