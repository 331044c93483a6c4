"""COCOeval wrapper: the spec's worked AP example (protocols.md §3.5), names, NaN convention, conversions."""

import math
import re

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tasks.detection.coco import (STAT_NAMES, coco_evaluate, coco_from_dict, dataset_to_coco, detections_to_results,
                                  encode_mask)

SIZE = 64


def _rect(x, y, w, h, size=SIZE):
    m = np.zeros((size, size), bool)
    m[y:y + h, x:x + w] = True
    return m


class _OneImage:
    """A dataset of one 64×64 image with GT A = [0,0,10,10] and B = [20,20,10,10] (one category)."""

    thing_classes = ["thing"]
    has_instances = True

    def __len__(self):
        return 1

    def __getitem__(self, i):
        import torch

        insts = [{"bbox": [0.0, 0.0, 10.0, 10.0], "category_id": 1, "mask": _rect(0, 0, 10, 10), "area": 100.0,
                  "iscrowd": 0},
                 {"bbox": [20.0, 20.0, 10.0, 10.0], "category_id": 1, "mask": _rect(20, 20, 10, 10), "area": 100.0,
                  "iscrowd": 0}]
        return {"image": torch.zeros(3, SIZE, SIZE, dtype=torch.uint8), "instances": insts}


# the spec's detections, xywh: d1 = A (0.9), d2 = [21,21,10,10] (0.8, IoU 81/119 with B), d3 = FP (0.7)
DETS = [([0, 0, 10, 10], 0.9), ([21, 21, 10, 10], 0.8), ([50, 50, 10, 10], 0.7)]


def _results():
    boxes = np.array([[x, y, x + w, y + h] for (x, y, w, h), _ in DETS], float)
    scores = np.array([s for _, s in DETS])
    masks = np.stack([_rect(*b) for b, _ in DETS])
    return detections_to_results(1, boxes, scores, np.ones(3, int), masks)


def test_iou_of_d2_is_81_over_119():
    iou = mask_utils.iou([[21, 21, 10, 10]], [[20, 20, 10, 10]], [0])
    assert iou[0, 0] == pytest.approx(81 / 119)


def test_worked_example_bbox_and_segm():
    gt = coco_from_dict(dataset_to_coco(_OneImage()))
    metrics, raw, text = coco_evaluate(gt, _results())
    ap_high = 51 / 101  # 6 thresholds 0.70..0.95: only recall 0.5 reached, at precision 1
    expected = {"AP": (4 * 1.0 + 6 * ap_high) / 10, "AP50": 1.0, "AP75": ap_high, "APs": (4 + 6 * ap_high) / 10,
                "APm": -1.0, "APl": -1.0}
    for iou_type in ("bbox", "segm"):  # rectangles: mask IoU equals box IoU
        stats = dict(zip(STAT_NAMES, raw[iou_type]))
        for name, value in expected.items():
            assert stats[name] == pytest.approx(value, abs=1e-12), (iou_type, name)
        assert metrics[f"{iou_type}_AP"] == pytest.approx(100 * expected["AP"])
        assert round(metrics[f"{iou_type}_AP"] / 100, 3) == 0.703
        assert math.isnan(metrics[f"{iou_type}_APm"]) and math.isnan(metrics[f"{iou_type}_APl"])
        # recall with 1 detection: d1 finds A at every threshold -> 1/2
        assert stats["AR1"] == pytest.approx(0.5)
        # with 10: B found at the 4 thresholds <= 0.65 -> (10·0.5 + 4·0.5)/10
        assert stats["AR10"] == pytest.approx((10 * 0.5 + 4 * 0.5) / 10)


def test_metrics_are_what_pycocotools_printed():
    gt = coco_from_dict(dataset_to_coco(_OneImage()))
    metrics, raw, text = coco_evaluate(gt, _results())
    printed = [float(v) for v in re.findall(r"\] = (-?\d+\.\d+)", text)]
    assert len(printed) == 24  # 12 lines per IoU type
    ours = [metrics[f"{t}_{n}"] for t in ("bbox", "segm") for n in STAT_NAMES]
    for p, m in zip(printed, ours):
        assert (p == -1.0 and math.isnan(m)) or p == pytest.approx(round(m / 100, 3), abs=1e-9)
    assert list(metrics)[:3] == ["bbox_AP", "bbox_AP50", "bbox_AP75"]
    assert len(metrics) == 24


def test_segm_uses_mask_area_not_box_area():
    """A false positive whose mask is small but whose box is large must count in segm APs (mask area).

    detectron2 drops ``bbox`` from mask results for this reason; with it, ``loadRes`` would take the box area,
    the false positive would fall in the "large" range and APs would read 100 instead of 50.
    """
    size = 128
    diag = np.zeros((size, size), bool)
    anti = np.zeros((size, size), bool)
    for i in range(110):
        diag[i, i:i + 3] = True
        anti[i, 109 - i:112 - i] = True
    assert diag.sum() < 32 ** 2 and anti.sum() < 32 ** 2

    class DS:
        thing_classes = ["line"]

        def __len__(self):
            return 1

        def __getitem__(self, i):
            import torch

            return {"image": torch.zeros(3, size, size, dtype=torch.uint8),
                    "instances": [{"bbox": [0.0, 0.0, 112.0, 110.0], "category_id": 1, "mask": diag}]}

    gt = coco_from_dict(dataset_to_coco(DS()))
    assert gt.dataset["annotations"][0]["area"] == diag.sum()
    boxes = np.array([[0, 0, 112, 110], [0, 0, 112, 110]])
    res = detections_to_results(1, boxes, np.array([0.9, 0.5]), np.array([1, 1]), np.stack([anti, diag]))
    assert all("bbox" not in r for r in res["segm"])
    metrics, _, _ = coco_evaluate(gt, res, ("segm",))
    assert metrics["segm_APs"] == pytest.approx(100 * 0.5, abs=1e-9)  # FP first, then the TP: precision 1/2


def test_empty_detections_score_zero():
    gt = coco_from_dict(dataset_to_coco(_OneImage()))
    metrics, raw, _ = coco_evaluate(gt, {"bbox": [], "segm": []})
    assert metrics["bbox_AP"] == 0.0 and metrics["segm_AP"] == 0.0
    assert math.isnan(metrics["bbox_APl"])


def test_ground_truth_as_detections_is_perfect_on_synthetic():
    """Round trip of the conversion: every val instance detected exactly -> AP 100 for boxes and masks."""
    from bench.data.synthetic import SyntheticConfig, SyntheticScenes

    ds = SyntheticScenes(SyntheticConfig(num_val=6), "val")
    gt = coco_from_dict(dataset_to_coco(ds))
    results = {"bbox": [], "segm": []}
    for i in range(len(ds)):
        insts = ds[i]["instances"]
        boxes = np.array([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (x["bbox"] for x in insts)])
        out = detections_to_results(i + 1, boxes, np.linspace(1, 0.5, len(insts)),
                                    np.array([x["category_id"] for x in insts]), np.stack([x["mask"] for x in insts]))
        results["bbox"] += out["bbox"]
        results["segm"] += out["segm"]
    metrics, _, _ = coco_evaluate(gt, results)
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["segm_AP"] == pytest.approx(100.0)
    # labels shifted by one category: nothing matches
    for r in results["bbox"] + results["segm"]:
        r["category_id"] = r["category_id"] % 3 + 1
    metrics, _, _ = coco_evaluate(gt, results)
    assert metrics["bbox_AP"] == 0.0 and metrics["segm_AP"] == 0.0


def test_category_ids_map_back_to_original_ids():
    res = detections_to_results(7, np.array([[1, 2, 4, 6]]), np.array([0.5]), np.array([2]), None,
                                category_ids=[1, 3, 90])
    assert res["bbox"][0] == {"image_id": 7, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}
    assert res["segm"] == []


def test_rle_round_trip():
    m = _rect(3, 5, 7, 2)
    rle = encode_mask(m)
    assert isinstance(rle["counts"], str)
    assert np.array_equal(mask_utils.decode(rle).astype(bool), m)
    assert mask_utils.area(rle) == 14
