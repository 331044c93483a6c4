"""Leopart's network (``src/leopart.py``): a ViT, a per-token MLP head and unit-norm prototypes; and the teacher's
foreground mask from its last-layer [CLS] attention (``experiments/utils.py``)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from methods.common.prototypes import Prototypes
from methods.common.vit_tokens import tokens_and_cls_attention


class TokenHead(nn.Module):
    """Per-token MLP (no BN, GELU) → L2 normalise; ``*×in`` -> ``*×out``."""

    def __init__(self, in_dim: int, hidden: int, out: int, n_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (n_layers - 1) + [out]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)


class LeopartNet(nn.Module):
    """ViT + token head + prototypes. ``forward(x)`` -> (emb B×N×D unit-norm, scores B×N×K, grid (h, w))."""

    def __init__(self, backbone, hidden_dim: int, out_dim: int, n_layers: int, n_prototypes: int):
        super().__init__()
        self.backbone = backbone
        self.head = TokenHead(backbone.embed_dim, hidden_dim, out_dim, n_layers)
        self.prototypes = Prototypes(out_dim, n_prototypes)

    def forward(self, x: torch.Tensor):
        _, tokens, grid = self.backbone.forward_tokens(x)
        emb = self.head(tokens)
        return emb, self.prototypes(emb), grid

    def forward_with_attention(self, x: torch.Tensor):
        """As ``forward``, plus the last block's [CLS] attention over the patch tokens (B×heads×N)."""
        tokens, attn = tokens_and_cls_attention(self.backbone, x)
        prefix = getattr(self.backbone.model, "num_prefix_tokens", 1)
        emb = self.head(tokens[:, prefix:])
        grid = (x.shape[-2] // self.backbone.stride, x.shape[-1] // self.backbone.stride)
        return emb, self.prototypes(emb), grid, attn


def foreground_mask(attn: torch.Tensor, grid: tuple[int, int], threshold: float = 0.6, sigma: float = 0.6,
                    kernel: int = 7, max_small: int = 2) -> torch.Tensor:
    """[CLS] attention B×heads×N -> B×1×h×w float {0, 1} foreground mask (``experiments/utils.py``).

    Mean over heads, Gaussian blur, keep the tokens that hold the top ``threshold`` of the mass (those whose
    ascending cumulative share exceeds 1 − threshold), drop 8-connected components of ≤ ``max_small`` pixels."""
    b = attn.shape[0]
    h, w = grid
    a = attn.float().mean(dim=1).reshape(b, 1, h, w)
    k = min(kernel, 2 * (min(h, w) - 1) + 1)  # reflect padding needs pad < side
    if k >= 3:
        a = TF.gaussian_blur(a, [k, k], [sigma, sigma])
    flat = a.reshape(b, -1)
    val, idx = torch.sort(flat, dim=-1)
    cum = torch.cumsum(val / val.sum(dim=-1, keepdim=True), dim=-1)
    keep_sorted = cum > (1 - threshold)
    keep = torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted)
    masks = keep.reshape(b, h, w).cpu().numpy()
    struct = np.ones((3, 3), dtype=bool)
    for i in range(b):
        lab, n = ndimage.label(masks[i], structure=struct)
        if n:
            sizes = np.bincount(lab.ravel())
            small = np.nonzero(sizes <= max_small)[0]
            small = small[small > 0]
            if small.size:
                masks[i][np.isin(lab, small)] = False
    return torch.from_numpy(masks).to(attn.device).float().unsqueeze(1)
