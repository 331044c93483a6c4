"""COCO-format conversion and the pycocotools ``COCOeval`` wrapper (protocols.md §3.4, §3.5, §4.5).

- ``dataset_to_coco(ds)``: a dataset whose items carry ``instances`` (``bbox`` [x, y, w, h] pixels,
  ``category_id`` 1..K, ``mask`` H×W bool, optional ``area`` / ``iscrowd``) -> a COCO ground-truth dict
  (images, annotations with RLE segmentations, categories). Image ids are ``item["image_id"]`` when the
  dataset gives one, else ``index + 1``.
- ``detections_to_results(...)``: one image's detections (boxes N×4 x0,y0,x1,y1, scores N, labels N, masks
  N×H×W bool) -> COCO result dicts, one list per IoU type.
- ``coco_evaluate(gt, results, iou_types)``: runs ``COCOeval`` exactly as pycocotools does (evaluate,
  accumulate, summarize; default ``Params``: IoU 0.50:0.05:0.95, 101 recall points, maxDets 1/10/100, the
  three area ranges) and returns the 12-entry stats vector per IoU type, named ``<iou>_<stat>`` in percent,
  with pycocotools' ``-1`` (undefined: no ground truth in that area range) as NaN, the detectron2 convention.
  The text pycocotools printed comes back too.

As detectron2's ``COCOEvaluator`` does, mask results carry no ``bbox`` (otherwise ``loadRes`` would take the
box area as the instance area for the small/medium/large split of mask AP), and box results no mask.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Iterable, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def encode_mask(mask: np.ndarray) -> dict:
    """H×W bool -> compressed RLE with ``counts`` as str (JSON-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def encode_masks(masks: np.ndarray) -> list[dict]:
    """N×H×W bool -> N compressed RLEs (one pycocotools call)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(np.asarray(masks, dtype=np.uint8).transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def dataset_to_coco(dataset, indices: Optional[Iterable[int]] = None, thing_classes: Optional[Sequence[str]] = None,
                    category_ids: Optional[Sequence[int]] = None) -> dict:
    """COCO ground-truth dict for ``dataset`` (all items, or ``indices``).

    ``category_ids[k - 1]`` is the id written for the dataset's category ``k`` (identity when None);
    ``thing_classes`` names them (``dataset.thing_classes`` by default).
    """
    names = list(thing_classes if thing_classes is not None else getattr(dataset, "thing_classes", []))
    ids = list(category_ids) if category_ids is not None else list(range(1, len(names) + 1))
    images, annotations = [], []
    for index in (range(len(dataset)) if indices is None else indices):
        item = dataset[index]
        h, w = item["image"].shape[-2:]
        image_id = int(dataset.image_id(index) if hasattr(dataset, "image_id") else item.get("image_id", index + 1))
        images.append({"id": image_id, "width": int(w), "height": int(h), "file_name": f"{image_id:012d}.png"})
        for inst in item.get("instances", []):
            ann = instance_to_annotation(inst, image_id, len(annotations) + 1)
            ann["category_id"] = ids[ann["category_id"] - 1]
            annotations.append(ann)
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in zip(ids, names)]
    return {"info": {"description": "bench COCO-format ground truth"}, "images": images,
            "annotations": annotations, "categories": categories}


def instance_to_annotation(inst: dict, image_id: int, ann_id: int) -> dict:
    mask = np.asarray(inst["mask"], dtype=bool)
    area = float(inst["area"]) if "area" in inst else float(mask.sum())
    return {"id": ann_id, "image_id": image_id, "category_id": int(inst["category_id"]),
            "bbox": [float(v) for v in inst["bbox"]], "area": area, "iscrowd": int(inst.get("iscrowd", 0)),
            "segmentation": encode_mask(mask)}


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools ``COCO`` index over an in-memory dict (no file, no printing)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_results(image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                          masks: Optional[np.ndarray] = None,
                          category_ids: Optional[Sequence[int]] = None) -> dict[str, list[dict]]:
    """One image's detections -> {"bbox": [...], "segm": [...]} COCO result dicts.

    boxes N×4 (x0, y0, x1, y1) pixels, scores N, labels N (1..K), masks N×H×W bool (optional).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out: dict[str, list[dict]] = {"bbox": [], "segm": []}
    rles = encode_masks(masks) if masks is not None else []
    for i in range(len(boxes)):
        cat = int(labels[i]) if category_ids is None else int(category_ids[int(labels[i]) - 1])
        x0, y0, x1, y1 = boxes[i].tolist()
        score = float(scores[i])
        out["bbox"].append({"image_id": int(image_id), "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": score})
        if rles:
            out["segm"].append({"image_id": int(image_id), "category_id": cat, "segmentation": rles[i],
                                "score": score})
    return out


def load_results(gt: COCO, results: list[dict], iou_type: str) -> COCO:
    """``gt.loadRes`` that also accepts an empty list (pycocotools indexes ``anns[0]``)."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes(copy.deepcopy(results))
    return coco_from_dict({"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                           "annotations": []})


def coco_evaluate(gt: COCO, results: dict[str, list[dict]], iou_types: Sequence[str] = IOU_TYPES,
                  img_ids: Optional[Sequence[int]] = None) -> tuple[dict, dict, str]:
    """(metrics, raw stats, printed text).

    metrics: ``{"bbox_AP": 70.3, "bbox_AP50": ..., "segm_AP": ...}`` in percent (stats·100, -1 -> NaN),
    in ``STAT_NAMES`` order per IoU type; raw: ``{iou_type: the 12 stats exactly as pycocotools computed,
    "<iou_type>_precision": the accumulated T×R×K×A×M precision array}``;
    text: what ``evaluate`` / ``accumulate`` / ``summarize`` printed.
    """
    metrics: dict = {}
    raw: dict = {}
    printed = io.StringIO()
    for iou_type in iou_types:
        dt = load_results(gt, results.get(iou_type, []), iou_type)
        evaluator = COCOeval(gt, dt, iou_type)
        if img_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in img_ids)
        with contextlib.redirect_stdout(printed):
            print(f"iouType={iou_type}")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [float(s) for s in evaluator.stats]
        raw[iou_type] = stats
        raw[f"{iou_type}_precision"] = evaluator.eval["precision"]  # T×R×K×A×M, -1 = undefined
        for name, value in zip(STAT_NAMES, stats):
            metrics[f"{iou_type}_{name}"] = math.nan if value < 0 else value * 100.0
    return metrics, raw, printed.getvalue()
