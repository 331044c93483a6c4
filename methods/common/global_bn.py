"""BatchNorm whose batch statistics cover the global batch of every worker (SyncBN that also runs on CPU).

``torch.nn.SyncBatchNorm`` only runs on GPU; the Ray Train CPU workers need the same semantics so that two
workers on half batches train exactly like one process on the whole batch. :class:`GlobalBatchNorm2d` is a
drop-in ``nn.BatchNorm2d`` (same parameters, buffers and state-dict keys): in a single process, or in eval
mode, it *is* ``nn.BatchNorm2d``; in training mode under ``torch.distributed`` it all-reduces the per-channel
sums with a differentiable all-reduce, so gradients also flow through the other workers' statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.common.dist import all_reduce_sum_grad, is_dist


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with statistics over all workers' samples. Input/output B×C×H×W."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist()):
            return super().forward(x)
        c = x.shape[1]
        count = all_reduce_sum_grad(torch.full((1,), x.numel() / c, device=x.device, dtype=torch.float32))
        xf = x.float()
        mean = all_reduce_sum_grad(xf.sum(dim=(0, 2, 3))) / count  # C
        # two passes (mean, then centred squares) for the same precision as a single-process BN
        centred = xf - mean.view(1, c, 1, 1)
        var = all_reduce_sum_grad(centred.pow(2).sum(dim=(0, 2, 3))) / count  # biased, C
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_global_bn(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (in place, recursively) by :class:`GlobalBatchNorm2d`,
    keeping its parameters and running statistics. Returns ``module`` (or the replacement if it is a BN)."""
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(next(iter(module.state_dict().values()), torch.zeros(())).device)
    for name, child in module.named_children():
        setattr(module, name, convert_global_bn(child))
    return module


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (input B×C or B×C×L) with statistics over all workers' samples."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist()):
            return super().forward(x)
        x4 = x[:, :, None, None] if x.dim() == 2 else x.unsqueeze(-1)
        return GlobalBatchNorm2d.forward(self, x4).reshape(x.shape)  # the same reduction, over B (and L)


def convert_all_global_bn(module: nn.Module) -> nn.Module:
    """Like :func:`convert_global_bn`, for ``nn.BatchNorm1d`` and ``nn.BatchNorm2d`` alike (in place)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new.to(child.weight.device if child.affine else "cpu"))
        elif type(child) is nn.BatchNorm2d:
            setattr(module, name, convert_global_bn(child))
        else:
            convert_all_global_bn(child)
    return module
