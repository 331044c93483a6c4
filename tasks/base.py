"""The Task interface: evaluate frozen (or finetuned) dense features on a dataset.

``Task(cfg).evaluate(features, data) -> TaskResult``. ``features`` is a callable
B×3×H×W normalised images -> B×C×h×w (``Method.dense_features`` or an untrained backbone); ``data``
carries the train and val splits. Metrics are floats; percentages are in percent, as papers report them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


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


class Task:
    config_class: type = object
    primary: str = ""  # the leaderboard metric
    higher_is_better: bool = True

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def evaluate(self, features: FeatureFn, data: EvalData, device: torch.device) -> TaskResult:
        raise NotImplementedError
