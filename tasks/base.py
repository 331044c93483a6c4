"""The Task interface: evaluate frozen (or finetuned) dense features on a dataset.

``Task(cfg).evaluate(features, data, device, backbone) -> TaskResult``, one signature for every task.
``features`` is a callable B×3×H×W normalised images -> B×C×h×w (``Method.dense_features`` or an untrained
backbone), frozen; ``backbone`` is the evaluation ``DenseBackbone`` itself, passed when the task declares
``needs_backbone`` (fine-tuning tasks such as ``det`` train a copy of it) and ``None`` otherwise; ``data``
carries the train and val splits. Metrics are floats; percentages are in percent, as papers report them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

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
    """Base class; subclasses set ``config_class`` (a dataclass, the ``tasks.<name>`` section) and ``primary``."""

    config_class: type = object
    primary: str = ""  # the leaderboard metric, a key of ``TaskResult.metrics``
    higher_is_better: bool = True  # of ``primary``: the direction a search (``bench tune``) optimises
    needs_backbone: bool = False  # True: ``evaluate`` gets the trainable evaluation backbone as ``backbone``

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def evaluate(self, features: FeatureFn, data: EvalData, device: torch.device,
                 backbone: Optional[nn.Module] = None) -> TaskResult:
        raise NotImplementedError
