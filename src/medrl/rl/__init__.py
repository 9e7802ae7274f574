"""DDPO core shared by both tracks: DDIM step log-probs, trajectory sampling, PPO, LoRA, ACE,
and the trainer.

Submodules are imported on first use (``from medrl.rl import train_ddpo`` works) so that
importing ``medrl.rl`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ddim_step_with_logprob": "medrl.rl.ddim",
    "Trajectory": "medrl.rl.sampling",
    "sample_with_logprob": "medrl.rl.sampling",
    "decode_latents": "medrl.rl.sampling",
    "Noise": "medrl.rl.sampler",
    "Sampler": "medrl.rl.sampler",
    "PerPromptStatTracker": "medrl.rl.ppo",
    "ppo_loss": "medrl.rl.ppo",
    "add_lora": "medrl.rl.lora",
    "save_adapter": "medrl.rl.lora",
    "load_adapter": "medrl.rl.lora",
    "ACE": "medrl.rl.ace",
    "DDPOConfig": "medrl.rl.trainer",
    "train_ddpo": "medrl.rl.trainer",
}

__all__ = [  # noqa: RUF022 - grouped by submodule, as _EXPORTS
    "ddim_step_with_logprob", "Trajectory", "sample_with_logprob", "decode_latents", "Noise", "Sampler",
    "PerPromptStatTracker", "ppo_loss", "add_lora", "save_adapter", "load_adapter", "ACE",
    "DDPOConfig", "train_ddpo",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medrl.rl' has no attribute {name!r}")
