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

import os
from dataclasses import dataclass

import numpy as np

from bench.data import IGNORE_INDEX
from bench.data._real import (FileSegDataset, check_common, first_dir, list_stems, pair_files, require_root,
                              resource, take_fraction)
from bench.data.coco_stuff import HIERARCHY, _leopart_images, _split_dir
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
class CocoThingsConfig:
    root: str = ""  # Leopart's data_dir: coco/images/ and annotations/panoptic_annotations/
    images: str = ""  # "" = first of coco/images, images, . (each holding {train,val}2017)
    labels: str = ""  # "" = first of annotations/panoptic_annotations, annotations, .
    train_fraction: float = 0.1  # Leopart: random 10 % of train2017 (seed 400)
    fraction_seed: int = 400
    resize: int = 0
    crop: int = 0
    max_images: int = 0

    def validate(self, where: str) -> None:
        check_common(where, self.resize, self.crop, self.train_fraction, self.max_images)


@DATASETS.register("coco_things")
class CocoThings(FileSegDataset):
    """12 COCO thing supercategories (accessory … vehicle), stuff and unlabeled = 255."""

    config_class = CocoThingsConfig
    num_classes = 12
    class_names = list(resource(HIERARCHY)["things12_names"])
    expected_sizes = {"train": 11_828, "val": 5_000}

    def __init__(self, cfg: CocoThingsConfig, split: str):
        name = "coco_things"
        sd = _split_dir(split)
        root = require_root(name, cfg.root, "Leopart's COCO folder with coco/images/ and annotations/")
        img_dir = _leopart_images(name, root, cfg.images, sd)
        sem = f"semantic_segmentation_{sd}"
        cands = [os.path.join(root, cfg.labels, sem)] if cfg.labels else [
            os.path.join(root, "annotations", "panoptic_annotations", sem), os.path.join(root, "annotations", sem),
            os.path.join(root, sem)]
        lab_dir = first_dir(name, cands, "panoptic semantic-segmentation PNGs from panopticapi")
        img_names = list_stems(img_dir, ".jpg")
        lab_names = list_stems(lab_dir, ".png")
        ids = sorted(img_names)
        if split == "train":
            ids = take_fraction(ids, cfg.train_fraction, cfg.fraction_seed)
        images, labels = pair_files(name, ids, lambda i: os.path.join(img_dir, i + ".jpg"),
                                    lambda i: os.path.join(lab_dir, i + ".png"),
                                    set(img_names.values()), set(lab_names.values()))
        super().__init__(name, split, images, labels, things12_lut(), cfg.resize, cfg.crop, cfg.max_images, img_dir)
        if split == "train" and cfg.train_fraction != 0.1:
            self.expected_sizes = {}
