"""Self-attention predictor blocks over dense feature maps."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class NormalizedMHSA(nn.Module):
    """CLoVE's predictor "NMHSA": multi-head self-attention over the cells of a map, then L2 normalisation.

    ``x`` B×C×h×w -> B×C×h×w, unit norm along C. Tokens are the h·w cells; per head (d = C / heads)
    ``O = concat_h softmax(Q_h K_hᵀ · s) V_h · W_O + b_O`` with learned ``W_Q, W_K, W_V`` (+ biases), exactly
    ``nn.MultiheadAttention(C, heads, batch_first=True)`` (same packed ``in_proj`` layout and init). As in the
    reference code there is no residual, LayerNorm, positional encoding or dropout.

    ``temperature`` 0 (the code): ``s = 1/√d``. ``temperature`` τ > 0 (an option, not in the code: the
    paper's "normalised" attention may be cosine attention; the code parses ``attn_temp`` 0.2 and never uses
    it): Q and K are L2-normalised per head and ``s = 1/τ``.
    """

    def __init__(self, dim: int, heads: int = 8, temperature: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.temperature = dim, heads, float(temperature)
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        # nn.MultiheadAttention's init: Xavier-uniform packed input projection, zero biases
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """B×N×C tokens -> B×N×C attention output (before normalisation)."""
        b, n, c = tokens.shape
        q, k, v = self.in_proj(tokens).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scale = None
        if self.temperature > 0:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            scale = 1.0 / self.temperature
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # B×heads×N×d
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = self.attend(x.flatten(2).transpose(1, 2))  # B×hw×C
        return F.normalize(out.transpose(1, 2).reshape(b, c, h, w), dim=1)
