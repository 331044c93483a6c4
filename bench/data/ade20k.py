"""``ade20k``: ADE20K scene parsing (SceneParsing / ADEChallengeData2016), 150 classes (protocols.md §7.4).

Layout, read unchanged (``root`` is ``ADEChallengeData2016`` or its parent)::

    <root>/images/{training,validation}/ADE_{train,val}_<8 digits>.jpg
    <root>/annotations/{training,validation}/ADE_{train,val}_<8 digits>.png   (L-mode PNGs, 0..150)

Labels as mmsegmentation's ``reduce_zero_label=True``: value 0 ("other objects" / unlabelled) becomes 255
(ignore), values 1..150 become classes 0..149, anything above 150 stays ignore. Splits: train = training
(20,210 images), val = validation (2,000). ``train_fraction`` takes a seeded random subset of train (the
data-efficiency protocols); images keep their native size unless ``resize`` / ``crop`` are set (the linear
probe's and hbird's presets resize to their square input).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from bench.data import IGNORE_INDEX
from bench.data._real import (FileSegDataset, check_common, first_dir, list_stems, pair_files, require_dir,
                              require_root, take_fraction)
from bench.errors import BenchError
from bench.registry import DATASETS

# mmsegmentation ADE20KDataset class order (annotation value v -> class v - 1)
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]
_SPLIT_DIRS = {"train": "training", "val": "validation"}


def reduce_zero_label_lut(num_classes: int = 150) -> np.ndarray:
    """256 entries: 0 -> 255, v in 1..num_classes -> v - 1, everything else -> 255 (mmseg's reduce_zero_label)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[1:num_classes + 1] = np.arange(num_classes)
    return lut


@dataclass
class Ade20kConfig:
    root: str = ""  # ADEChallengeData2016 (images/, annotations/) or its parent
    resize: int = 0  # shorter side (0 = native)
    crop: int = 0  # centre crop (0 = none)
    train_fraction: float = 1.0
    fraction_seed: int = 0
    max_images: int = 0

    def validate(self, where: str) -> None:
        check_common(where, self.resize, self.crop, self.train_fraction, self.max_images)


@DATASETS.register("ade20k")
class Ade20k(FileSegDataset):
    config_class = Ade20kConfig
    num_classes = 150
    class_names = ADE20K_CLASSES
    expected_sizes = {"train": 20_210, "val": 2_000}

    def __init__(self, cfg: Ade20kConfig, split: str):
        name = "ade20k"
        if split not in _SPLIT_DIRS:
            raise BenchError(f"ade20k: unknown split '{split}'; valid: train, val")
        root = require_root(name, cfg.root, "the ADEChallengeData2016 folder (images/, annotations/)")
        base = os.path.dirname(first_dir(name, [os.path.join(root, "images"),
                                                os.path.join(root, "ADEChallengeData2016", "images")],
                                         "ADEChallengeData2016 images"))
        sub = _SPLIT_DIRS[split]
        img_dir = require_dir(name, os.path.join(base, "images", sub), f"{split} images")
        ann_dir = require_dir(name, os.path.join(base, "annotations", sub), f"{split} annotation PNGs")
        images = list_stems(img_dir, ".jpg")
        labels = list_stems(ann_dir, ".png")
        ids = sorted(images)
        if split == "train":
            ids = take_fraction(ids, cfg.train_fraction, cfg.fraction_seed)
        paths_i, paths_l = pair_files(name, ids, lambda i: os.path.join(img_dir, i + ".jpg"),
                                      lambda i: os.path.join(ann_dir, i + ".png"), set(images.values()),
                                      set(labels.values()))
        super().__init__(name, split, paths_i, paths_l, reduce_zero_label_lut(), cfg.resize, cfg.crop,
                         cfg.max_images, img_dir)
        self.notes.append(f"layout {base}: images/{sub}/, annotations/{sub}/ (reduce_zero_label)")
