"""The one learning-rate schedule of every trainer in the library (diffusion and reward networks)."""
from __future__ import annotations

import math
from typing import Literal

__all__ = ["cosine_lr", "default_warmup", "warmup_lr"]


def default_warmup(steps: int) -> int:
    """Warm-up length of the step-based trainers: 5 % of the steps, at least 1, at most 100."""
    return min(100, max(1, steps // 20))


def warmup_lr(base_lr: float, step: int, total: int, *, warmup: int = 0, floor: float = 0.0,
              decay: Literal["cosine", "constant"] = "cosine") -> float:
    """The one learning-rate schedule of the library's trainers (stateless: resuming needs only
    the step). Linear warm-up over ``warmup`` steps, then either a cosine decay from ``base_lr``
    to ``floor * base_lr`` over the remaining steps, or ``base_lr`` held constant."""
    if decay == "constant":
        return base_lr * min(1.0, (step + 1) / warmup) if warmup else base_lr
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    cos = 1.0 + math.cos(math.pi * min(1.0, t))
    if not floor:
        return base_lr * 0.5 * cos
    return base_lr * (floor + (1 - floor) * 0.5 * cos)


def cosine_lr(base_lr: float, step: int, total: int, warmup: int = 0) -> float:
    """Linear warmup then cosine decay to 0 (``warmup_lr`` with its defaults)."""
    return warmup_lr(base_lr, step, total, warmup=warmup)