"""Shared machinery of the real-data loaders (COCO-Stuff, Cityscapes, VOC, COCO-Things).

A loader resolves its on-disk layout at construction (so a wrong root fails before any work starts, with one
line naming the folder or file that was expected), producing parallel lists of image and label files. Items
are decoded lazily: the label PNG is read as integers (palette indices for "P" PNGs, never colours), mapped
through a 256-entry look-up table to class ids (255 = ignore), then the optional protocol transform runs:
resize the shorter side to ``resize`` (bilinear + antialias for the image, nearest-centre for the label, as
PIL does in the reference loaders) and centre-crop ``crop``×``crop`` with PiCIE's offsets
``round((W - crop) / 2)``, ``round((H - crop) / 2)``.

Item: ``image`` uint8 3×H×W, ``mask`` int64 H×W (255 = ignore), ``index``.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bench.data import IGNORE_INDEX, SegDataset
from bench.errors import BenchError

RESOURCES = os.path.join(os.path.dirname(__file__), "resources")


@lru_cache(maxsize=None)
def resource(name: str) -> dict:
    with open(os.path.join(RESOURCES, name)) as fh:
        return json.load(fh)


def check_common(where: str, resize: int, crop: int, fraction: float = 1.0, max_images: int = 0) -> None:
    """``validate`` body shared by the loaders' config dataclasses."""
    if resize < 0 or crop < 0:
        raise BenchError(f"{where}: resize and crop must be >= 0 (0 = off), got resize={resize} crop={crop}")
    if resize and crop > resize:
        raise BenchError(f"{where}.crop: {crop} is larger than the resized shorter side {resize}")
    if not 0.0 < fraction <= 1.0:
        raise BenchError(f"{where}.train_fraction: expected a value in (0, 1], got {fraction}")
    if max_images < 0:
        raise BenchError(f"{where}.max_images: expected >= 0 (0 = all), got {max_images}")


def require_root(name: str, root: str, what: str) -> str:
    if not root:
        raise BenchError(f"data.{name}.root: not set; expected {what} (--set data.{name}.root=/path)")
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise BenchError(f"data.{name}.root {root}: folder not found; expected {what}")
    return root


def require_dir(name: str, path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise BenchError(f"data.{name}: expected folder {path} ({what})")
    return path


def require_file(name: str, path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise BenchError(f"data.{name}: expected file {path} ({what})")
    return path


def first_dir(name: str, candidates: list[str], what: str) -> str:
    """The first existing folder among ``candidates``; the error lists them all."""
    for path in candidates:
        if os.path.isdir(path):
            return path
    raise BenchError(f"data.{name}: expected folder {' or '.join(candidates)} ({what})")


def list_stems(folder: str, suffix: str) -> dict[str, str]:
    """{stem: file name} for the files in ``folder`` ending with ``suffix``."""
    with os.scandir(folder) as it:
        return {e.name[: -len(suffix)]: e.name for e in it if e.name.endswith(suffix) and e.is_file()}


def read_list(path: str) -> list[str]:
    with open(path) as fh:
        return [ln.strip() for ln in fh if ln.strip()]


def pair_files(name: str, ids: list[str], image_of: Callable[[str], str], label_of: Callable[[str], str],
               image_names: Optional[set] = None, label_names: Optional[set] = None) -> tuple[list, list]:
    """Image and label paths for ``ids``; a missing file is an error naming the first one and the count.

    ``image_names`` / ``label_names`` (base names present on disk) avoid one ``stat`` per file on large sets.
    """
    images, labels, missing = [], [], []
    for i in ids:
        img, lab = image_of(i), label_of(i)
        img_ok = os.path.basename(img) in image_names if image_names is not None else os.path.isfile(img)
        lab_ok = os.path.basename(lab) in label_names if label_names is not None else os.path.isfile(lab)
        if not img_ok:
            missing.append(img)
        if not lab_ok:
            missing.append(lab)
        images.append(img)
        labels.append(lab)
    if missing:
        raise BenchError(f"data.{name}: expected file {missing[0]} ({len(missing)} image/label files missing)")
    return images, labels


def take_fraction(items: list, fraction: float, seed: int) -> list:
    """A seeded random ``int(fraction·N)`` subset (Leopart's 10 % of train2017), kept in listing order.

    Leopart shuffles ``os.listdir`` after ``seed_everything(400)``, which depends on the filesystem's order;
    here the listing is sorted first, so the subset is reproducible across machines (not Leopart's exact one).
    """
    if fraction >= 1.0:
        return items
    keep = max(1, int(fraction * len(items)))
    order = np.random.default_rng(seed).permutation(len(items))[:keep]
    return [items[i] for i in sorted(order)]


def read_label_png(path: str, palette_lut: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
    """H×W uint8 label values. "P" PNGs give palette indices; RGB only through ``palette_lut`` (VOC)."""
    with Image.open(path) as im:
        mode = im.mode
        if mode in ("P", "L"):
            arr = np.array(im, dtype=np.uint8)
        elif mode in ("I", "I;16", "I;16B", "I;16L"):
            arr = np.array(im)
            if arr.size and (arr.max() > 255 or arr.min() < 0):
                raise BenchError(f"{path}: label values up to {int(arr.max())}; expected 8-bit class ids")
            arr = arr.astype(np.uint8)
        elif mode in ("RGB", "RGBA") and palette_lut is not None:
            arr = palette_lut(np.array(im.convert("RGB"), dtype=np.uint8))
        else:
            raise BenchError(f"{path}: label PNG in mode {mode}; expected a single-channel (L or P) PNG of class ids")
    return arr


def read_image(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def resize_crop(img: Optional[torch.Tensor], mask: torch.Tensor, resize: int, crop: int):
    """img uint8 3×H×W (or None), mask int64 H×W -> shorter side ``resize`` (0: keep), centre crop ``crop``."""
    h, w = mask.shape[-2:]
    if resize and min(h, w) != resize:
        # torchvision's shorter-side rule (long side truncated), as TF.resize(img, 320) in PiCIE
        nh, nw = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
        if img is not None:
            img = TF.resize(img, [nh, nw], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        mask = TF.resize(mask[None], [nh, nw], interpolation=v2.InterpolationMode.NEAREST_EXACT)[0]
        h, w = nh, nw
    if crop:
        if h < crop or w < crop:
            raise BenchError(f"image of {h}x{w} pixels is smaller than the crop {crop}; set resize >= crop")
        top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
        mask = mask[top:top + crop, left:left + crop]
        if img is not None:
            img = img[:, top:top + crop, left:left + crop]
    return (img.contiguous() if img is not None else None), mask.contiguous()


class FileSegDataset(SegDataset):
    """Items from parallel image / label file lists; the label values go through ``self.lut`` (256 entries)."""

    expected_sizes: dict = {}  # split -> image count of the full standard split (``bench data check`` compares)

    def __init__(self, name: str, split: str, images: list[str], labels: list[str], lut: np.ndarray,
                 resize: int = 0, crop: int = 0, max_images: int = 0, where: str = ""):
        if not images:
            raise BenchError(f"data.{name}: no {split} images found{' in ' + where if where else ''}")
        if max_images:
            images, labels = images[:max_images], labels[:max_images]
        self.name, self.split = name, split
        self.images, self.labels = images, labels
        self.lut = np.asarray(lut, dtype=np.uint8)
        assert self.lut.shape == (256,)
        self.resize, self.crop = resize, crop
        self.notes: list[str] = []  # extra lines for ``bench data check``

    def __len__(self) -> int:
        return len(self.images)

    def palette_lut(self, rgb: np.ndarray) -> np.ndarray:  # overridden where colour PNGs are allowed (VOC)
        raise NotImplementedError

    def raw_label(self, index: int) -> np.ndarray:
        fn = self.palette_lut if type(self).palette_lut is not FileSegDataset.palette_lut else None
        return read_label_png(self.labels[index], fn)

    def load_mask(self, index: int) -> torch.Tensor:
        """The item's mask without decoding the image (used by ``bench data check``)."""
        mask = torch.from_numpy(self.lut[self.raw_label(index)].astype(np.int64))
        return resize_crop(None, mask, self.resize, self.crop)[1]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.images):
            raise IndexError(index)
        img = read_image(self.images[index])
        lab = self.raw_label(index)
        if img.shape[:2] != lab.shape:
            raise BenchError(f"{self.labels[index]}: label is {lab.shape[0]}x{lab.shape[1]} but the image "
                             f"{self.images[index]} is {img.shape[0]}x{img.shape[1]}")
        image = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        mask = torch.from_numpy(self.lut[lab].astype(np.int64))
        image, mask = resize_crop(image, mask, self.resize, self.crop)
        return {"index": index, "image": image, "mask": mask}


def identity_lut(num_classes: int) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[:num_classes] = np.arange(num_classes)
    return lut
