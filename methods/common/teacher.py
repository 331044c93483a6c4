"""The teacher of a student/teacher pair: a frozen, deterministic copy updated by an exponential moving average.

DINO, CrOC, Leopart (teacher) and CLoVE (momentum encoder) all keep θ_t ← m θ_t + (1−m) θ_s with m following a
cosine from its base value to 1 over the run, looked up per iteration. A teacher is deterministic, as in every
reference: its stochastic depth and dropout are switched off at construction (the references build the teacher
without drop-path), while its BatchNorm layers keep following the module's train/eval mode (the references run
the teacher in train mode, so BN uses batch statistics).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from methods.base import split_decay
from methods.common.schedules import cosine_schedule


def disable_stochastic_layers(module: nn.Module) -> nn.Module:
    """Dropout ``p``, drop-path / drop-block ``drop_prob`` and patch-dropout ``prob`` set to 0, in place.

    Probabilities are zeroed rather than the modules swapped, so the state dict and the modules that read them
    (timm's fused attention reads ``attn_drop.p``) are unchanged."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for attr in ("drop_prob", "prob"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return module


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` without gradients and without stochastic layers."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return disable_stochastic_layers(teacher)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t ← m θ_t + (1−m) θ_s over matching parameters; buffers (BN running stats) are copied from the student."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


class EMASchedule:
    """Per-iteration EMA momentum: a cosine from ``base`` to ``final`` over ``total_steps``, clamped at the end.

    ``momentum(step)`` is the lookup every method used to write itself; ``update(teacher, student, step)`` applies
    the EMA with that step's momentum."""

    def __init__(self, base: float, total_steps: int, final: float = 1.0):
        self.values: np.ndarray = cosine_schedule(base, final, max(int(total_steps), 1))

    def __len__(self) -> int:
        return len(self.values)

    def momentum(self, step: int) -> float:
        return float(self.values[min(max(step, 0), len(self.values) - 1)])

    def update(self, teacher: nn.Module, student: nn.Module, step: int) -> None:
        ema_update(teacher, student, self.momentum(step))


class SelfDistillationHooks:
    """The ``Method`` hooks of the DINO-style self-distillation methods (DINO, CrOC), written once.

    Expects ``self.student`` / ``self.teacher`` (each with ``.backbone``; the student's ``.head`` has
    ``last_layer_params()``), ``self.ema`` (:class:`EMASchedule`), ``self.schedule`` and
    ``self.cfg.freeze_last_layer`` (epochs). Mix in before ``Method``: ``class DINO(SelfDistillationHooks, Method)``.
    """

    def on_after_backward(self, step: int) -> None:
        """The head's last layer gets no gradient during the first ``freeze_last_layer`` epochs (DINO's trick)."""
        if step // max(self.schedule.steps_per_epoch, 1) < self.cfg.freeze_last_layer:
            for p in self.student.head.last_layer_params():
                p.grad = None

    def after_step(self, step: int) -> None:
        self.ema.update(self.teacher, self.student, step)

    def param_groups(self) -> list[dict]:
        return split_decay(self.student.named_parameters())

    def eval_backbone(self):
        """The teacher's backbone: what the references evaluate."""
        return self.teacher.backbone
