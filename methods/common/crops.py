"""Multi-crop batching: crops of equal resolution go through a network in one batch, as the references'
multi-crop wrappers do (fewer, larger forwards; BatchNorm statistics per resolution)."""

from __future__ import annotations

from typing import Callable

import torch


def resolution_groups(crops: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Spans ``[start, end)`` of consecutive crops with the same side (crops: list of B×3×s×s)."""
    spans, i = [], 0
    while i < len(crops):
        j = i
        while j < len(crops) and crops[j].shape[-1] == crops[i].shape[-1]:
            j += 1
        spans.append((i, j))
        i = j
    return spans


def forward_by_resolution(fn: Callable, crops: list[torch.Tensor]) -> list:
    """``fn`` on each span's concatenated crops, split back per crop.

    ``fn(x)`` returns a tensor or a tuple; tensors are chunked along dim 0 (one chunk per crop), other tuple items
    (e.g. a token grid) are repeated. Returns one output (tensor or tuple) per crop, in crop order."""
    outs: list = []
    for i, j in resolution_groups(crops):
        out = fn(torch.cat(crops[i:j]))
        if isinstance(out, torch.Tensor):
            outs.extend(out.chunk(j - i))
            continue
        parts = [o.chunk(j - i) if isinstance(o, torch.Tensor) else [o] * (j - i) for o in out]
        outs.extend(tuple(p[n] for p in parts) for n in range(j - i))
    return outs
