"""Datasets: images with dense labels (semantic ids, ignore = 255) and, for detection, COCO instances.

A dataset class is registered in ``DATASETS`` with a ``config_class`` dataclass and is built with
``build_dataset(name, cfg, split)``; splits are ``"train"`` (pretraining and probe training) and ``"val"``.
Every item is a dict: ``image`` uint8 3×H×W tensor, ``mask`` int64 H×W (255 = ignore), ``index`` int, and
optionally ``instances`` (COCO-style dicts with ``bbox`` [x, y, w, h] in pixels, ``category_id``, ``mask`` H×W bool).
"""

from __future__ import annotations

from torch.utils.data import Dataset

from bench.registry import DATASETS

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegDataset(Dataset):
    """Base class: subclasses set ``num_classes``, ``class_names``, ``thing_classes`` and implement items."""

    num_classes: int = 0
    class_names: list = []
    thing_classes: list = []  # names of the instance (detection) categories, COCO ids 1..len
    has_instances: bool = False

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


def build_dataset(name: str, cfg, split: str) -> SegDataset:
    cls = DATASETS.get(name)
    return cls(cfg if cfg is not None else cls.config_class(), split)
