"""DDPO shared by both tracks: PPO, the trainer, the reward curve. The sampling it trains
(DDIM log-probs, rollouts, LoRA, ACE) is in ``medrl.diffusion``.

Submodules are imported on first use (``from medrl.rl import train_ddpo`` works) so that
importing ``medrl.rl`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PerPromptStatTracker": "medrl.rl.ppo",
    "ppo_loss": "medrl.rl.ppo",
    "DDPOConfig": "medrl.rl.trainer",
    "train_ddpo": "medrl.rl.trainer",
}

__all__ = ["PerPromptStatTracker", "ppo_loss", "DDPOConfig", "train_ddpo"]  # noqa: RUF022 - as _EXPORTS


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medrl.rl' has no attribute {name!r}")
