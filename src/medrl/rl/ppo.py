"""Advantage normalisation per prompt and the clipped PPO surrogate used by DDPO."""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch


class PerPromptStatTracker:
    """Normalise rewards per prompt against a rolling buffer of that prompt's recent rewards.

    Prompts differ in how achievable their reward is; normalising per prompt (DDPO) stops easy
    prompts from dominating the gradient. Until a prompt has ``min_count`` rewards in its buffer
    its statistics are too noisy, so the batch's mean/std are used instead.
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size={buffer_size}, min_count={min_count}; expected both >= 1")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Add this batch's rewards to the buffers and return advantages (same shape as rewards)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if rewards.ndim != 1 or len(prompts) != rewards.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts and rewards of shape {rewards.shape}; expected (len(prompts),)")
        prompts_arr = np.asarray(prompts, dtype=object)
        advantages = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std()
        # dict.fromkeys keeps first-seen order, so buffer insertion order is deterministic.
        for prompt in dict.fromkeys(prompts):
            idx = np.flatnonzero(prompts_arr == prompt)
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(float(r) for r in rewards[idx])
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                vals = np.fromiter(buf, dtype=np.float64)
                mean, std = vals.mean(), vals.std()
            advantages[idx] = (rewards[idx] - mean) / (std + 1e-6)
        return advantages

    def stats(self) -> dict[str, tuple[float, float, int]]:
        """prompt -> (mean, std, count) of its buffer (for logging)."""
        out = {}
        for p, buf in self.buffers.items():
            v = np.fromiter(buf, dtype=np.float64)
            out[p] = (float(v.mean()), float(v.std()), len(v))
        return out

    def clear(self) -> None:
        self.buffers.clear()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (floats round-trip exactly through JSON)."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {p: list(buf) for p, buf in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.buffers = {p: deque((float(x) for x in v), maxlen=self.buffer_size) for p, v in state["buffers"].items()}


def ppo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate for one denoising step of a batch; returns (loss, info).

    loss = mean(max(-A * r, -A * clip(r, 1-eps, 1+eps))) with r = exp(logp - old_logp) and A
    clipped to +-adv_clip_max (a few extreme rewards must not dominate a batch). info holds
    detached approx_kl = 0.5 * mean((logp - old)^2) and clipfrac = share of |r - 1| > eps.
    """
    adv = advantages.to(log_prob.dtype).clamp(-adv_clip_max, adv_clip_max)
    diff = log_prob - old_log_prob.to(log_prob.dtype)
    ratio = torch.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * (diff.detach() ** 2).mean(),
            "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
            # sample estimate of KL(old || new) = E_old[log old - log new] (for logging)
            "kl": (-diff.detach()).mean(),
        }
    return loss, info
