"""Unlabelled pretraining images, as the papers pretrain: ``image_folder`` (any tree of images, e.g. ImageNet's
train folder) and ``coco_images`` (COCO train2017, optionally + unlabeled2017 = "COCO+").

Pretraining reads only ``image``; these datasets have no labels, so their ``mask`` is all ignore (255) and
they have no ``val`` split: evaluate on a labelled dataset with ``--eval-data`` (``--pretrain-data image_folder
--eval-data voc12``). Files are listed once at construction, sorted, so a wrong root fails before any work with
one line. Item: ``image`` uint8 3×H×W (RGB), ``mask`` int64 H×W of 255, ``index``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from bench.ranges import at_least
from bench.data import IGNORE_INDEX, SegDataset
from bench.data._real import first_dir, read_image, require_root
from bench.errors import BenchError
from bench.registry import DATASETS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: str) -> list[str]:
    """Every image file under ``folder`` (nested folders included, links followed), sorted by relative path."""
    found = []
    for d, subs, files in os.walk(folder, followlinks=True):
        subs.sort()
        found.extend(os.path.join(d, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES))
    return found


class UnlabelledImages(SegDataset):
    num_classes = 0
    class_names: list = []

    def __init__(self, files: list[str], max_images: int):
        self.files = files[:max_images] if max_images else files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        img = torch.from_numpy(np.ascontiguousarray(read_image(self.files[index]))).permute(2, 0, 1).contiguous()
        mask = torch.full(img.shape[1:], IGNORE_INDEX, dtype=torch.int64)
        return {"image": img, "mask": mask, "index": index}


def _train_only(name: str, split: str) -> None:
    if split != "train":
        raise BenchError(f"--data {name}: unlabelled images, for pretraining only; evaluate on a labelled dataset "
                         f"(--pretrain-data {name} --eval-data voc12, for example)")


@dataclass
class ImageFolderConfig:
    root: str = ""  # a folder holding images at any depth (e.g. ImageNet's train/ with one folder per class)
    max_images: int = at_least(0, 0)  # 0 = all


@DATASETS.register("image_folder")
class ImageFolder(UnlabelledImages):
    config_class = ImageFolderConfig

    def __init__(self, cfg: ImageFolderConfig, split: str = "train"):
        _train_only("image_folder", split)
        root = require_root("image_folder", cfg.root, "a folder of images (any nesting)")
        files = list_images(root)
        if not files:
            raise BenchError(f"data.image_folder.root {root}: no images found ({', '.join(IMAGE_SUFFIXES)})")
        super().__init__(files, cfg.max_images)


@dataclass
class CocoImagesConfig:
    root: str = ""  # COCO root holding train2017/ (and unlabeled2017/), or images/... or coco/images/...
    unlabeled: bool = False  # add unlabeled2017 (COCO+, about 241k images with train2017)
    max_images: int = at_least(0, 0)  # 0 = all


@DATASETS.register("coco_images")
class CocoImages(UnlabelledImages):
    """COCO train2017 (+ unlabeled2017) images, the pretraining data of ViCE and CrOC's COCO / COCO+ rows."""

    config_class = CocoImagesConfig

    def __init__(self, cfg: CocoImagesConfig, split: str = "train"):
        _train_only("coco_images", split)
        root = require_root("coco_images", cfg.root, "the COCO root with train2017/ (and unlabeled2017/)")
        bases = [root, os.path.join(root, "images"), os.path.join(root, "coco", "images")]
        subsets = ["train2017"] + (["unlabeled2017"] if cfg.unlabeled else [])
        files = []
        for sub in subsets:
            folder = first_dir("coco_images", [os.path.join(b, sub) for b in bases], f"COCO {sub} images")
            found = list_images(folder)
            if not found:
                raise BenchError(f"data.coco_images: {folder} holds no images")
            files.extend(found)
        super().__init__(files, cfg.max_images)
