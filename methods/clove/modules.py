"""CLoVE's networks: the 1×1-conv projector on the dense map (PixPro's ``MLP2d``) and the encoder it closes."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DenseEncoder(nn.Module):
    """Backbone dense map then the 1×1-conv projector: B×3×H×W -> B×proj_dim×h×w."""

    def __init__(self, backbone, projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone.forward_dense(x))


class MLP2d(nn.Module):
    """PixPro / CLoVE dense projector on a feature map: Conv1×1(in→hidden, no bias) → BN → ReLU →
    Conv1×1(hidden→out, no bias) → BN(out, affine=False). B×in×h×w -> B×out×h×w (PyTorch default init)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__()
        self.linear1 = nn.Conv2d(in_dim, hidden_dim, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden_dim)
        self.linear2 = nn.Conv2d(hidden_dim, out_dim, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.linear2(F.relu(self.bn1(self.linear1(x)))))
