"""COCO-Stuff loaders: ``coco_stuff27`` (clustering protocol, protocols.md §2.2) and ``coco_stuff15`` (Leopart's
linear-probe COCO-Stuff, §1.2).

``coco_stuff27`` reads the layout of the COCO-Stuff release as PiCIE and STEGO use it, unchanged::

    <root>/images/{train2017,val2017}/<12-digit id>.jpg           COCO 2017 images
    <root>/annotations/{train2017,val2017}/<12-digit id>.png      stuffthingmaps_trainval2017.zip
    <root>/curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse_7.txt   IIC/PiCIE curated lists (subset=curated)

Label PNG value = COCO-Stuff id − 1 (0–181), 255 = unlabeled; the 182→27 fine-to-coarse table is data
(``resources/coco_stuff_hierarchy.json``, with its provenance). ``subset=curated`` (default) gives the standard
49,629 train / 2,175 val images; the protocol's resize of the shorter side to 320 and the 320×320 centre crop
are the defaults (``resize``/``crop``; 0 turns them off). ``train_fraction=0.1`` gives a seeded random 10 % of
train (Leopart's linear-probe sampling; reproducible, not Leopart's filesystem-order-dependent subset).

``coco_stuff15`` reads Leopart's layout::

    <root>/coco/images/{train2017,val2017}/*.jpg   (or <root>/images/..., <root>/{train,val}2017)
    <root>/annotations/annotations/stuff_annotations/stuff_{train,val}2017_pixelmaps/*.png
        (or <root>/annotations/stuff_{train,val}2017_pixelmaps, the official zip extracted in place)

Pixel values 92–182 are stuff ids → the 15 alphabetically sorted stuff supercategories; 0 and 183 ("other", the
thing pixels) → 255. Defaults follow Leopart: 10 % of train2017 (seed 400), all 5,000 val images, native size
(the linear probe's ``leopart`` preset resizes to 448).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from bench.data import IGNORE_INDEX
from bench.data._real import (FileSegDataset, check_common, first_dir, list_stems, pair_files, read_list,
                              require_dir, require_file, require_root, resource, take_fraction)
from bench.errors import BenchError
from bench.registry import DATASETS

HIERARCHY = "coco_stuff_hierarchy.json"
CURATED_FILE = "Coco164kFull_Stuff_Coarse_7.txt"
# md5 of the published curated lists (protocols.md §2.2); ``bench data check`` reports a mismatch
CURATED_MD5 = {"train": "bf3d54a2d1d4f2b5f9ff6bb7de1eaa18", "val": "de66cfb97c6ea796c3ba8e001edda199"}
CURATED_SIZES = {"train": 49_629, "val": 2_175}


def _split_dir(split: str) -> str:
    if split not in ("train", "val"):
        raise BenchError(f"unknown split '{split}'; valid: train, val")
    return f"{split}2017"


def split_pairs(name: str, split: str, ids: list, cfg, img_dir: str, img_names: dict, lab_dir: str,
                lab_names: dict) -> tuple[list, list]:
    """(image paths, label paths) of the ids of one split: ``<img_dir>/<id>.jpg`` with ``<lab_dir>/<id>.png``;
    train keeps the seeded ``cfg.train_fraction`` of them. A missing file on either side is one clear error."""
    if split == "train":
        ids = take_fraction(ids, cfg.train_fraction, cfg.fraction_seed)
    return pair_files(name, ids, lambda i: os.path.join(img_dir, i + ".jpg"), lambda i: os.path.join(lab_dir, i + ".png"),
                      set(img_names.values()), set(lab_names.values()))


def fine_to_coarse27_lut() -> np.ndarray:
    """256-entry table: stuffthingmaps value (0–181) -> coarse class 0–26, everything else -> 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:182] = resource(HIERARCHY)["fine_to_coarse27"]
    return lut


def stuff15_lut() -> np.ndarray:
    """256-entry table: stuff pixelmap value (COCO-Stuff id 92–182) -> 15 classes; 0, 183, rest -> 255."""
    h = resource(HIERARCHY)
    to15 = {int(k): v for k, v in h["coarse27_to_stuff15"].items()}
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for cid in range(92, 183):
        lut[cid] = to15[h["fine_to_coarse27"][cid - 1]]
    return lut


@dataclass
class CocoStuff27Config:
    root: str = ""  # folder holding images/, annotations/ (stuffthingmaps) and curated/
    images: str = "images"  # <root>/<images>/{train2017,val2017}
    labels: str = "annotations"  # <root>/<labels>/{train2017,val2017}: stuffthingmaps PNGs
    subset: str = "curated"  # curated: IIC lists Coco164kFull_Stuff_Coarse_7 (49,629/2,175) | all: every image
    curated_dir: str = "curated"  # <root>/<curated_dir>/{train2017,val2017}/Coco164kFull_Stuff_Coarse_7.txt
    train_fraction: float = 1.0  # < 1: seeded random fraction of the train images (Leopart's 10 %: 0.1)
    fraction_seed: int = 400
    resize: int = 320  # shorter side (protocols.md §2.4); 0 = native
    crop: int = 320  # centre crop side; 0 = none
    max_images: int = 0  # first N images of each split (quick runs); 0 = all

    def validate(self, where: str) -> None:
        if self.subset not in ("curated", "all"):
            raise BenchError(f"{where}.subset: unknown subset '{self.subset}'; valid: curated, all")
        check_common(where, self.resize, self.crop, self.train_fraction, self.max_images)


@DATASETS.register("coco_stuff27")
class CocoStuff27(FileSegDataset):
    """COCO-Stuff-27: 12 thing + 15 stuff coarse classes (IIC order), unlabeled = 255."""

    config_class = CocoStuff27Config
    num_classes = 27
    class_names = list(resource(HIERARCHY)["coarse27_names"])
    expected_sizes = {"train": 118_287, "val": 5_000}

    def __init__(self, cfg: CocoStuff27Config, split: str):
        name = "coco_stuff27"
        sd = _split_dir(split)
        root = require_root(name, cfg.root, "the COCO-Stuff folder with images/ and annotations/")
        img_dir = require_dir(name, os.path.join(root, cfg.images, sd), f"COCO {sd} images")
        lab_dir = require_dir(name, os.path.join(root, cfg.labels, sd), f"stuffthingmaps {sd} PNGs")
        img_names = list_stems(img_dir, ".jpg")
        lab_names = list_stems(lab_dir, ".png")
        curated_path = ""
        if cfg.subset == "curated":
            curated_path = require_file(name, os.path.join(root, cfg.curated_dir, sd, CURATED_FILE),
                                        f"the curated {sd} image list of PiCIE/STEGO, or set subset=all")
            ids = read_list(curated_path)
        else:
            ids = sorted(img_names)
        images, labels = split_pairs(name, split, ids, cfg, img_dir, img_names, lab_dir, lab_names)
        super().__init__(name, split, images, labels, fine_to_coarse27_lut(), cfg.resize, cfg.crop,
                         cfg.max_images, img_dir)
        if cfg.subset == "curated":
            self.expected_sizes = dict(CURATED_SIZES)
            with open(curated_path, "rb") as fh:
                md5 = hashlib.md5(fh.read()).hexdigest()
            same = md5 == CURATED_MD5[split]
            self.notes.append(f"{split} list {curated_path}: md5 {md5} "
                              f"{'matches the published list' if same else 'differs from the published ' + CURATED_MD5[split]}")
        if split == "train" and cfg.train_fraction < 1.0:
            self.expected_sizes = {}


def _leopart_images(name: str, root: str, images: str, sd: str) -> str:
    cands = [os.path.join(root, images, sd)] if images else [
        os.path.join(root, "coco", "images", sd), os.path.join(root, "images", sd), os.path.join(root, sd)]
    return first_dir(name, cands, f"COCO {sd} images")


@dataclass
class LeopartCocoConfig:
    """The settings of Leopart's COCO subsets (``coco_stuff15``, ``coco_things``): one layout, one sampling."""

    root: str = ""  # Leopart's data_dir: coco/images/ and annotations/
    images: str = ""  # "" = first of coco/images, images, . (each holding {train,val}2017)
    labels: str = ""  # "" = first of the subset's folder under annotations/ (LeopartCoco.label_parent), annotations, .
    train_fraction: float = 0.1  # Leopart: random 10 % of train2017 (seed 400)
    fraction_seed: int = 400
    resize: int = 0
    crop: int = 0
    max_images: int = 0

    def validate(self, where: str) -> None:
        check_common(where, self.resize, self.crop, self.train_fraction, self.max_images)


class LeopartCoco(FileSegDataset):
    """One split of a Leopart COCO subset: the images of ``_leopart_images`` paired by id with the label PNGs of
    ``label_folder`` (``{sd}`` = train2017 / val2017), found under ``<root>/<labels>`` when set, else the first of
    ``<root>/annotations/<label_parent...>``, ``<root>/annotations`` and ``<root>``. Subclasses are data: the
    name, the label folder and where it sits, what it is (for the error), and the value -> class table."""

    config_class = LeopartCocoConfig
    expected_sizes = {"train": 11_828, "val": 5_000}
    label_folder = ""
    label_parent: tuple = ()
    label_what = ""

    @staticmethod
    def lut() -> np.ndarray:
        raise NotImplementedError

    def __init__(self, cfg: LeopartCocoConfig, split: str):
        name = self.dataset_name
        sd = _split_dir(split)
        root = require_root(name, cfg.root, "Leopart's COCO folder with coco/images/ and annotations/")
        img_dir = _leopart_images(name, root, cfg.images, sd)
        folder = self.label_folder.format(sd=sd)
        cands = [os.path.join(root, cfg.labels, folder)] if cfg.labels else [
            os.path.join(root, "annotations", *self.label_parent, folder), os.path.join(root, "annotations", folder),
            os.path.join(root, folder)]
        lab_dir = first_dir(name, cands, self.label_what)
        img_names = list_stems(img_dir, ".jpg")
        lab_names = list_stems(lab_dir, ".png")
        images, labels = split_pairs(name, split, sorted(img_names), cfg, img_dir, img_names, lab_dir, lab_names)
        super().__init__(name, split, images, labels, self.lut(), cfg.resize, cfg.crop, cfg.max_images, img_dir)
        if split == "train" and cfg.train_fraction != 0.1:
            self.expected_sizes = {}


@dataclass
class CocoStuff15Config(LeopartCocoConfig):
    """``coco_stuff15``: the labels are annotations/annotations/stuff_annotations/stuff_{split}2017_pixelmaps."""


@DATASETS.register("coco_stuff15")
class CocoStuff15(LeopartCoco):
    """Leopart's COCO-Stuff: 15 stuff supercategories (sorted), things and unlabeled = 255."""

    dataset_name = "coco_stuff15"
    config_class = CocoStuff15Config
    num_classes = 15
    class_names = list(resource(HIERARCHY)["stuff15_names"])
    label_folder = "stuff_{sd}_pixelmaps"
    label_parent = ("annotations", "stuff_annotations")
    label_what = "COCO-Stuff pixelmaps from stuff_annotations_trainval2017.zip"
    lut = staticmethod(stuff15_lut)
