"""Per-iteration schedules as plain arrays (the DINO convention)."""

from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    start_warmup: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``start_warmup`` to ``base`` over ``warmup_steps``, then cosine to ``final``.

    Returns an array of length ``total_steps``: ``final + ½(base−final)(1+cos(π t/T_rest))`` after warm-up.
    """
    warmup_steps = int(min(max(warmup_steps, 0), total_steps))
    warm = np.linspace(start_warmup, base, warmup_steps) if warmup_steps > 0 else np.array([])
    rest = total_steps - warmup_steps
    t = np.arange(rest)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(rest, 1)))
    out = np.concatenate([warm, cos])
    assert len(out) == total_steps
    return out


def momentum_schedule(base: float, total_steps: int) -> np.ndarray:
    """EMA momentum from ``base`` to 1 by a cosine, per iteration: m_i = 1 − (1−m_0)(cos(π i/I)+1)/2."""
    return cosine_schedule(base, 1.0, total_steps)


def linear_warmup_constant(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Linear ramp from ``start`` to ``end`` over ``warmup_steps``, then constant (DINO teacher temperature)."""
    warmup_steps = int(min(max(warmup_steps, 0), total_steps))
    ramp = np.linspace(start, end, warmup_steps) if warmup_steps > 0 else np.array([])
    return np.concatenate([ramp, np.full(total_steps - warmup_steps, end)])
