"""DDPO must learn a planted feature: a short run on one prompt raises the rate at which its
samples show the feature the prompt asks for, and the same run with the advantage's sign flipped
lowers it. The second test is what makes the first meaningful: a trainer whose update ignored or
inverted the advantage would fail the first assertion."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medrl.rl.ppo import PerPromptStatTracker
from medrl.rl.trainer import DDPOConfig, train_ddpo
from test_trainer import build_stack, use_linear_renderer

torch.set_num_threads(1)

PLANTED = "melanoma with ruler"
HELD_OUT = 64  # held-out samples per model, paired noise


THRESHOLD = 0.51  # the base model's top-half brightness is 0.507 +- 0.006: feature rate ~0.3


def top_half(images: torch.Tensor) -> torch.Tensor:
    return images[:, :, : images.shape[2] // 2].mean(dim=(1, 2, 3))


def has_feature(images: torch.Tensor) -> torch.Tensor:
    """The "artifact": a bright top half (the linear renderer maps latents to pixels)."""
    return top_half(images) > THRESHOLD


def feature_reward(images, prompts, anchor_images=None):
    # a classifier-like probability that the feature is present, as the H=6 reward is
    r = torch.sigmoid((top_half(images) - THRESHOLD) / 0.004)
    return r, {"feature": r}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return build_stack(tmp_path_factory.mktemp("stack_learns"), "sample")


def held_out_rate(stack, adapter) -> float:
    from medrl.diffusion import stack as sd_stack
    from medrl.diffusion.lora import load_adapter
    from medrl.diffusion.rollout import sample_with_logprob

    c = sd_stack.load_components(str(stack))
    if adapter is not None:
        load_adapter(c.unet, adapter)
    with torch.no_grad():
        tr = sample_with_logprob(c.unet, c.vae, c.scheduler, sd_stack.encode_prompts(c, [PLANTED] * HELD_OUT),
                                 sd_stack.encode_prompts(c, [""] * HELD_OUT), num_steps=4, guidance_scale=2.0, eta=1.0,
                                 generator=torch.Generator().manual_seed(123))
    return float(has_feature(tr.images).float().mean())


def rate_change(stack, tmp_path, monkeypatch, sign: float) -> float:
    use_linear_renderer(monkeypatch)
    if sign < 0:  # the advantage's sign flipped, nothing else changed
        update = PerPromptStatTracker.update
        monkeypatch.setattr(PerPromptStatTracker, "update", lambda self, p, r: -update(self, p, r))
    cfg = DDPOConfig.from_flat(
        epochs=6, sample_batch_size=32, sample_batches_per_epoch=1, train_batch_size=16,
        gradient_accumulation_steps=2, num_steps=4, eta=1.0, guidance_scale=2.0, lr=1e-2, clip_range=0.2,
        per_prompt_buffer=32, per_prompt_min_count=8, lora_rank=4, checkpoint_every=100, seed=0,
        lora_target_modules=("to_q", "to_k", "to_v", "to_out.0", "conv_out"),
    )
    out = tmp_path / "out"
    train_ddpo(stack, out, reward_fn=feature_reward, prompt_fn=lambda rng, n: [PLANTED] * n, cfg=cfg,
               ckpt_dir=tmp_path / "ckpt")
    base, policy = held_out_rate(stack, None), held_out_rate(stack, out / "adapter")
    print(f"feature rate: base {base:.3f}, policy {policy:.3f} (advantage sign {sign:+.0f})")
    return policy - base


def test_ddpo_raises_the_rate_of_the_requested_feature(stack, tmp_path, monkeypatch):
    change = rate_change(stack, tmp_path, monkeypatch, +1.0)
    # s.e. of a difference of two rates over 64 samples each is at most ~0.09
    assert change > 0.25, change


def test_with_the_advantage_sign_flipped_the_rate_falls(stack, tmp_path, monkeypatch):
    change = rate_change(stack, tmp_path, monkeypatch, -1.0)
    assert change < -0.1, change
    assert not change > 0.25  # the learning test's criterion fails with the sign flipped
