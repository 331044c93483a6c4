"""``voc12``: PASCAL VOC 2012 segmentation, 21 classes (background + 20), 255 = ignore (protocols.md §1.2).

Two layouts are read unchanged (``root`` may be the folder itself or a parent holding ``VOCdevkit/VOC2012``,
``VOC2012`` or ``VOCSegmentation``):

* the devkit: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNGs), ``SegmentationClassAug/
  <id>.png`` (the SBD-augmented grayscale masks), ``ImageSets/Segmentation/{train,val}.txt``;
* Leopart's: ``images/<id>.jpg``, ``SegmentationClass/``, ``SegmentationClassAug/``, ``sets/{train,trainaug,val}.txt``.

Splits: train = ``trainaug`` (10,582 images, masks from SegmentationClassAug; the list is ``trainaug.txt`` or
``train_aug.txt`` when present, otherwise every SegmentationClassAug mask whose id is not in val.txt, which is
how trainaug is defined) or ``train`` (1,464, SegmentationClass); val = ``val.txt`` (1,449, SegmentationClass).
Palette PNGs are read as palette indices; an RGB-converted mask is decoded through the VOC colour map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from bench.data._real import (FileSegDataset, check_common, identity_lut, list_stems, pair_files, read_list,
                              require_root)
from bench.errors import BenchError
from bench.registry import DATASETS

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]


def voc_colormap() -> np.ndarray:
    """256×3 uint8: the devkit's colour of palette index i (bits of i spread over R, G, B from the top bit)."""
    cmap = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def _rgb_to_index(rgb: np.ndarray) -> np.ndarray:
    cmap = voc_colormap()
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    table = {int(r) << 16 | int(g) << 8 | int(b): i for i, (r, g, b) in enumerate(cmap[:21])}
    table[224 << 16 | 224 << 8 | 192] = 255  # object boundary
    out = np.full(code.shape, 255, dtype=np.uint8)
    for key, idx in table.items():
        out[code == key] = idx
    return out


def _find_base(name: str, root: str) -> tuple[str, str, str]:
    """(base folder, image folder name, list folder) for the devkit or Leopart layout."""
    for base in (root, os.path.join(root, "VOCdevkit", "VOC2012"), os.path.join(root, "VOC2012"),
                 os.path.join(root, "VOCSegmentation")):
        if os.path.isdir(os.path.join(base, "JPEGImages")):
            return base, "JPEGImages", os.path.join(base, "ImageSets", "Segmentation")
        if os.path.isdir(os.path.join(base, "images")) and os.path.isdir(os.path.join(base, "sets")):
            return base, "images", os.path.join(base, "sets")
    raise BenchError(f"data.{name}: expected folder {os.path.join(root, 'JPEGImages')} (VOC2012 devkit) or "
                     f"{os.path.join(root, 'VOCSegmentation', 'images')} (Leopart layout)")


@dataclass
class Voc12Config:
    root: str = ""  # VOC2012 (or VOCdevkit, its parent, or Leopart's VOCSegmentation)
    train_split: str = "trainaug"  # trainaug (10,582, SegmentationClassAug) | train (1,464, SegmentationClass)
    resize: int = 0
    crop: int = 0
    max_images: int = 0

    def validate(self, where: str) -> None:
        if self.train_split not in ("trainaug", "train"):
            raise BenchError(f"{where}.train_split: unknown split '{self.train_split}'; valid: trainaug, train")
        check_common(where, self.resize, self.crop, 1.0, self.max_images)


@DATASETS.register("voc12")
class Voc12(FileSegDataset):
    config_class = Voc12Config
    num_classes = 21
    class_names = VOC_CLASSES
    expected_sizes = {"train": 10_582, "val": 1_449}

    def __init__(self, cfg: Voc12Config, split: str):
        name = "voc12"
        if split not in ("train", "val"):
            raise BenchError(f"voc12: unknown split '{split}'; valid: train, val")
        root = require_root(name, cfg.root, "the VOC2012 folder (JPEGImages/, SegmentationClass/, ImageSets/)")
        base, img_sub, sets = _find_base(name, root)
        img_dir = os.path.join(base, img_sub)
        list_name = "val" if split == "val" else cfg.train_split
        mask_sub = "SegmentationClassAug" if list_name == "trainaug" else "SegmentationClass"
        mask_dir = os.path.join(base, mask_sub)
        if not os.path.isdir(mask_dir):
            raise BenchError(f"data.{name}: expected folder {mask_dir} ({list_name} masks)")
        ids = None
        for fn in ((f"{list_name}.txt", "train_aug.txt") if list_name == "trainaug" else (f"{list_name}.txt",)):
            if os.path.isfile(os.path.join(sets, fn)):
                ids = read_list(os.path.join(sets, fn))
                break
        if ids is None and list_name == "trainaug":
            val_list = os.path.join(sets, "val.txt")
            if not os.path.isfile(val_list):
                raise BenchError(f"data.{name}: expected file {val_list} (VOC2012 val list)")
            val = set(read_list(val_list))
            ids = sorted(s for s in list_stems(mask_dir, ".png") if s not in val)
        if ids is None:
            raise BenchError(f"data.{name}: expected file {os.path.join(sets, list_name + '.txt')} "
                             f"(VOC2012 {list_name} list)")
        images, labels = pair_files(name, ids, lambda i: os.path.join(img_dir, i + ".jpg"),
                                    lambda i: os.path.join(mask_dir, i + ".png"))
        super().__init__(name, split, images, labels, identity_lut(21), cfg.resize, cfg.crop, cfg.max_images, img_dir)
        if split == "train" and cfg.train_split == "train":
            self.expected_sizes = {"train": 1_464, "val": 1_449}
        self.notes.append(f"layout {base}: images {img_sub}/, {split} masks {mask_sub}/")

    def palette_lut(self, rgb: np.ndarray) -> np.ndarray:
        return _rgb_to_index(rgb)
