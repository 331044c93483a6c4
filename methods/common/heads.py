"""Projection heads shared by methods."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """MLP (in → hidden → hidden → bottleneck, GELU) → L2 normalise → weight-normalised Linear(bottleneck, out).

    Input ``*×in_dim``; output ``*×out_dim`` logits. With ``norm_last_layer`` the weight norm's gain is fixed
    to 1 and frozen, as in DINO. ``out_dim_c > 0`` adds CrOC's second output layer ``last_layer_c``
    (``forward_c``: ``*×in_dim`` -> ``*×out_dim_c``), which shares the MLP.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True, out_dim_c: int = 0):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)
        self.last_layer_c = None
        if out_dim_c > 0:  # built after last_layer so that DINO's initialisation (RNG order) is unchanged
            self.last_layer_c = nn.utils.parametrizations.weight_norm(
                nn.Linear(bottleneck_dim, out_dim_c, bias=False))
            with torch.no_grad():
                self.last_layer_c.parametrizations.weight.original0.fill_(1.0)
            if norm_last_layer:
                self.last_layer_c.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)

    def forward_c(self, x: torch.Tensor) -> torch.Tensor:
        """The second output layer (CrOC centroids): same MLP and L2 norm, then ``last_layer_c``."""
        if self.last_layer_c is None:
            raise RuntimeError("DINOHead was built without a second output layer (out_dim_c=0)")
        return self.last_layer_c(F.normalize(self.mlp(x), dim=-1, p=2))

    def last_layer_params(self) -> list[nn.Parameter]:
        """Both output layers (CrOC freezes every module named last_layer* during the first epoch)."""
        extra = list(self.last_layer_c.parameters()) if self.last_layer_c is not None else []
        return list(self.last_layer.parameters()) + extra
