"""The Task interface: evaluate frozen (or finetuned) dense features on a dataset.

``Task(cfg).evaluate(features, data, device, backbone) -> TaskResult``, one signature for every task.
``features`` is a callable B×3×H×W normalised images -> B×C×h×w (``Method.dense_features`` or an untrained
backbone), frozen; ``backbone`` is the evaluation ``DenseBackbone`` itself, passed when the task declares
``needs_backbone`` (fine-tuning tasks such as ``det`` train a copy of it) and ``None`` otherwise; ``data``
carries the train and val splits. Metrics are floats; percentages are in percent, as papers report them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def resize_pair(img: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact square resize of an image (bilinear, antialiased) and its mask (nearest) to ``size``×``size``, the
    aspect not kept (the protocols' validation transform); no-op for ``size=0`` or a pair already that size."""
    if size and tuple(img.shape[-2:]) != (size, size):
        img = TF.resize(img, [size, size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        mask = TF.resize(mask[None], [size, size], interpolation=v2.InterpolationMode.NEAREST)[0]
    return img, mask


def batched_pairs(dataset, indices, batch_size: int, transform: Callable):
    """Yields (uint8 images B×3×H×W, masks B×H×W) of ``dataset[i]`` for ``i`` in ``indices``, each pair passed
    through ``transform(image, mask)`` first; batches of ``batch_size``, and a change of size (native sizes
    that differ) starts a new batch, so no image is padded or resized to fit another."""
    imgs, masks = [], []
    for i in indices:
        item = dataset[i]
        img, mask = transform(item["image"], item["mask"])
        if imgs and img.shape != imgs[0].shape:
            yield torch.stack(imgs), torch.stack(masks)
            imgs, masks = [], []
        imgs.append(img)
        masks.append(mask)
        if len(imgs) == batch_size:
            yield torch.stack(imgs), torch.stack(masks)
            imgs, masks = [], []
    if imgs:
        yield torch.stack(imgs), torch.stack(masks)


@dataclass
class EvalData:
    name: str
    train: Any
    val: Any
    num_classes: int
    class_names: list


@dataclass
class TaskResult:
    metrics: dict  # name -> float (primary first)
    per_class: dict = field(default_factory=dict)  # name -> list of floats (e.g. IoU per class)
    protocol: str = ""  # one line saying how the number was produced, logged with every leaderboard row
    figures: dict = field(default_factory=dict)  # file name -> PNG bytes
    # per evaluation image, for the leaderboard's paired bootstrap (bench.significance): "confusion" N×C×P int
    # counts (the primary is the mIoU of their sum) or "score" N floats (the primary is their mean)
    per_image: dict = field(default_factory=dict)


class Task:
    """Base class; subclasses set ``config_class`` (a dataclass, the ``tasks.<name>`` section) and ``primary``."""

    config_class: type = object
    primary: str = ""  # the leaderboard metric, a key of ``TaskResult.metrics``
    higher_is_better: bool = True  # of ``primary``: the direction a search (``bench tune``) optimises
    needs_backbone: bool = False  # True: ``evaluate`` gets the trainable evaluation backbone as ``backbone``
    # the protocol a number was produced by: a row is comparable with another only if name, version and the hash
    # of the settings agree. Bump ``protocol_version`` when the evaluation code changes what it measures.
    protocol_name: str = ""  # default: the registered task name
    protocol_version: int = 1
    display_metrics: tuple = ()  # the terminal leaderboard's columns (default: the primary); all go to CSV/MLflow

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def protocol_settings(self) -> dict:
        """Every setting that changes the number (the resolved config: presets filled in)."""
        return dataclasses.asdict(self.cfg) if dataclasses.is_dataclass(self.cfg) else {}

    def protocol_hash(self) -> str:
        blob = json.dumps(self.protocol_settings(), sort_keys=True, default=str).encode()
        return hashlib.sha1(blob).hexdigest()[:10]

    def evaluate(self, features: FeatureFn, data: EvalData, device: torch.device,
                 backbone: Optional[nn.Module] = None) -> TaskResult:
        raise NotImplementedError
