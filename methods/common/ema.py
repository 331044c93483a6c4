"""Exponential moving average of a student into a frozen teacher: θ_t ← m θ_t + (1−m) θ_s."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1.0 - momentum)
    # buffers (BatchNorm running stats) follow the student directly
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)
