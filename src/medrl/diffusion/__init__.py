"""The diffusion stack: loading every SD stack (stack.py: tiny, SD v1.5, RoentGen), training its
VAE and UNet (vae_train.py, latents.py, finetune.py), DDIM with log-probs (ddim.py), rollouts
(rollout.py) and the seed policy of every sampling call site (sampler.py), LoRA and ACE adapters,
and image generation (generate.py).

Submodules are imported on first use (``from medrl.diffusion import Sampler`` works) so that
importing ``medrl.diffusion`` does not pay for torch and diffusers.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_components": "medrl.diffusion.stack",
    "encode_prompts": "medrl.diffusion.stack",
    "ddim_step_with_logprob": "medrl.diffusion.ddim",
    "Trajectory": "medrl.diffusion.rollout",
    "sample_with_logprob": "medrl.diffusion.rollout",
    "decode_latents": "medrl.diffusion.rollout",
    "Noise": "medrl.diffusion.sampler",
    "Sampler": "medrl.diffusion.sampler",
    "add_lora": "medrl.diffusion.lora",
    "save_adapter": "medrl.diffusion.lora",
    "load_adapter": "medrl.diffusion.lora",
    "ACE": "medrl.diffusion.ace",
}

__all__ = [  # noqa: RUF022 - grouped by submodule, as _EXPORTS
    "load_components", "encode_prompts", "ddim_step_with_logprob", "Trajectory", "sample_with_logprob",
    "decode_latents", "Noise", "Sampler", "add_lora", "save_adapter", "load_adapter", "ACE",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medrl.diffusion' has no attribute {name!r}")
