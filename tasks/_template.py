"""Template of a task: copy to ``tasks/<name>.py``, rename, and register it.

Not registered here on purpose (files starting with ``_`` are skipped by the plugin loader); to make a real
task, replace the marked line below by ``@TASKS.register("<name>")`` above the class. ``bench.evaluate``
then builds it from ``tasks.<name>`` in the config and calls the one ``Task.evaluate`` signature with the
frozen features of every method; ``tests/tasks/test_template.py`` shows it running.

What it does (a minimal, working dense protocol): nearest class prototype. Features B×C×h×w of the train
images are L2-normalised per cell; each class's prototype is the normalised mean of the cells whose
nearest-downsampled label is that class (ignore = 255 left out). Every val cell takes the class of the most
similar prototype (cosine), the h×w prediction is upsampled to the mask (nearest) and scored with the shared
confusion matrix: mIoU and pixel accuracy in percent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from bench.data import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from bench.errors import BenchError
from tasks.base import EvalData, FeatureFn, Task, TaskResult
from tasks.metrics import confusion_matrix, summarize


@dataclass
class PrototypeConfig:
    """The ``tasks.<name>`` section."""

    max_train_images: int = 0  # 0: all
    max_val_images: int = 0  # 0: all
    batch_size: int = 16

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise BenchError(f"{where}.batch_size: expected at least 1, got {self.batch_size}")


def _batches(features: FeatureFn, dataset, n: int, batch_size: int, device: torch.device):
    """(features B×C×h×w on the CPU, masks B×H×W) for the first ``n`` items, images normalised as for training."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    for s in range(0, n, batch_size):
        items = [dataset[i] for i in range(s, min(s + batch_size, n))]
        images = torch.stack([it["image"] for it in items]).to(device).float() / 255.0
        with torch.no_grad():
            yield features((images - mean) / std).float().cpu(), torch.stack([it["mask"] for it in items]).long()


# @TASKS.register("<name>")   <- the one line that makes a copy of this file a task
class PrototypeSegmentation(Task):
    config_class = PrototypeConfig
    primary = "miou"
    higher_is_better = True

    def evaluate(self, features: FeatureFn, data: EvalData, device: torch.device, backbone=None) -> TaskResult:
        cfg: PrototypeConfig = self.cfg
        k = data.num_classes
        n_train = min(cfg.max_train_images or len(data.train), len(data.train))
        n_val = min(cfg.max_val_images or len(data.val), len(data.val))
        sums, counts = None, torch.zeros(k)
        for feats, masks in _batches(features, data.train, n_train, cfg.batch_size, device):
            b, c, h, w = feats.shape
            cells = F.normalize(feats, dim=1).permute(0, 2, 3, 1).reshape(-1, c)  # (B·h·w)×C
            labels = F.interpolate(masks[:, None].float(), size=(h, w), mode="nearest").long().reshape(-1)
            keep = labels != IGNORE_INDEX
            sums = torch.zeros(k, c) if sums is None else sums
            sums.index_add_(0, labels[keep], cells[keep])
            counts += torch.bincount(labels[keep], minlength=k)[:k].float()
        if sums is None or not (counts > 0).any():
            raise BenchError(f"template task: no labelled train cells in '{data.name}'")
        protos = F.normalize(sums, dim=1)  # K×C; classes without cells never win (their row is 0)
        protos[counts == 0] = 0.0
        conf = torch.zeros(k, k, dtype=torch.long)
        for feats, masks in _batches(features, data.val, n_val, cfg.batch_size, device):
            sims = torch.einsum("bchw,kc->bkhw", F.normalize(feats, dim=1), protos)
            sims[:, counts == 0] = -2.0
            pred = F.interpolate(sims.argmax(1, keepdim=True).float(), size=masks.shape[-2:], mode="nearest")
            conf += confusion_matrix(pred[:, 0].long(), masks, k)
        res = summarize(conf)
        metrics = {"miou": res["miou"], "pixel_acc": res["pixel_acc"]}
        protocol = (f"prototype[{n_train} train / {n_val} val images]: nearest normalised class mean of "
                    f"L2-normalised cells, nearest upsampling, mIoU over classes present")
        return TaskResult(metrics=metrics, per_class={"iou": res["per_class_iou"]}, protocol=protocol)
