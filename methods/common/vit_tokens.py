"""Per-head queries / keys / values of a timm ViT's last block, taken in the same forward pass as its tokens.

CrOC (methods.md §3.1) clusters on the last block's per-head **keys**; Leopart's foreground mask is the last
block's [CLS] attention. A forward hook on ``blocks[-1].attn.qkv`` captures that projection of ``norm1(x)`` while
``forward_features`` runs, so no block is computed twice.
"""

from __future__ import annotations

import torch

from bench.backbones import DenseBackbone
from bench.errors import BenchError

_WHICH = {"q": 0, "k": 1, "v": 2}


def last_block_attention(model) -> torch.nn.Module:
    """The attention module of the last block of a timm VisionTransformer (needs ``qkv`` and ``num_heads``)."""
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
        raise BenchError(f"backbone {type(model).__name__}: expected a timm VisionTransformer whose last block "
                         "has attn.qkv (CrOC needs per-head keys)")
    return attn


def tokens_and_head_features(backbone: DenseBackbone, x: torch.Tensor, which: str = "k"
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """x B×3×H×W -> (tokens B×T×C after the final norm, features B×h×T×d of the last block).

    T = prefix tokens ([CLS] first) + patch tokens; ``which`` picks q, k or v (q and k go through the block's
    ``q_norm`` / ``k_norm``, identities in a plain ViT, as the attention itself would see them).
    """
    if which not in _WHICH:
        raise BenchError(f"methods.croc.which_features: expected one of q, k, v, got {which!r}")
    tokens, qkv, attn = _tokens_and_qkv(backbone, x)
    feats = qkv[_WHICH[which]]  # B×h×T×d
    if which == "q":
        feats = attn.q_norm(feats)
    elif which == "k":
        feats = attn.k_norm(feats)
    return tokens, feats


def tokens_and_cls_attention(backbone: DenseBackbone, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x B×3×H×W -> (tokens B×T×C after the final norm, the last block's [CLS] attention over the patch tokens
    B×h×N): softmax over all T keys of q_[CLS]·k·scale, then the patch columns (prefix tokens dropped)."""
    tokens, qkv, attn = _tokens_and_qkv(backbone, x)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    a = torch.softmax((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1), dim=-1)  # B×h×1×T
    prefix = getattr(backbone.model, "num_prefix_tokens", 1)
    return tokens, a[:, :, 0, prefix:]


def _tokens_and_qkv(backbone: DenseBackbone, x: torch.Tensor):
    """(tokens B×T×C, qkv 3×B×h×T×d of the last block, its attention module)."""
    if not backbone.is_vit:
        raise BenchError(f"backbone {backbone.name}: expected a ViT backbone (attention keys / [CLS] attention)")
    attn = last_block_attention(backbone.model)
    captured: list[torch.Tensor] = []
    handle = attn.qkv.register_forward_hook(lambda _m, _inp, out: captured.append(out))
    try:
        tokens = backbone.model.forward_features(x)
    finally:
        handle.remove()
    qkv = captured[-1]  # B×T×3·h·d
    b, t, _ = qkv.shape
    return tokens, qkv.reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4), attn
