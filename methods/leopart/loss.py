"""Leopart's loss (``src/leopart.py``, spec §4.4): for each global crop c, the teacher's Sinkhorn codes and the
student's logits of every other crop v are ``roi_align``-ed to the intersection of c and v; the cross-entropy at
temperature τ is averaged over the aligned cells (under the teacher's foreground mask when one is used), summed over
v ≠ c, divided by (n_crops − 1) and averaged over the global crops."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from methods.common.dist import mean_over_workers
from methods.common.geometry import box_intersection, boxes_in_crop


def roi_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """B×4 -> B×5 (batch index, x0, y0, x1, y1) for ``roi_align``."""
    idx = torch.arange(boxes.shape[0], device=boxes.device, dtype=boxes.dtype).unsqueeze(1)
    return torch.cat([idx, boxes], dim=1)


def to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """B×N×K -> B×K×h×w."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid[0], grid[1])


class LeopartLoss(nn.Module):
    """Cross-entropy between aligned teacher codes and student predictions, averaged over the global batch.

    ``codes``: per global crop B×K×h×w (sum 1 over K); ``masks``: per global crop B×1×h×w {0, 1} or None;
    ``student``: per crop (emb, scores B×N×K, grid); ``boxes`` B×V×4 source pixels, ``flips`` B×V;
    ``sizes``: per crop (H, W) in pixels; ``patch``: pixels per token. Means are over all workers' aligned cells
    (counts all-reduced), so data-parallel workers give the one-process result. Returns (loss, kept-mask share).
    """

    def __init__(self, temperature: float = 0.1, roi_size: int = 7, patch: int = 16):
        super().__init__()
        self.temperature, self.roi_size, self.patch = temperature, roi_size, patch

    def forward(self, codes: list[torch.Tensor], masks: list, student: list[tuple], boxes: torch.Tensor,
                flips: torch.Tensor, sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, float]:
        n_crops, r = len(student), self.roi_size
        loss = codes[0].new_zeros(())
        fg_frac = 0.0
        for ci, code in enumerate(codes):
            sub = code.new_zeros(())
            for v in range(n_crops):
                if v == ci:
                    continue
                inter = box_intersection(boxes[:, ci], boxes[:, v])
                box_c = boxes_in_crop(inter, boxes[:, ci], sizes[ci], flips[:, ci]) / self.patch
                box_v = boxes_in_crop(inter, boxes[:, v], sizes[v], flips[:, v]) / self.patch
                with torch.no_grad():
                    q = roi_align(code, roi_boxes(box_c), r, aligned=True)
                    mask = None
                    if masks[ci] is not None:
                        m = roi_align(masks[ci], roi_boxes(box_c), r, aligned=True)[:, 0]
                        mask = (m >= 1.0 - 1e-6).float()  # the reference's >= 1.0, robust to rounding
                        fg_frac += float(mask.mean()) / (len(codes) * (n_crops - 1))
                _, s_scores, s_grid = student[v]
                logits = roi_align(to_map(s_scores.float(), s_grid), roi_boxes(box_v), r, aligned=True)
                ce = -(q * F.log_softmax(logits / self.temperature, dim=1)).sum(dim=1)  # B×r×r
                if mask is None:
                    total, count = ce.sum(), float(ce.numel())
                else:
                    total, count = (ce * mask).sum(), float(mask.sum())
                sub = sub + mean_over_workers(total, count)[0]
            loss = loss + sub / (n_crops - 1)
        return loss / len(codes), fg_frac
