"""The DINO self-distillation loss with centering and a teacher-temperature schedule (Caron et al. 2021).

One readable class, shared by ``dino`` (image level) and ``croc`` (image and object level).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from methods.common.dist import all_reduce_sum
from methods.common.schedules import linear_warmup_constant


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher outputs and student outputs.

    ``student_out``: list over student crops of B×K logits; ``teacher_out``: list over teacher crops (the
    global ones) of B×K logits. Teacher crop i is not compared with student crop i (same view).
    L = mean over pairs (i, v ≠ i) of mean_batch[ −Σ_k softmax((t_i − c)/τ_t)_k · log_softmax(s_v/τ_s)_k ].
    After each call (training mode), c ← m·c + (1−m)·mean(teacher logits over all workers).
    """

    def __init__(self, out_dim: int, teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, epochs: int = 100, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # indexed per epoch, as in the reference
        self.teacher_temps = linear_warmup_constant(warmup_teacher_temp, teacher_temp,
                                                    warmup_teacher_temp_epochs, max(epochs, 1))

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def forward(self, student_out: list[torch.Tensor], teacher_out: list[torch.Tensor], epoch: int,
                update_center: bool = True) -> torch.Tensor:
        temp = self.teacher_temp(epoch)
        targets = [F.softmax((t.float() - self.center) / temp, dim=-1).detach() for t in teacher_out]
        log_probs = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_out]
        total, n_terms = 0.0, 0
        for i, q in enumerate(targets):
            for v, lp in enumerate(log_probs):
                if v == i:
                    continue
                total = total + torch.sum(-q * lp, dim=-1).mean()
                n_terms += 1
        if update_center and self.training:
            self.update_center(torch.cat(teacher_out))
        return total / max(n_terms, 1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the teacher's batch mean; the mean is over the global batch of every worker.

        The row count travels in the same all-reduce, so workers may hold different numbers of rows (CrOC's
        valid centroids); with equal counts this is the reference's sum / (rows · world size).
        """
        rows = teacher_logits.new_full((1, 1), float(teacher_logits.shape[0]), dtype=torch.float32)
        total = all_reduce_sum(torch.cat([teacher_logits.float().sum(dim=0, keepdim=True), rows], dim=1))
        batch_mean = total[:, :-1] / total[:, -1:]
        self.center.mul_(self.center_momentum).add_(batch_mean * (1 - self.center_momentum))
