"""``cityscapes27``: Cityscapes fine annotations for the clustering protocol (protocols.md §2.3, §2.4, §4.2).

Layout (the official one, unchanged)::

    <root>/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Classes come from cityscapesscripts' label table (``cityscapesscripts.helpers.labels``), not a hand-written one:
the 27 classes are the labels with a non-negative id outside the ``void`` category, in id order, which is
labelId 7–33 → 0–26 (STEGO's ``first_nonvoid = 7``); void ids 0–6 and anything else → 255. ``classes=19``
gives the official 19 evaluated classes instead (the table's trainIds). The protocol's shorter side 320 and
320×320 centre crop are the defaults (``resize``/``crop``; 0 turns them off); val is the official 500 images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from bench.data import IGNORE_INDEX
from bench.data._real import FileSegDataset, check_common, require_dir, require_root
from bench.errors import BenchError
from bench.registry import DATASETS

IMG_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def _cs_labels():
    from cityscapesscripts.helpers.labels import labels

    return labels


def cityscapes_table(classes: int = 27) -> tuple[np.ndarray, list[str]]:
    """(256-entry labelId -> class table, class names) from cityscapesscripts' label list."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    if classes == 27:
        kept = sorted((lb for lb in _cs_labels() if lb.id >= 0 and lb.category != "void"), key=lambda lb: lb.id)
        for c, lb in enumerate(kept):
            lut[lb.id] = c
        return lut, [lb.name for lb in kept]
    names = {}
    for lb in _cs_labels():
        if lb.id >= 0 and not lb.ignoreInEval and 0 <= lb.trainId < 255:
            lut[lb.id] = lb.trainId
            names[lb.trainId] = lb.name
    return lut, [names[t] for t in sorted(names)]


@dataclass
class Cityscapes27Config:
    root: str = ""  # folder holding leftImg8bit/ and gtFine/
    classes: int = 27  # 27 (clustering protocol) | 19 (official evaluated classes, trainIds)
    resize: int = 320  # shorter side (protocols.md §2.4); 0 = native 1024x2048
    crop: int = 320  # centre crop side; 0 = none
    max_images: int = 0  # first N images of each split (sorted by file name); 0 = all

    def validate(self, where: str) -> None:
        if self.classes not in (19, 27):
            raise BenchError(f"{where}.classes: expected 27 or 19, got {self.classes}")
        check_common(where, self.resize, self.crop, 1.0, self.max_images)


@DATASETS.register("cityscapes27")
class Cityscapes27(FileSegDataset):
    """Cityscapes with the 27 non-void classes (labelId − 7), void = 255."""

    config_class = Cityscapes27Config
    num_classes = 27
    class_names = cityscapes_table(27)[1]
    expected_sizes = {"train": 2_975, "val": 500}

    def __init__(self, cfg: Cityscapes27Config, split: str):
        name = "cityscapes27"
        if split not in ("train", "val"):
            raise BenchError(f"cityscapes27: unknown split '{split}'; valid: train, val")
        root = require_root(name, cfg.root, "the Cityscapes folder with leftImg8bit/ and gtFine/")
        img_root = require_dir(name, os.path.join(root, "leftImg8bit", split), "leftImg8bitTrainvaltest.zip images")
        lab_root = require_dir(name, os.path.join(root, "gtFine", split), "gtFine_trainvaltest.zip annotations")
        images, labels, missing = [], [], []
        for city in sorted(os.listdir(img_root)):
            cdir = os.path.join(img_root, city)
            if not os.path.isdir(cdir):
                continue
            present = set(os.listdir(os.path.join(lab_root, city))) if os.path.isdir(
                os.path.join(lab_root, city)) else set()
            for fn in sorted(os.listdir(cdir)):
                if not fn.endswith(IMG_SUFFIX):
                    continue
                lab = fn[: -len(IMG_SUFFIX)] + LABEL_SUFFIX
                if lab not in present:
                    missing.append(os.path.join(lab_root, city, lab))
                images.append(os.path.join(cdir, fn))
                labels.append(os.path.join(lab_root, city, lab))
        if missing:
            raise BenchError(f"data.{name}: expected file {missing[0]} ({len(missing)} label files missing)")
        if not images:
            raise BenchError(f"data.{name}: no <city>/*{IMG_SUFFIX} files in {img_root}")
        lut, names = cityscapes_table(cfg.classes)
        super().__init__(name, split, images, labels, lut, cfg.resize, cfg.crop, cfg.max_images, img_root)
        if cfg.classes != 27:
            self.num_classes, self.class_names = len(names), names
