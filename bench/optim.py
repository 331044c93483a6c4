"""Optimisers built from a method's parameter groups, with per-iteration lr / weight-decay schedules."""

from __future__ import annotations

import torch

from bench.config import PretrainConfig
from bench.errors import BenchError


def _momentum_step(state: dict, p: torch.Tensor, d_p: torch.Tensor, momentum: float, lr: float) -> None:
    """SGD with momentum, no Nesterov, no dampening (torch.optim.SGD's rule), shared by LARS and LARC:
    buf ← momentum·buf + d_p (buf = d_p at the first step), p ← p − lr·buf."""
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = state["momentum_buffer"] = d_p.clone()
    else:
        buf.mul_(momentum).add_(d_p)
    p.add_(buf, alpha=-lr)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as used by BYOL/PixPro/CLoVE.

    Groups with ``lars_exclude`` (biases, norms) use plain SGD steps. Trust ratio η‖w‖/(‖g + wd·w‖ + eps),
    with the CLoVE/PixPro defaults η = 1e-3, eps = 1e-8.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if group["weight_decay"] and not group["lars_exclude"]:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    p_norm, g_norm = torch.norm(p), torch.norm(d_p)
                    ratio = group["eta"] * p_norm / (g_norm + group.get("eps", 1e-8))
                    trust = torch.where((p_norm > 0) & (g_norm > 0), ratio, torch.ones_like(p_norm))
                    d_p = d_p.mul(trust)
                _momentum_step(self.state[p], p, d_p, group["momentum"], group["lr"])
        return loss


class LARC(torch.optim.Optimizer):
    """VISSL's LARC (apex ``LARC``) around SGD with momentum, no Nesterov: ViCE's optimiser (spec §1.6).

    Per parameter tensor, when ‖w‖ and ‖g‖ are positive: ratio = η‖w‖ / (‖g‖ + wd·‖w‖ + eps), with ``clip`` the
    ratio becomes min(ratio / lr, 1) (VISSL's ViCE configs: ``clip: False``); then g ← (g + wd·w)·ratio and the SGD
    momentum step. Unlike :class:`LARS`, every tensor (BatchNorm and biases too) gets weight decay and the ratio
    (``regularize_bn`` / ``regularize_bias: True``). η = 1e-3, eps = 1e-8 as the reference.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, eps: float = 1e-8, clip: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                                      clip=clip))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                ratio = group["eta"] * p_norm / (g_norm + p_norm * wd + group["eps"])
                if group["clip"]:
                    ratio = torch.clamp(ratio / group["lr"], max=1.0)
                ratio = torch.where((p_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                d_p = p.grad.add(p, alpha=wd).mul(ratio) if wd else p.grad.mul(ratio)
                _momentum_step(self.state[p], p, d_p, group["momentum"], group["lr"])
        return loss


def build_optimizer(groups: list[dict], cfg: PretrainConfig) -> torch.optim.Optimizer:
    name = cfg.optimizer.lower()
    for g in groups:
        g.setdefault("apply_wd", True)
        if name == "larc":  # VISSL regularises BatchNorm and bias parameters too
            g["apply_wd"] = True
        g["weight_decay"] = cfg.weight_decay if g["apply_wd"] else 0.0
        g["lars_exclude"] = not g["apply_wd"]
    if name == "adamw":
        # multi-tensor (foreach) update: the for-loop kernels' results bit for bit, without one op per parameter
        return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum)
    if name == "larc":
        return LARC(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise BenchError(f"pretrain.optimizer: unknown optimiser '{cfg.optimizer}'; valid: adamw, sgd, lars, larc")


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if g.get("apply_wd", True):
            g["weight_decay"] = wd


def clip_per_tensor(params, max_norm: float) -> torch.Tensor:
    """DINO's clipping: each parameter tensor's gradient is clipped to ``max_norm`` separately.

    Returns the total gradient norm before clipping (a 0-d tensor, for logging)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)
    return torch.linalg.vector_norm(torch.stack(norms))
