"""Instance-segmentation datasets in their real layouts: COCO (``coco_instances``) and Cityscapes
(``cityscapes_instances``), for the ``det`` task (protocols.md §3.3, §4.2).

``coco_instances`` (``data.coco_instances.root`` = the COCO folder)::

    <root>/annotations/instances_{train,val}2017.json
    <root>/{train,val}2017/<file_name from the JSON>

Categories are renumbered 1..K in the order of their COCO ids (the 80 COCO ids 1..90 have gaps);
``category_ids[k - 1]`` is the original id, so results go back to the annotation file with its own ids
and ``coco_api()`` scores them against the original JSON. Items: ``image`` uint8 3×H×W RGB, ``instances``
(``bbox`` [x, y, w, h], ``category_id`` 1..K, ``mask`` H×W bool decoded from the polygon / RLE, ``area``
as in the JSON, ``iscrowd``), and a semantic ``mask`` (thing index 0..K-1, K = background, 255 = crowd).

``cityscapes_instances`` (``data.cityscapes_instances.root`` = the Cityscapes folder)::

    <root>/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<stem>_gtFine_instanceIds.png

Instances come from ``instanceIds.png`` (values >= 1000 are labelId·1000 + instance) for the 8 evaluated
thing classes (person, rider, car, truck, bus, train, motorcycle, bicycle -> 1..8); a thing labelId below
1000 is a group region and becomes a crowd instance. The semantic ``mask`` is the 19-class trainId map
(255 = ignore). Boxes are the tight boxes of the masks.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from bench.data import IGNORE_INDEX, SegDataset
from bench.errors import BenchError
from bench.registry import DATASETS

COCO_THINGS = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]


def _read_rgb(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


@dataclass
class CocoInstancesConfig:
    root: str = ""  # the COCO folder: annotations/instances_{train,val}<year>.json and {train,val}<year>/
    year: str = "2017"
    max_images: int = 0  # per split, the first N image ids (0 = all)

    def validate(self, where: str) -> None:
        if self.max_images < 0:
            raise BenchError(f"{where}.max_images: expected 0 (all) or a positive count")


@DATASETS.register("coco_instances")
class CocoInstances(SegDataset):
    config_class = CocoInstancesConfig
    thing_classes = COCO_THINGS
    class_names = COCO_THINGS + ["background"]
    num_classes = len(COCO_THINGS) + 1
    has_instances = True

    def __init__(self, cfg: CocoInstancesConfig, split: str):
        if split not in ("train", "val"):
            raise BenchError(f"coco_instances: unknown split '{split}'; valid: train, val")
        if not cfg.root:
            raise BenchError("data.coco_instances.root: not set; expected the COCO folder holding "
                             f"annotations/instances_{split}{cfg.year}.json and {split}{cfg.year}/")
        self.ann_file = os.path.join(cfg.root, "annotations", f"instances_{split}{cfg.year}.json")
        self.image_root = os.path.join(cfg.root, f"{split}{cfg.year}")
        for path in (self.ann_file, self.image_root):
            if not os.path.exists(path):
                raise BenchError(f"data.coco_instances.root {cfg.root}: {os.path.relpath(path, cfg.root)} not found")
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            try:
                self.coco = COCO(self.ann_file)
            except Exception as exc:  # a truncated or foreign file
                raise BenchError(f"data.coco_instances.root: {self.ann_file} is not a COCO annotation file "
                                 f"({type(exc).__name__})") from None
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self._contiguous = {cid: k + 1 for k, cid in enumerate(self.category_ids)}
        names = [c["name"] for c in cats]
        if names != COCO_THINGS:  # a COCO-format file with its own categories
            self.thing_classes = names
            self.class_names = names + ["background"]
            self.num_classes = len(names) + 1
        self.ids = sorted(self.coco.getImgIds())
        if cfg.max_images:
            self.ids = self.ids[:cfg.max_images]
        self.cfg, self.split = cfg, split

    def __len__(self) -> int:
        return len(self.ids)

    def image_id(self, index: int) -> int:
        return self.ids[index]

    def coco_api(self):
        """The original annotations (original category ids) for ``COCOeval``."""
        return self.coco

    def d2_dataset(self, split: str) -> dict | None:
        """The annotation file itself for detectron2 (None for a ``max_images`` subset: written out instead)."""
        if self.cfg.max_images:
            return None
        return {"name": f"bench_coco_instances_{split}{self.cfg.year}", "json": os.path.abspath(self.ann_file),
                "image_root": os.path.abspath(self.image_root)}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.ids):
            raise IndexError(index)
        img_id = self.ids[index]
        info = self.coco.loadImgs(img_id)[0]
        image = _read_rgb(os.path.join(self.image_root, info["file_name"]))
        h, w = image.shape[-2:]
        K = len(self.category_ids)
        semantic = np.full((h, w), K, dtype=np.int64)
        instances = []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id)):
            mask = self.coco.annToMask(ann).astype(bool)
            cat = self._contiguous[ann["category_id"]]
            crowd = int(ann.get("iscrowd", 0))
            semantic[mask] = IGNORE_INDEX if crowd else cat - 1
            instances.append({"bbox": [float(v) for v in ann["bbox"]], "category_id": cat, "mask": mask,
                              "area": float(ann["area"]), "iscrowd": crowd})
        return {"index": index, "image_id": img_id, "image": image, "mask": torch.from_numpy(semantic),
                "instances": instances}


# ------------------------------------------------------------------------------------ Cityscapes

def _cityscapes_tables():
    from cityscapesscripts.helpers.labels import labels

    thing_ids = [lb.id for lb in labels if lb.hasInstances and not lb.ignoreInEval]  # 24..28, 31..33
    thing_names = [lb.name for lb in labels if lb.id in thing_ids]
    train_names = [lb.name for lb in sorted((lb for lb in labels if not lb.ignoreInEval), key=lambda x: x.trainId)]
    lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
    for lb in labels:
        if 0 <= lb.id < 256 and 0 <= lb.trainId < 255:
            lut[lb.id] = lb.trainId
    return thing_ids, thing_names, train_names, lut


_CS_THING_IDS, _CS_THINGS, _CS_TRAIN_NAMES, _CS_LUT = _cityscapes_tables()


@dataclass
class CityscapesInstancesConfig:
    root: str = ""  # the Cityscapes folder: leftImg8bit/{train,val}/ and gtFine/{train,val}/
    max_images: int = 0  # per split, the first N files in sorted order (0 = all)

    def validate(self, where: str) -> None:
        if self.max_images < 0:
            raise BenchError(f"{where}.max_images: expected 0 (all) or a positive count")


@DATASETS.register("cityscapes_instances")
class CityscapesInstances(SegDataset):
    config_class = CityscapesInstancesConfig
    thing_classes = _CS_THINGS
    class_names = _CS_TRAIN_NAMES
    num_classes = len(_CS_TRAIN_NAMES)
    has_instances = True

    def __init__(self, cfg: CityscapesInstancesConfig, split: str):
        if split not in ("train", "val"):
            raise BenchError(f"cityscapes_instances: unknown split '{split}'; valid: train, val")
        if not cfg.root:
            raise BenchError("data.cityscapes_instances.root: not set; expected the Cityscapes folder holding "
                             "leftImg8bit/ and gtFine/")
        img_dir = os.path.join(cfg.root, "leftImg8bit", split)
        if not os.path.isdir(img_dir):
            raise BenchError(f"data.cityscapes_instances.root {cfg.root}: leftImg8bit/{split} not found")
        self.files = []
        for img in sorted(glob.glob(os.path.join(img_dir, "*", "*_leftImg8bit.png"))):
            stem = os.path.basename(img)[: -len("_leftImg8bit.png")]
            city = os.path.basename(os.path.dirname(img))
            gt = os.path.join(cfg.root, "gtFine", split, city, f"{stem}_gtFine_instanceIds.png")
            if not os.path.exists(gt):
                raise BenchError(f"data.cityscapes_instances.root {cfg.root}: {os.path.relpath(gt, cfg.root)} "
                                 f"not found")
            self.files.append((img, gt))
        if not self.files:
            raise BenchError(f"data.cityscapes_instances.root {cfg.root}: no *_leftImg8bit.png under "
                             f"leftImg8bit/{split}/<city>/")
        if cfg.max_images:
            self.files = self.files[:cfg.max_images]
        self.cfg, self.split = cfg, split

    def __len__(self) -> int:
        return len(self.files)

    def d2_dataset(self, split: str) -> dict | None:
        """detectron2's built-in Cityscapes sets when the root is ``<DETECTRON2_DATASETS>/cityscapes``."""
        root = os.path.abspath(self.cfg.root)
        if os.path.basename(root.rstrip("/")) != "cityscapes" or self.cfg.max_images:
            return None
        return {"builtin": True, "name": f"cityscapes_fine_instance_seg_{split}",
                "env": {"DETECTRON2_DATASETS": os.path.dirname(root)}}

    def __getitem__(self, index: int) -> dict:
        img_path, gt_path = self.files[index]
        image = _read_rgb(img_path)
        with Image.open(gt_path) as im:
            inst = np.asarray(im, dtype=np.int64)
        label_ids = np.where(inst >= 1000, inst // 1000, inst)
        semantic = _CS_LUT[np.clip(label_ids, 0, 255)]
        instances = []
        for value in np.unique(inst):
            label = value // 1000 if value >= 1000 else value
            if label not in _CS_THING_IDS:
                continue
            mask = inst == value
            instances.append({"bbox": _tight_box(mask), "category_id": _CS_THING_IDS.index(label) + 1,
                              "mask": mask, "area": float(mask.sum()), "iscrowd": int(value < 1000)})
        return {"index": index, "image": image, "mask": torch.from_numpy(semantic), "instances": instances}
