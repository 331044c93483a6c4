"""tasks/metrics.py: the worked examples of protocols.md §1.8, §2.8 and §4.3, and agreement with
cityscapesscripts' official pixel-level evaluation on a prediction set in Cityscapes format."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.metrics import (confusion_matrix, hungarian_match, iou_per_class, majority_vote_match, match_clusters,
                           mean_iou, pixel_accuracy, remap_confusion, summarize)

# ----------------------------------------------------------------------------- §1.8 (no matching)

LIN = np.array([[50, 5, 0], [10, 30, 10], [0, 5, 40]])


def test_linear_probe_worked_example():
    iou = iou_per_class(LIN)
    np.testing.assert_allclose(iou, [50 / 65, 30 / 60, 40 / 55])
    assert round(iou[0], 3) == 0.769 and round(iou[2], 3) == 0.727
    assert mean_iou(LIN) == pytest.approx(0.6655, abs=5e-5)
    assert pixel_accuracy(LIN) == pytest.approx(0.8)


def test_absent_class_nan_skip_vs_leopart_zero_fill():
    conf = np.zeros((4, 4), dtype=np.int64)
    conf[:3, :3] = LIN
    assert np.isnan(iou_per_class(conf)[3])
    assert mean_iou(conf) == pytest.approx(0.6655, abs=5e-5)  # NaN-skip (the default)
    assert mean_iou(conf, empty="zero") == pytest.approx(0.4991, abs=5e-5)  # Leopart's PredsmIoU
    res = summarize(conf)
    assert res["miou"] == pytest.approx(66.55, abs=5e-3) and np.isnan(res["per_class_iou"][3])


def test_confusion_matrix_counts_and_ignore():
    gt = torch.tensor([[0, 0, 1, 255], [2, 1, 1, 0]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 2, 1, 0]])
    conf = confusion_matrix(pred, gt, 3)
    expect = np.array([[2, 1, 0], [0, 2, 0], [0, 0, 1]]) + np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(conf.numpy(), expect)  # the 255 pixel is not counted
    assert int(conf.sum()) == 7


def test_extra_prediction_column_counts_as_false_negative():
    # GT row 0 has 4 pixels: 2 right, 1 predicted as class 1, 1 predicted outside the classes (column 2)
    conf = np.array([[2, 1, 1], [0, 3, 0]])
    iou = iou_per_class(conf)
    np.testing.assert_allclose(iou, [2 / 4, 3 / 4])  # the extra column adds to FN only, not to any FP
    assert pixel_accuracy(conf) == pytest.approx(5 / 7)


# ----------------------------------------------------------------------------- §2.8 (matching)

HUNG = np.array([[5, 40, 5], [30, 2, 8], [0, 10, 50]])


def test_hungarian_worked_example():
    mapping = hungarian_match(HUNG)
    # g0<->k1, g1<->k0, g2<->k2  ==  mapping[cluster] = class
    np.testing.assert_array_equal(mapping, [1, 0, 2])
    merged = remap_confusion(HUNG, mapping, 3)
    np.testing.assert_array_equal(merged, [[40, 5, 5], [2, 30, 8], [10, 0, 50]])
    np.testing.assert_allclose(iou_per_class(merged), [40 / 62, 30 / 45, 50 / 73])
    assert mean_iou(merged) == pytest.approx(0.666, abs=5e-4)
    assert pixel_accuracy(merged) == pytest.approx(0.8)
    assert np.trace(merged) == 120


OVER = np.array([[20, 25, 0, 5, 0], [5, 0, 30, 0, 10], [0, 5, 0, 80, 12]])


def test_majority_vote_worked_example():
    mapping = majority_vote_match(OVER)
    np.testing.assert_array_equal(mapping, [0, 0, 1, 2, 2])  # k4 -> g2 (the IoU-greedy rule would pick g1)
    merged = remap_confusion(OVER, mapping, 3)
    np.testing.assert_array_equal(merged, [[45, 0, 5], [5, 30, 10], [5, 0, 92]])
    np.testing.assert_allclose(iou_per_class(merged), [0.750, 0.667, 0.821], atol=5e-4)
    assert mean_iou(merged) == pytest.approx(0.746, abs=5e-4)
    assert pixel_accuracy(merged) == pytest.approx(0.870, abs=5e-4)


def test_rectangular_hungarian_leaves_surplus_clusters_as_false_negatives():
    mapping = match_clusters(OVER, "hungarian")
    assert sorted(mapping[mapping >= 0].tolist()) == [0, 1, 2] and (mapping == -1).sum() == 2
    merged = remap_confusion(OVER, mapping, 3, unmatched="extra")
    assert merged.shape == (3, 4) and merged.sum() == OVER.sum()  # no pixel disappears
    dropped = remap_confusion(OVER, mapping, 3)  # the old behaviour: surplus clusters dropped
    assert dropped.sum() < OVER.sum()
    assert mean_iou(merged) < mean_iou(dropped)


# ----------------------------------------------------------------------------- cityscapesscripts

def _official_module(monkeypatch, root: str):
    monkeypatch.setenv("CITYSCAPES_DATASET", root)
    monkeypatch.setenv("CITYSCAPES_RESULTS", os.path.join(root, "results"))
    monkeypatch.setenv("CITYSCAPES_EXPORT_DIR", root)
    mod = importlib.import_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    mod = importlib.reload(mod)  # its global ``args`` is read from the environment at import
    mod.args.evalInstLevelScore = False
    mod.args.JSONOutput = False
    mod.args.quiet = True
    return mod


def _write_cityscapes(root, gts: list[np.ndarray], preds: list[np.ndarray]):
    """gtFine/val + leftImg8bit/val in the official naming, predictions (labelIds) under results/."""
    gt_files, pred_files = [], []
    os.makedirs(os.path.join(root, "results"), exist_ok=True)
    for i, (gt, pred) in enumerate(zip(gts, preds)):
        city = ["aachen", "bremen"][i % 2]
        stem = f"{city}_{i:06d}_000019"
        for sub in ("gtFine", "leftImg8bit"):
            os.makedirs(os.path.join(root, sub, "val", city), exist_ok=True)
        gt_path = os.path.join(root, "gtFine", "val", city, f"{stem}_gtFine_labelIds.png")
        Image.fromarray(gt.astype(np.uint8), mode="L").save(gt_path)
        img = np.zeros(gt.shape + (3,), np.uint8)
        Image.fromarray(img).save(os.path.join(root, "leftImg8bit", "val", city, f"{stem}_leftImg8bit.png"))
        pred_path = os.path.join(root, "results", f"{stem}_pred.png")
        Image.fromarray(pred.astype(np.uint8), mode="L").save(pred_path)
        gt_files.append(gt_path)
        pred_files.append(pred_path)
    return gt_files, pred_files


def _ours(root, pred_files, classes: int):
    """Our loader's masks + the same label table applied to the predictions, then tasks/metrics."""
    from bench.data.cityscapes import Cityscapes27, Cityscapes27Config

    ds = Cityscapes27(Cityscapes27Config(root=str(root), classes=classes, resize=0, crop=0), "val")
    conf = torch.zeros(ds.num_classes, ds.num_classes + 1, dtype=torch.long)
    by_stem = {os.path.basename(p).replace("_pred.png", ""): p for p in pred_files}
    for i in range(len(ds)):
        stem = os.path.basename(ds.labels[i]).replace("_gtFine_labelIds.png", "")
        pred = ds.lut[np.array(Image.open(by_stem[stem]))].astype(np.int64)
        pred[pred == 255] = ds.num_classes  # a void / not-evaluated prediction: an extra column (FN)
        conf += confusion_matrix(torch.from_numpy(pred), ds.load_mask(i), ds.num_classes, ds.num_classes + 1)
    return conf.numpy(), ds


def test_cityscapes_spec_worked_example_matches_official(tmp_path, monkeypatch):
    gt = np.array([[7, 7, 26, 26], [23, 23, 0, 0]])
    pred = np.array([[7, 26, 26, 26], [23, 7, 23, 7]])
    gts, preds = _write_cityscapes(str(tmp_path), [gt], [pred])
    mod = _official_module(monkeypatch, str(tmp_path))
    official = mod.evaluateImgLists(preds, gts, mod.args)
    conf, ds = _ours(tmp_path, preds, 19)
    iou = iou_per_class(conf)
    names = ds.class_names
    assert iou[names.index("road")] == pytest.approx(1 / 3)
    assert iou[names.index("car")] == pytest.approx(2 / 3)
    assert iou[names.index("sky")] == pytest.approx(0.5)
    assert mean_iou(conf) == pytest.approx(0.5) == official["averageScoreClasses"]


def test_metrics_agree_with_cityscapesscripts(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    gts, preds = [], []
    ids = np.arange(0, 34)
    for _ in range(4):
        # blocky GT covering every labelId, void included; predictions: GT with 40 % of pixels replaced by any id
        gt = np.repeat(np.repeat(rng.choice(ids, size=(6, 12)), 6, 0), 6, 1)
        pred = np.where(rng.random(gt.shape) < 0.4, rng.choice(ids, size=gt.shape), gt)
        gts.append(gt)
        preds.append(pred)
    gt_files, pred_files = _write_cityscapes(str(tmp_path), gts, preds)
    mod = _official_module(monkeypatch, str(tmp_path))
    official = mod.evaluateImgLists(pred_files, gt_files, mod.args)

    conf19, ds19 = _ours(tmp_path, pred_files, 19)
    ours = iou_per_class(conf19)
    for c, name in enumerate(ds19.class_names):
        assert ours[c] == pytest.approx(official["classScores"][name], abs=1e-12), name
    assert mean_iou(conf19) == pytest.approx(official["averageScoreClasses"], abs=1e-12)
    assert 0.3 < mean_iou(conf19) < 0.9  # a non-trivial prediction set

    # the 27-class matrix of the clustering protocol is the official labelId matrix's non-void block
    conf27, _ = _ours(tmp_path, pred_files, 27)
    official_matrix = np.array(official["confMatrix"], dtype=np.int64)
    np.testing.assert_array_equal(conf27[:, :27], official_matrix[7:34, 7:34])
    np.testing.assert_array_equal(conf27.sum(1), official_matrix[7:34, :].sum(1))
