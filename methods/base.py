"""The Method interface. A method owns its backbone(s), heads, teacher and loss; the harness owns the loop.

Lifecycle inside ``bench.pretrain.train_loop`` (one per Ray Train worker)::

    method = MethodCls(cfg, backbone_factory, schedule)   # builds student/teacher/heads
    spec = method.view_spec()                             # the data pipeline produces exactly these views
    for step in range(schedule.total_steps):
        out = model(batch, step)          # nn.Module.forward -> training_step (so DDP sees the forward)
        out["loss"].backward()
        method.on_after_backward(step)    # e.g. freeze the last layer / prototypes
        optimiser.step()
        method.after_step(step)           # EMA teacher, centering, prototype normalisation, queues

Evaluation uses ``method.eval_backbone()`` (e.g. the DINO teacher) through ``dense_features``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from bench.backbones import DenseBackbone, create_backbone
from bench.config import BackboneConfig, build
from bench.errors import BenchError


@dataclass
class Schedule:
    """What a method needs to know about the run length to build its own per-iteration schedules."""

    total_steps: int
    steps_per_epoch: int
    epochs: int
    world_size: int = 1


class Method(nn.Module):
    """Base class; subclasses set ``config_class`` and may set ``pretrain_defaults``."""

    config_class: type = object
    # Defaults for the ``pretrain`` section when this method runs (user settings still win).
    pretrain_defaults: dict = {}
    # Under several workers, convert batch norms to synchronised ones (statistics over the global batch), as
    # the reference does for e.g. DINO's BN projection head. The loop reads it after ``__init__``.
    sync_bn: bool = False
    # State that DDP must neither broadcast nor all-reduce (torch's own hook, read by DistributedDataParallel):
    # names of buffers a method synchronises itself, e.g. a queue that every worker fills identically.
    _ddp_params_and_buffers_to_ignore: tuple = ()

    def __init__(self, cfg: Any, backbone_factory: Callable[[], DenseBackbone], schedule: Schedule):
        super().__init__()
        self.cfg = cfg
        self.schedule = schedule

    # ---- data
    def view_spec(self) -> Any:
        raise NotImplementedError

    # ---- training
    def forward(self, batch: dict, step: int) -> dict:
        return self.training_step(batch, step)

    def training_step(self, batch: dict, step: int) -> dict:
        """Returns ``{"loss": scalar tensor, <name>: float, ...}``."""
        raise NotImplementedError

    def on_after_backward(self, step: int) -> None:
        """Called after backward and gradient clipping, before the optimiser step."""

    def after_step(self, step: int) -> None:
        """Called after the optimiser step (EMA updates, centering, normalisation)."""

    def param_groups(self) -> list[dict]:
        """Trainable parameters; norms, biases and other 1-D tensors get no weight decay."""
        return split_decay(self.named_parameters())

    # ---- evaluation
    def eval_backbone(self) -> DenseBackbone:
        raise NotImplementedError

    def eval_backbone_prefix(self) -> str:
        """Where ``eval_backbone()`` sits in this method's ``state_dict`` (e.g. ``"teacher.backbone."``)."""
        target = self.eval_backbone()
        for name, module in self.named_modules():
            if module is target:
                return name + "." if name else ""
        raise BenchError(f"{type(self).__name__}.eval_backbone() is not one of its submodules")

    @classmethod
    def probe_eval_backbone_prefix(cls, method_cfg: dict, backbone: str) -> str:
        """``eval_backbone_prefix()`` of this method built with ``method_cfg`` on ``backbone``, for checkpoints
        that did not record it. Only the module tree is needed: built on the meta device (CPU where a
        constructor needs real values, e.g. CrOC), without touching the caller's RNG."""
        cfg = build(cls.config_class, method_cfg, f"methods ({cls.__name__})")
        name = backbone or BackboneConfig().name

        def probe():
            return cls(cfg, lambda: create_backbone(name), Schedule(1, 1, 1, 1))

        with torch.random.fork_rng(devices=[]):
            try:
                with torch.device("meta"):
                    return probe().eval_backbone_prefix()
            except (RuntimeError, NotImplementedError):
                return probe().eval_backbone_prefix()

    @torch.no_grad()
    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """B×3×H×W normalised images -> B×C×h×w frozen features for downstream tasks."""
        return self.eval_backbone().forward_dense(images)

    # ---- hyperparameter search
    @classmethod
    def search_space(cls) -> dict:
        """Ray Tune domains keyed by config field name."""
        return {}


def split_decay(named_params) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "apply_wd": False})
    return groups
