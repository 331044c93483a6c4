"""``hbird``: label transfer on a toy memory computed by hand, the rare-class sampler, faiss against brute force,
the temperature and k, and the task end to end on block images whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from bench.config import build
from bench.data import SegDataset
from bench.errors import BenchError
from tasks.base import EvalData
from tasks.hbird import PRESETS, DenseRetrieval, HbirdConfig, protocol_line
from tasks.retrieval import MemoryBank, patch_histograms, sample_patches, transfer_labels


def test_toy_memory_by_hand():
    # memory: 3 unit vectors in 2-D with one-hot / mixed histograms over 2 classes
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    hist = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    q = torch.tensor([[2.0, 0.0]])  # not normalised: the bank normalises queries (cosine)
    for backend in ("faiss", "torch"):
        bank = MemoryBank(keys, hist, backend)
        sims, idx = bank.search(q, 2)
        assert idx.tolist() == [[0, 2]]
        assert sims[0].tolist() == pytest.approx([1.0, math.sqrt(0.5)], abs=1e-6)
        # softmax over the two similarities at beta 0.1, by hand
        w0 = 1.0 / (1.0 + math.exp((math.sqrt(0.5) - 1.0) / 0.1))
        expect = [w0 * 1.0 + (1 - w0) * 0.5, (1 - w0) * 0.5]
        assert bank.predict(q, 2, 0.1)[0].tolist() == pytest.approx(expect, abs=1e-3)  # labels stored in fp16


def test_temperature_and_k():
    sims = torch.tensor([[0.9, 0.8, 0.1]])
    labels = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    # beta -> 0: the nearest neighbour's histogram alone
    assert transfer_labels(sims, labels, 1e-4)[0].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    # beta -> inf: the plain mean of the k histograms
    assert transfer_labels(sims, labels, 1e6)[0].tolist() == pytest.approx([1 / 3, 2 / 3], abs=1e-5)
    # beta 0.02 (the protocol): exp(-0.1/0.02) and exp(-0.8/0.02) relative weights
    w = np.exp(np.array([0.0, -0.1, -0.8]) / 0.02)
    w /= w.sum()
    assert transfer_labels(sims, labels, 0.02)[0].tolist() == pytest.approx([w[0], w[1] + w[2]], rel=1e-5)
    # k: with k = 1 the nearest decides; a larger k lets the two class-1 neighbours outvote it at a high beta
    keys = torch.tensor([[1.0, 0.0], [0.95, 0.31], [0.9, 0.43]])
    bank = MemoryBank(keys, labels[0], "torch")
    q = torch.tensor([[1.0, 0.0]])
    assert bank.predict(q, 1, 10.0).argmax(1).item() == 0
    assert bank.predict(q, 3, 10.0).argmax(1).item() == 1


def test_faiss_equals_brute_force_exactly():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3000, 48, generator=g)
    hist = torch.softmax(torch.randn(3000, 5, generator=g), 1)
    q = torch.randn(400, 48, generator=g)
    fa, br = MemoryBank(keys, hist, "faiss"), MemoryBank(keys, hist, "torch")
    s1, i1 = fa.search(q, 30)
    s2, i2 = br.search(q, 30)
    # the same 30 neighbours for every query, the same similarities (fp32 rounding); the order may differ only
    # between neighbours whose similarities tie to within that rounding
    assert all(set(a) == set(b) for a, b in zip(i1.tolist(), i2.tolist()))
    assert torch.allclose(s1, s2, atol=1e-6)
    swapped = i1 != i2
    assert int(swapped.sum()) <= 0.01 * i1.numel()
    assert torch.allclose(s1[swapped], s2[swapped], atol=1e-6)
    p1, p2 = fa.predict(q, 30, 0.02), br.predict(q, 30, 0.02)
    assert torch.allclose(p1, p2, atol=1e-4) and torch.equal(p1.argmax(1), p2.argmax(1))


def test_patch_histograms_by_hand():
    m = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 2], [2, 2, 2, 2], [2, 2, 255, 255]]])
    h = patch_histograms(m, (2, 2), 3)
    assert h.shape == (1, 2, 2, 3)
    assert h[0, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.0])  # 3 labelled pixels, all class 0
    assert h[0, 0, 1].tolist() == pytest.approx([0.0, 0.75, 0.25])
    assert h[0, 1, 1].tolist() == pytest.approx([0.0, 0.0, 1.0])  # two ignore pixels left out
    empty = patch_histograms(torch.full((1, 4, 4), 255), (2, 2), 3)
    assert float(empty.sum()) == 0.0


def test_sampler_keeps_rare_classes():
    # 16 patches: 13 of the common class 0, one of class 1, one of class 2, one mixed 0/1; quota 2.
    # Score = U(0,1) · Σ_{c in patch} n_c: the rare patches score U·1, the common ones U·14, so the two rare
    # patches are kept far more often than the 2/16 a uniform draw would give (the reference's soft preference)
    hist = torch.zeros(16, 3)
    hist[:, 0] = 1.0
    hist[5] = torch.tensor([0.0, 1.0, 0.0])
    hist[11] = torch.tensor([0.0, 0.0, 1.0])
    hist[7] = torch.tensor([0.5, 0.5, 0.0])
    # n = (14, 2, 1): rare-2 patch U·1, rare-1 patch U·2, mixed U·16, common U·14
    kept = torch.zeros(16)
    for seed in range(400):
        keep = sample_patches(hist, 2, torch.Generator().manual_seed(seed))
        assert len(set(keep.tolist())) == 2
        kept[keep] += 1
    rate = kept / 400
    assert rate[11] > 0.7 and rate[5] > 0.3 and rate[11] > rate[5]  # uniform sampling: 0.125 each
    assert rate[[i for i in range(16) if i not in (5, 11)]].max() < 0.1
    # exact on the score: with the random factor fixed by a seed, the choice is the lowest U · Σ n_c
    g = torch.Generator().manual_seed(3)
    u = torch.rand(16, generator=g, dtype=torch.float64)
    score = u * torch.tensor([14.0] * 16, dtype=torch.float64)
    score[5], score[11], score[7] = u[5] * 2, u[11] * 1, u[7] * 16
    expect = sorted(torch.topk(score, 4, largest=False).indices.tolist())
    assert sorted(sample_patches(hist, 4, torch.Generator().manual_seed(3)).tolist()) == expect
    # unlabelled patches come last; the quota is capped at the image's patches
    hist[0] = 0.0
    for seed in range(20):
        assert 0 not in sample_patches(hist, 15, torch.Generator().manual_seed(seed)).tolist()
    assert len(sample_patches(hist, 100, torch.Generator())) == 16


class _Blocks(SegDataset):
    """16×16 images of 4×4 blocks, one class per block, colour = palette[class]; every class in every image."""

    def __init__(self, n, palette, seed):
        self.num_classes = len(palette)
        self.class_names = [f"c{i}" for i in range(self.num_classes)]
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            cls = rng.integers(0, self.num_classes, size=(4, 4))
            cls.reshape(-1)[:self.num_classes] = rng.permutation(self.num_classes)
            mask = np.kron(cls, np.ones((4, 4), dtype=np.int64))
            img = np.asarray(palette, dtype=np.uint8)[mask].transpose(2, 0, 1)
            self.items.append({"index": i, "image": torch.from_numpy(np.ascontiguousarray(img)),
                               "mask": torch.from_numpy(mask)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


PALETTE = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10)]


def _data():
    return EvalData("toy", _Blocks(6, PALETTE, 1), _Blocks(4, PALETTE, 2), len(PALETTE), [])


def _blocks(images):
    return F.avg_pool2d(images, 4)  # one token per block: its colour


def test_task_recovers_blocks_and_records_the_protocol():
    cfg = build(HbirdConfig, {"memory_size": 0, "augment": False, "train_fraction": 1.0, "n_neighbours": 5},
                "tasks.hbird")
    data = _data()
    res = DenseRetrieval(cfg).evaluate(_blocks, data, torch.device("cpu"))
    # retrieval is exact here (every token finds same-colour memory patches), so the prediction is the argmax of
    # the bilinearly upsampled one-hot token labels: computed independently below (block corners flip where
    # two neighbours share another class)
    from tasks.metrics import confusion_matrix, summarize

    conf = torch.zeros(4, 4, dtype=torch.long)
    for item in data.val:
        tok = F.one_hot(item["mask"][::4, ::4], 4).permute(2, 0, 1)[None].float()
        pred = F.interpolate(tok, size=(16, 16), mode="bilinear", align_corners=False).argmax(1)[0]
        conf += confusion_matrix(pred, item["mask"], 4)
    expect = summarize(conf.numpy())["miou"]
    assert 90.0 < expect < 100.0
    assert res.metrics["miou"] == pytest.approx(expect)
    assert res.protocol.startswith("hbird[synthetic]: memory all, k=5,")
    # a bounded memory (2 patches per image) still keeps every class (rare-first sampling)
    cfg = build(HbirdConfig, {"memory_size": 12, "augment": False, "train_fraction": 1.0}, "tasks.hbird")
    res = DenseRetrieval(cfg).evaluate(_blocks, _data(), torch.device("cpu"))
    assert res.per_class["memory_patches"] == [12]
    assert res.metrics["miou"] > 50.0


def test_seeds_and_augmentation_run():
    cfg = build(HbirdConfig, {"memory_size": 48, "seeds": 2, "train_fraction": 0.5}, "tasks.hbird")
    res = DenseRetrieval(cfg).evaluate(_blocks, _data(), torch.device("cpu"))
    assert len(res.per_class["miou_per_seed"]) == 2 and "miou_std" in res.metrics
    assert "train fraction 0.5 (3 images), 2 seed(s)" in res.protocol


def test_presets_and_errors():
    assert {"m1e2", "m1e3", "m1e4", "m1e2_p14", "m1e4_p14", "frac8", "frac64", "frac128"} <= set(PRESETS)
    cfg = build(HbirdConfig, {"preset": "m1e4_p14"}, "tasks.hbird")
    assert (cfg.input_size, cfg.memory_size, cfg.augmentation_epochs) == (504, 10_240_000, 2)
    assert build(HbirdConfig, {"preset": "frac128"}, "tasks.hbird").seeds == 5
    assert "memory 10240000, k=30, beta 0.02, input 512," in protocol_line(
        build(HbirdConfig, {"preset": "m1e4"}, "tasks.hbird"), 10582, 1, 21, 1449, 10_240_000)
    with pytest.raises(BenchError, match="preset"):
        build(HbirdConfig, {"preset": "huge"}, "tasks.hbird")
    with pytest.raises(BenchError, match="beta"):
        build(HbirdConfig, {"beta": 0}, "tasks.hbird")
    cfg = build(HbirdConfig, {"memory_size": 3, "train_fraction": 1.0}, "tasks.hbird")
    with pytest.raises(BenchError, match="memory_size"):
        DenseRetrieval(cfg).evaluate(_blocks, _data(), torch.device("cpu"))
