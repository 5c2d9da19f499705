"""The learning rate of each optimizer update: a linear warm-up, then constant, linear or cosine decay.

Update i (0-based; counted over the run, resumes included) during the warm-up takes ``lr x (i + 1) / warmup``,
so the first update already moves the weights (Megatron's scheduler gives its first update the initial lr, 0)
and update ``warmup - 1`` takes the full lr. After it, with p = (i - warmup) / (total - warmup) clipped to [0, 1]:
constant: ``lr``; linear: ``min_lr + (lr - min_lr)(1 - p)``; cosine: ``min_lr + (lr - min_lr)(1 + cos(pi p)) / 2``.
Past ``total`` the decayed schedules stay at ``min_lr``.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(update: int, *, lr: float, kind: str = "constant", warmup: int = 0, total: int = 0,
          min_lr: float = 0.0) -> float:
    """The learning rate of update ``update`` (0-based) of ``total`` (the decay's length, warm-up included)."""
    if kind not in SCHEDULES:
        raise ValueError(f"learning-rate schedule must be one of {SCHEDULES}, got {kind!r}")
    if update < 0 or warmup < 0:
        raise ValueError(f"update ({update}) and warmup ({warmup}) must be >= 0")
    if update < warmup:
        return lr * (update + 1) / warmup
    if kind == "constant" or total <= warmup:
        return lr if kind == "constant" else min_lr if update >= total else lr
    progress = min(1.0, (update - warmup) / (total - warmup))
    scale = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (lr - min_lr) * scale


__all__ = ["SCHEDULES", "lr_at"]
