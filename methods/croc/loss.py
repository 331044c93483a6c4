"""CrOC's loss (spec §3.4): DINO's loss on [CLS] plus α_s × the same loss on matched centroid pairs.

Both terms are ``methods.common.dino_loss.DINOLoss`` with their own centre and temperatures; the object term is a
mean over every worker's valid centroid pairs, so workers holding different numbers of pairs still give the
one-process loss and gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.common.dino_loss import DINOLoss
from methods.common.dist import world_size


@torch.no_grad()
def target_entropy(loss_fn: DINOLoss, teacher_logits: torch.Tensor, epoch: int) -> float:
    """Mean entropy of the centred, sharpened teacher targets (a collapse diagnostic: log(out_dim) is uniform)."""
    q = torch.softmax((teacher_logits.float() - loss_fn.center) / loss_fn.teacher_temp(epoch), dim=-1)
    return float(-(q * torch.log(q.clamp_min(1e-12))).sum(dim=-1).mean())


class CrOCLoss(nn.Module):
    """L = L_image + α_s · L_object.

    ``image``: student / teacher [CLS] logits 2B×out_dim (view 1 first); the pairs are cross-view only.
    ``objects``: student / teacher centroid logits 2n×out_dim_c (the n valid centroids of view 1, then view 2) or
    None when no worker holds a valid centroid; ``n_local`` / ``n_global`` count this worker's / all workers'
    valid centroids. Returns (loss, logs).
    """

    def __init__(self, cfg, epochs: int):
        super().__init__()
        self.image = DINOLoss(cfg.out_dim, cfg.teacher_temp, cfg.warmup_teacher_temp, cfg.warmup_teacher_temp_epochs,
                              epochs, cfg.student_temp, cfg.center_momentum)
        self.object = DINOLoss(cfg.out_dim_c, cfg.teacher_temp_c, cfg.warmup_teacher_temp_c,
                               cfg.warmup_teacher_temp_epochs, epochs, cfg.student_temp_c, cfg.center_momentum_c)
        self.alpha = cfg.alpha_s

    def forward(self, s_image: torch.Tensor, t_image: torch.Tensor, objects: tuple | None, n_local: int,
                n_global: int, epoch: int) -> tuple[torch.Tensor, dict]:
        entropy_image = target_entropy(self.image, t_image, epoch)  # before the loss moves the centre
        loss_image = self.image(list(s_image.chunk(2)), list(t_image.chunk(2)), epoch)
        loss_object = s_image.new_zeros(())
        entropy_object = float("nan")
        if objects is not None:
            s_out, t_out = objects
            if n_local > 0:
                entropy_object = target_entropy(self.object, t_out, epoch)
                # the mean over this worker's pairs, rescaled so the workers' average is the mean over all pairs
                share = n_local * world_size() / n_global
                loss_object = self.object(list(s_out.chunk(2)), list(t_out.chunk(2)), epoch) * share
            else:
                if self.training:
                    self.object.update_center(t_out)  # joins the other workers' all-reduce
                loss_object = s_out.sum() * 0.0
        loss = loss_image + self.alpha * loss_object
        return loss, {"loss_image": float(loss_image.detach()), "loss_object": float(loss_object.detach()),
                      "entropy_image": entropy_image, "entropy_object": entropy_object,
                      "teacher_temp": self.image.teacher_temp(epoch)}
