"""``coco_things``: Leopart's COCO-Things linear-probe dataset (protocols.md §1.2), 12 thing supercategories.

Layout (Leopart's ``data_dir``, unchanged)::

    <root>/coco/images/{train2017,val2017}/*.jpg   (or <root>/images/..., <root>/{train,val}2017)
    <root>/annotations/panoptic_annotations/semantic_segmentation_{train,val}2017/*.png
        (panopticapi ``converters/panoptic2semantic_segmentation.py`` output without --things_others)

Label value = COCO panoptic category id (1–200), 0 = unlabeled. Thing ids (1–90, the COCO instance ids) map to
their supercategory's index in the alphabetically sorted list of the 12 thing supercategories; stuff ids and 0
map to 255. The thing id → supercategory table is derived from the thing part of the COCO-Stuff hierarchy
(``resources/coco_stuff_hierarchy.json``: fine index = id − 1, coarse classes 0–11 are the thing supercategories),
so no panoptic JSON is needed. Defaults follow Leopart: 10 % of train2017 (seed 400), all 5,000 val, native size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.data import IGNORE_INDEX
from bench.data._real import resource
from bench.data.coco_stuff import HIERARCHY, LeopartCoco, LeopartCocoConfig
from bench.registry import DATASETS


def things12_lut() -> np.ndarray:
    """256-entry table: panoptic category id -> 12 thing supercategories (sorted names); the rest -> 255."""
    h = resource(HIERARCHY)
    names = h["things12_names"]
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for cat_id in range(1, 91):  # COCO thing ids; fine index = id - 1
        coarse = h["fine_to_coarse27"][cat_id - 1]
        group = h["coarse27_names"][coarse]
        assert group.endswith("-things"), group
        lut[cat_id] = names.index(group[: -len("-things")])
    return lut


@dataclass
class CocoThingsConfig(LeopartCocoConfig):
    """``coco_things``: the labels are annotations/panoptic_annotations/semantic_segmentation_{split}2017."""


@DATASETS.register("coco_things")
class CocoThings(LeopartCoco):
    """12 COCO thing supercategories (accessory … vehicle), stuff and unlabeled = 255."""

    dataset_name = "coco_things"
    config_class = CocoThingsConfig
    num_classes = 12
    class_names = list(resource(HIERARCHY)["things12_names"])
    label_folder = "semantic_segmentation_{sd}"
    label_parent = ("panoptic_annotations",)
    label_what = "panoptic semantic-segmentation PNGs from panopticapi"
    lut = staticmethod(things12_lut)
