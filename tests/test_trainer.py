"""DDPO trainer: learning on a toy reward, anchor sampling, ACE, checkpoint/resume, 2 processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medrl.rl.trainer import DDPOConfig, train_ddpo

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 8,
            "text_hidden_size": 32, "text_layers": 1, "text_heads": 2, "max_position_embeddings": 16,
            "vae_block_out_channels": [16, 32], "latent_channels": 4}
PROMPTS = ["melanoma with hair", "nevus", "nevus with ruler", "melanoma with ink"]


def build_stack(root: Path, prediction_type: str = "epsilon") -> Path:
    """Tiny SD stack (16 px images, 8x8 latents) in the real on-disk layout."""
    from diffusers import DDIMScheduler

    from medrl.bench import tiny_stack

    stack = tiny_stack(root / "stack", size=16, tiny=TINY, seed=0, max_length=16)
    if prediction_type != "epsilon":
        sched = DDIMScheduler.from_pretrained(str(stack / "scheduler"))
        DDIMScheduler.from_config({**sched.config, "prediction_type": prediction_type}).save_pretrained(str(stack / "scheduler"))
    return stack


class LinearRenderer(torch.nn.Module):
    """Toy "VAE": image = 2x-upsampled first three latent channels, scaled into [0, 1].

    A random-init AutoencoderKL's GroupNorms erase any global shift of the latents, so "image
    brightness" would be (nearly) independent of what the policy does; with this renderer the
    toy reward is a plain function of the latents the policy produces."""

    class config:
        scaling_factor = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def decode(self, z: torch.Tensor):
        img = torch.nn.functional.interpolate(0.5 * z[:, :3], scale_factor=2)
        return type("Decoded", (), {"sample": img})()


def use_linear_renderer(monkeypatch) -> None:
    from medrl.diffusion import stack as sd_stack

    original = sd_stack.load_components

    def load(*a, **k):
        c = original(*a, **k)
        c.vae = LinearRenderer()
        return c

    monkeypatch.setattr(sd_stack, "load_components", load)


def prompt_fn(rng: np.random.Generator, n: int) -> list[str]:
    return [PROMPTS[i] for i in rng.integers(0, len(PROMPTS), n)]


def brightness(images, prompts, anchor_images=None):
    r = images.mean(dim=(1, 2, 3))
    return r, {"brightness": r}


@pytest.fixture(scope="module")
def stack_sample(tmp_path_factory) -> Path:
    # x0-parameterised stack: a random UNet's epsilon outputs blow the x0 estimate up to
    # |latents| ~ 5, while an x0-predicting one keeps latents O(1), as a trained model would.
    return build_stack(tmp_path_factory.mktemp("stack_sample"), "sample")


@pytest.fixture(scope="module")
def stack_eps(tmp_path_factory) -> Path:
    return build_stack(tmp_path_factory.mktemp("stack_eps"))


def small_cfg(**kw) -> DDPOConfig:
    base = {"epochs": 3, "sample_batch_size": 8, "sample_batches_per_epoch": 1, "train_batch_size": 4,
                "gradient_accumulation_steps": 2, "num_steps": 3, "eta": 1.0, "guidance_scale": 2.0, "lr": 3e-3,
                "clip_range": 0.2, "adv_clip_max": 5.0, "timestep_fraction": 0.67, "num_inner_epochs": 1,
                "per_prompt_buffer": 8, "per_prompt_min_count": 4, "lora_rank": 2, "checkpoint_every": 1, "seed": 3}
    base.update(kw)
    return DDPOConfig.from_flat(**base)


# ----------------------------------------------------------------------------- learning


def test_ddpo_raises_toy_reward(stack_sample, tmp_path, monkeypatch):
    """8 epochs of DDPO on mean brightness: the reward goes up, measured two ways."""
    from medrl.diffusion import stack as sd_stack
    from medrl.diffusion.lora import load_adapter
    from medrl.diffusion.rollout import sample_with_logprob

    use_linear_renderer(monkeypatch)
    cfg = DDPOConfig.from_flat(
        # One optimizer step per epoch over all 32 samples x 4 steps (2 batches accumulated): the
        # DDPO gradient is unbiased but noisy; with this setting seeds 0-5 all gain > 5 s.e.
        epochs=8, sample_batch_size=32, sample_batches_per_epoch=1, train_batch_size=16,
        gradient_accumulation_steps=2, num_steps=4, eta=1.0, guidance_scale=2.0, lr=1e-2, clip_range=0.2,
        per_prompt_buffer=32, per_prompt_min_count=8, lora_rank=4, checkpoint_every=100, seed=0,
        # conv_out too: a random UNet's last GroupNorm removes any uniform shift the attention
        # LoRA makes, so attention-only LoRA can barely move global brightness (a trained UNet can).
        lora_target_modules=("to_q", "to_k", "to_v", "to_out.0", "conv_out"),
    )
    logged = []
    out = tmp_path / "out"
    summary = train_ddpo(stack_sample, out, reward_fn=brightness, prompt_fn=prompt_fn, cfg=cfg,
                         ckpt_dir=tmp_path / "ckpt", log_fn=lambda m, s: logged.append((s, m)))
    assert [s for s, _ in logged] == list(range(8))
    df = pd.read_csv(out / "rewards.csv")
    assert len(df) == 8
    for col in ("reward_mean", "reward_std", "brightness_mean", "approx_kl", "clipfrac", "loss", "kl", "epoch_time_s"):
        assert col in df.columns and np.isfinite(df[col]).all(), col
    r = df["reward_mean"].to_numpy()
    se = df["reward_std"].mean() / np.sqrt(cfg.sample_batch_size)  # s.e. of one epoch's mean
    # Each epoch draws fresh noise: compare 3-epoch means, with a margin of several s.e.
    assert r[-3:].mean() - r[:3].mean() > 3 * se, (r, se)
    assert summary["finished"] == 1.0 and summary["reward_gain"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert list((out / "samples").glob("*.png"))
    from PIL import Image

    with Image.open(out / "reward_curve.png") as curve:  # the figure of rewards.csv
        assert curve.format == "PNG" and curve.size[0] > 500
    assert not (tmp_path / "ckpt").exists()  # deleted on success

    # Paired check on held-out noise: base vs base + adapter from the same seeds.
    means = []
    for adapter in (None, out / "adapter"):
        c = sd_stack.load_components(str(stack_sample))  # patched: linear renderer
        if adapter is not None:
            assert load_adapter(c.unet, adapter) is None  # no ACE trained
        p = [PROMPTS[i % 4] for i in range(48)]
        with torch.no_grad():
            tr = sample_with_logprob(c.unet, c.vae, c.scheduler, sd_stack.encode_prompts(c, p),
                                     sd_stack.encode_prompts(c, [""] * 48),
                                     num_steps=4, guidance_scale=2.0, eta=1.0, generator=torch.Generator().manual_seed(99))
        means.append(tr.images.mean(dim=(1, 2, 3)))
    d = means[1] - means[0]
    assert d.mean() > 5 * d.std() / np.sqrt(len(d)), (d.mean(), d.std())


# ----------------------------------------------------------------------------- resume


def _run(stack, tmp, cfg, ckpt, max_epochs=None, reward=brightness):
    logged = []
    summary = train_ddpo(stack, tmp / "out", reward_fn=reward, prompt_fn=prompt_fn, cfg=cfg, ckpt_dir=ckpt,
                         log_fn=lambda m, s: logged.append((s, m)), max_epochs_this_call=max_epochs)
    return summary, logged


COMPARE = ("reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "kl")


def test_resume_after_kill_matches_uninterrupted(stack_eps, tmp_path):
    from safetensors.torch import load_file

    cfg = small_cfg(epochs=3, use_ace=True, ace_tokens=2, text_lora_rank=2)
    full, logs_full = _run(stack_eps, tmp_path / "a", cfg, tmp_path / "a" / "ckpt")
    assert full["finished"] == 1.0

    ckpt = tmp_path / "b" / "ckpt"
    part, logs1 = _run(stack_eps, tmp_path / "b", cfg, ckpt, max_epochs=1)
    assert part["finished"] == 0.0 and part["epochs_done"] == 1.0
    assert (ckpt / "latest" / "policy.safetensors").is_file()
    state = json.loads((ckpt / "latest" / "state.json").read_text())
    assert state["meta"]["next_epoch"] == 1
    # The optimizer state is loadable without unpickling arbitrary objects.
    torch.load(ckpt / "latest" / "optimizer.pt", weights_only=True)
    rest, logs2 = _run(stack_eps, tmp_path / "b", cfg, ckpt)
    assert rest["finished"] == 1.0
    # the resumed call logs the checkpoint's epochs again (a new MLflow run gets the whole history)
    assert [s for s, _ in logs1] == [0] and [s for s, _ in logs2] == [0, 1, 2]
    assert logs2[0][1] == logs1[0][1]
    for (s_a, m_a), (s_b, m_b) in zip(logs_full, logs2):
        for k in COMPARE:
            assert m_a[k] == pytest.approx(m_b[k], rel=1e-5, abs=1e-7), (s_a, k, m_a[k], m_b[k])
    wa = load_file(str(tmp_path / "a" / "out" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "out" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)
    ta = load_file(str(tmp_path / "a" / "out" / "adapter" / "text_encoder_lora.safetensors"))
    tb = load_file(str(tmp_path / "b" / "out" / "adapter" / "text_encoder_lora.safetensors"))
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-7)
    aa = load_file(str(tmp_path / "a" / "out" / "adapter" / "ace.safetensors"))["embeddings"]
    ab = load_file(str(tmp_path / "b" / "out" / "adapter" / "ace.safetensors"))["embeddings"]
    torch.testing.assert_close(aa, ab, rtol=1e-5, atol=1e-7)
    # rewards.csv of the resumed run holds all epochs, as the uninterrupted one.
    ra = pd.read_csv(tmp_path / "a" / "out" / "rewards.csv")
    rb = pd.read_csv(tmp_path / "b" / "out" / "rewards.csv")
    assert list(rb["epoch"]) == [0, 1, 2]
    np.testing.assert_allclose(ra["reward_mean"], rb["reward_mean"], rtol=1e-5)


def test_corrupt_checkpoint_is_set_aside_and_training_resumes(stack_eps, tmp_path):
    """A truncated latest checkpoint: a warning names the file, the checkpoint is renamed
    latest.corrupt, training resumes from the previous checkpoint and ends as an uninterrupted
    run does (issue 17, item 5)."""
    from safetensors.torch import load_file

    from medrl.checkpoints import CorruptCheckpointWarning

    cfg = small_cfg(epochs=3)
    full, _ = _run(stack_eps, tmp_path / "a", cfg, tmp_path / "a" / "ckpt")
    ckpt = tmp_path / "b" / "ckpt"
    _run(stack_eps, tmp_path / "b", cfg, ckpt, max_epochs=2)  # checkpoints after epochs 1 and 2
    weights = ckpt / "latest" / "policy.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(CorruptCheckpointWarning, match=r"latest/policy\.safetensors"):
        part, logs = _run(stack_eps, tmp_path / "b", cfg, ckpt, max_epochs=1)
    assert (ckpt / "latest.corrupt" / "policy.safetensors").is_file()
    assert [s for s, _ in logs] == [0, 1], "resumed from the previous checkpoint (next epoch 1)"
    assert json.loads((ckpt / "latest" / "state.json").read_text())["meta"]["next_epoch"] == 2
    rest, _ = _run(stack_eps, tmp_path / "b", cfg, ckpt)
    assert rest["finished"] == 1.0 and not ckpt.exists()
    wa = load_file(str(tmp_path / "a" / "out" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "out" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)
    # An unreadable checkpoint with no fallback left: a fresh start, not a failure.
    _run(stack_eps, tmp_path / "c", cfg, tmp_path / "c" / "ckpt", max_epochs=1)
    (tmp_path / "c" / "ckpt" / "latest" / "optimizer.pt").write_bytes(b"")
    with pytest.warns(CorruptCheckpointWarning, match=r"optimizer\.pt"):
        again, logs = _run(stack_eps, tmp_path / "c", cfg, tmp_path / "c" / "ckpt")
    assert again["finished"] == 1.0 and [s for s, _ in logs] == [0, 1, 2]


def test_resume_refuses_changed_params(stack_eps, tmp_path):
    from medrl.errors import DataError

    ckpt = tmp_path / "ckpt"
    _run(stack_eps, tmp_path, small_cfg(epochs=2), ckpt, max_epochs=1)
    with pytest.raises(DataError, match="lr"):
        _run(stack_eps, tmp_path, small_cfg(epochs=2, lr=1e-2), ckpt)
    with pytest.raises(DataError, match="kl_coef"):
        _run(stack_eps, tmp_path, small_cfg(epochs=2, kl_coef=0.5), ckpt)
    # A checkpoint from before kl_coef existed resumes when the run keeps its default (0).
    state_path = ckpt / "latest" / "state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["kl_coef"]
    state_path.write_text(json.dumps(state))
    summary, _ = _run(stack_eps, tmp_path, small_cfg(epochs=2), ckpt)
    assert summary["finished"] == 1.0


# ----------------------------------------------------------------------------- anchor / ACE


class AnchorReward:
    """RLCF-style reward (direct term + comparison with the anchor) that records its inputs.

    A purely comparative reward is identically 0 while the policy equals the anchor (zero-init
    LoRA, no ACE), so it could never start learning; CXRL's r_align is a direct term too."""

    needs_anchor = True

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, images, prompts, anchor_images=None):
        assert anchor_images is not None and anchor_images.shape == images.shape
        self.calls.append((images.clone(), anchor_images.clone()))
        own = images.mean(dim=(1, 2, 3))
        gain = own - anchor_images.mean(dim=(1, 2, 3))
        return own + gain, {"own": own, "gain": gain}


def test_anchor_shares_noise_and_disables_adapter(stack_eps, tmp_path):
    reward = AnchorReward()
    cfg = small_cfg(epochs=2, lr=3e-2, checkpoint_every=10, rlcf_paired_noise="shared")
    _run(stack_eps, tmp_path, cfg, tmp_path / "ckpt", reward=reward)
    first_policy, first_anchor = reward.calls[0]
    # Epoch 0: zero-init LoRA, no ACE -> the policy IS the anchor; same noise -> same images.
    torch.testing.assert_close(first_policy, first_anchor, rtol=0, atol=1e-6)
    last_policy, last_anchor = reward.calls[-1]
    assert (last_policy - last_anchor).abs().max() > 1e-4  # trained policy differs from the anchor
    df = pd.read_csv(tmp_path / "out" / "rewards.csv")
    assert "gain_mean" in df.columns


def test_paired_anchor_shares_only_the_initial_noise(stack_eps, tmp_path):
    """Default rlcf_paired_noise="initial": the reward's anchor images come from the sample's x_T but
    their own per-step noise. With (nearly) deterministic steps they match the policy's images
    (same x_T), with DDPO's eta=1 they do not (independent step noise)."""
    for eta, same in ((1e-4, True), (1.0, False)):
        reward = AnchorReward()
        cfg = small_cfg(epochs=1, checkpoint_every=10, eta=eta)
        assert cfg.rlcf_paired_noise == "initial"
        _run(stack_eps, tmp_path / str(eta), cfg, tmp_path / str(eta) / "ckpt", reward=reward)
        policy, anchor = reward.calls[0]  # epoch 0: the policy is the anchor model
        gap = (policy - anchor).abs().max().item()
        if same:
            assert 0 < gap < 1e-2, gap  # same x_T; step noise differs, but its scale is 1e-4
        else:
            assert gap > 0.05, gap
    with pytest.raises(ValueError, match="rlcf_paired_noise"):
        small_cfg(rlcf_paired_noise="all")


def test_prompt_repeats_and_base_reward(stack_eps, tmp_path):
    """Grouped prompts (each drawn prompt repeated) and the paired policy-minus-base gain on a
    fixed comparison set (the base sampled once, the policy at each comparison)."""
    calls: list[tuple[list[str], object]] = []

    def recording(images, prompts, anchor_images=None):
        calls.append((list(prompts), anchor_images))
        return brightness(images, prompts)

    cfg = small_cfg(epochs=3, lr=3e-2, checkpoint_every=10, prompt_repeats=4, log_base_reward=True,
                    base_reward_every=1, base_reward_samples=4)
    summary, logged = _run(stack_eps, tmp_path, cfg, tmp_path / "ckpt", reward=recording)
    policy_batches = [p for p, a in calls if len(p) == 8]
    assert len(policy_batches) == 3 and all(a is None for p, a in calls if len(p) == 8)  # no anchor for training
    for batch in policy_batches:  # 8 samples = 2 prompts x 4 repeats, in runs of 4
        assert all(len(set(batch[i:i + 4])) == 1 for i in range(0, 8, 4)), batch
    evals = [p for p, a in calls if len(p) == 4]
    assert len(evals) == 1 + 3 and all(p == evals[0] for p in evals)  # base once + policy per epoch, fixed prompts
    df = pd.read_csv(tmp_path / "out" / "rewards.csv")
    # Epoch 0: zero-init LoRA, same noise -> the policy is the base model, gain exactly 0.
    assert df.loc[0, "reward_gain_vs_base"] == pytest.approx(0.0, abs=1e-6)
    assert df["reward_gain_vs_base"].abs().iloc[1:].max() > 0  # trained policy differs from base
    assert np.isfinite(df["reward_gain_vs_base_se"]).all() and df["base_reward_mean"].nunique() == 1
    # brightness is the reward's only term: its paired gain is the reward's
    np.testing.assert_allclose(df["brightness_gain_vs_base"], df["reward_gain_vs_base"], atol=1e-6)
    assert "gain_vs_base_last" in summary
    with pytest.raises(ValueError, match="prompt_repeats"):
        small_cfg(prompt_repeats=3)  # 3 does not divide sample_batch_size=8


def test_base_comparison_schedule():
    """log_base_reward compares at epoch 0, every base_reward_every epochs and at the last."""
    from medrl.rl.trainer import _base_comparison_due

    cfg = small_cfg(epochs=10, log_base_reward=True, base_reward_every=4)
    assert [e for e in range(10) if _base_comparison_due(cfg, e)] == [0, 3, 7, 9]
    assert not any(_base_comparison_due(small_cfg(epochs=10), e) for e in range(10))


def test_ace_changes_condition_and_is_saved(stack_eps, tmp_path):
    from medrl.diffusion.lora import load_adapter

    # Policy and anchor share ALL their noise (rlcf_paired_noise="shared"): at epoch 0 (zero-init LoRA) the
    # only thing that can make them differ is ACE. Without ACE they are identical (the control), so
    # the comparison can fail; the default "initial" anchor draws its own step noise and always differs.
    for use_ace in (False, True):
        reward = AnchorReward()
        cfg = small_cfg(epochs=1, use_ace=use_ace, ace_tokens=3, checkpoint_every=10, rlcf_paired_noise="shared")
        _run(stack_eps, tmp_path / f"ace{use_ace}", cfg, tmp_path / f"ace{use_ace}" / "ckpt", reward=reward)
        policy, anchor = reward.calls[0]
        gap = (policy - anchor).abs().max().item()
        if use_ace:  # ACE tokens (random init) change the conditional branch; the anchor has no ACE
            assert gap > 1e-5, gap
        else:
            assert gap <= 1e-6, gap
    tmp_path = tmp_path / "aceTrue"
    from medrl.diffusion.stack import load_components

    c = load_components(str(stack_eps))
    ace = load_adapter(c.unet, tmp_path / "out" / "adapter")
    assert ace is not None and ace.embeddings.shape == (3, TINY["text_hidden_size"])
    x = torch.randn(2, 5, TINY["text_hidden_size"])
    y = ace(x)
    assert y.shape == (2, 8, TINY["text_hidden_size"]) and torch.equal(y[:, 3:], x)


def test_text_lora_trains_the_prompt_encoding_and_is_saved(stack_eps, tmp_path):
    """rl.common.text_lora_rank: the policy's text encoder gets a LoRA that the PPO loss reaches;
    the anchor (and the KL penalty's base) keep the base encoder, and "" stays the base's.
    Generation loads the saved encoder LoRA; a loader without a text encoder is told what is missing."""
    from medrl.diffusion.lora import TEXT_FILE, load_adapter
    from medrl.diffusion.stack import encode_prompts, load_components
    from medrl.errors import DataError

    reward = AnchorReward()
    cfg = small_cfg(epochs=2, lr=3e-2, checkpoint_every=10, rlcf_paired_noise="shared", text_lora_rank=2, kl_coef=0.1)
    _run(stack_eps, tmp_path, cfg, tmp_path / "ckpt", reward=reward)
    # Epoch 0: both LoRAs start as the identity, so the policy is the anchor (same noise, same images).
    torch.testing.assert_close(reward.calls[0][0], reward.calls[0][1], rtol=0, atol=1e-6)
    assert (reward.calls[-1][0] - reward.calls[-1][1]).abs().max() > 1e-4
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / TEXT_FILE).is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["text_lora"]["rank"] == 2

    base, tuned = load_components(str(stack_eps)), load_components(str(stack_eps))
    load_adapter(tuned.unet, adapter, text_encoder=tuned.text_encoder)
    with torch.no_grad():
        moved = (encode_prompts(tuned, PROMPTS) - encode_prompts(base, PROMPTS)).abs().max().item()
    assert moved > 1e-4, "the text encoder's LoRA did not learn"
    with pytest.raises(DataError, match="text encoder"):
        load_adapter(load_components(str(stack_eps)).unet, adapter)


def test_full_finetune_with_anchor(stack_eps, tmp_path):
    reward = AnchorReward()
    cfg = small_cfg(epochs=2, full_finetune=True, lr=1e-3, checkpoint_every=10, rlcf_paired_noise="shared")
    _run(stack_eps, tmp_path, cfg, tmp_path / "ckpt", reward=reward)
    torch.testing.assert_close(reward.calls[0][0], reward.calls[0][1], rtol=0, atol=1e-6)
    assert (tmp_path / "out" / "adapter" / "unet.safetensors").is_file()
    assert (reward.calls[-1][0] - reward.calls[-1][1]).abs().max() > 1e-4


def test_kl_penalty_holds_the_policy_near_the_base(stack_eps, tmp_path):
    """kl_coef > 0: the per-step KL to the frozen base is logged and a large coefficient keeps
    the policy closer to the base than a negligible one (same seed, same reward); full fine-tuning
    (a frozen copy as the base) runs too."""
    kls = {}
    for coef in (1e-6, 100.0):
        cfg = small_cfg(epochs=3, lr=3e-2, checkpoint_every=10, kl_coef=coef)
        _run(stack_eps, tmp_path / str(coef), cfg, tmp_path / f"ckpt{coef}")
        df = pd.read_csv(tmp_path / str(coef) / "out" / "rewards.csv")
        assert np.isfinite(df["kl_to_base"]).all() and (df["kl_to_base"] >= 0).all()
        kls[coef] = df["kl_to_base"].to_numpy()
    assert kls[1e-6][-1] > 0
    assert kls[100.0][-1] < 0.5 * kls[1e-6][-1], kls
    cfg = small_cfg(epochs=2, full_finetune=True, lr=1e-3, checkpoint_every=10, kl_coef=1.0)
    _run(stack_eps, tmp_path / "full", cfg, tmp_path / "ckpt_full")
    # one optimizer step per epoch: epoch 0 is measured before it (KL 0), epoch 1 after
    assert pd.read_csv(tmp_path / "full" / "out" / "rewards.csv")["kl_to_base"].tolist()[-1] > 0
    with pytest.raises(ValueError, match="kl_coef"):
        small_cfg(kl_coef=-1.0)


def test_skip_last_steps_trains_only_the_noisier_steps(stack_eps, tmp_path, monkeypatch):
    """skip_last_steps=N: all steps are sampled, the PPO update sees only the first T-N."""
    import medrl.rl.trainer as trainer

    trained: list[int] = []
    original = trainer.ddim_step_gaussian

    def recording(scheduler, out, t, x, eta=1.0):
        # the trainer evaluates steps only in the update (sampling goes through medrl.diffusion.rollout)
        trained.extend(torch.as_tensor(t).reshape(-1).tolist())
        return original(scheduler, out, t, x, eta=eta)

    monkeypatch.setattr(trainer, "ddim_step_gaussian", recording)
    cfg = small_cfg(epochs=1, num_steps=4, timestep_fraction=1.0, skip_last_steps=2, checkpoint_every=10)
    _, logged = _run(stack_eps, tmp_path, cfg, tmp_path / "ckpt")
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_pretrained(str(stack_eps / "scheduler"))
    sched.set_timesteps(4)
    first_two = set(sched.timesteps[:2].tolist())
    assert set(trained) == first_two, (set(trained), sched.timesteps.tolist())
    assert len(trained) == 8 * 2  # every sample, each of its 2 trained steps once
    with pytest.raises(ValueError, match="skip_last_steps"):
        small_cfg(num_steps=3, skip_last_steps=3)


def test_config_from_params():
    from medrl.config import Params

    p = Params().rl
    cfg = DDPOConfig.from_params(p.common, p.cxr, use_ace=True, ace_tokens=p.cxr.ace_tokens)
    assert cfg.ace_tokens == p.cxr.ace_tokens and cfg.clip_range == p.common.clip_range and cfg.use_ace
    assert cfg.lr == p.common.lr  # rl.cxr.lr null -> rl.common.lr
    track = {**p.isic.model_dump(), "lr": 0.01}
    assert DDPOConfig.from_params(p.common.model_dump(), track).lr == 0.01  # a track's lr wins
    with pytest.raises(ValueError):
        DDPOConfig.from_params({}, {}, not_a_field=1)
    with pytest.raises(ValueError, match="mixed_precision"):  # checked by the schema's Run field
        DDPOConfig.from_params({}, {}, mixed_precision="fp8")
    with pytest.raises(ValueError, match="lr"):  # the schema's checks, also for raw dicts
        DDPOConfig.from_params({"lr": -1.0}, {})


def test_config_from_the_stages_params_view():
    """workflow/graph.py builds the config from the stage's ParamsView (only declared keys)."""
    sys.path.insert(0, str(REPO / "workflow"))
    from graph import STAGES, _ddpo_config, stage_params

    from medrl.config import validate_params
    from medrl_testutil import small_params

    params = validate_params(small_params(), check_paths=False)
    variant = next(iter(params.rl.cxr.variants))
    for stage, track, wild in (("rl_isic", "isic", {"seed": "2"}), ("rl_cxr", "cxr", {"variant": variant, "seed": "1"})):
        ctx = type("Ctx", (), {"params": stage_params(STAGES[stage], params, wild), "wildcards": wild})()
        cfg = _ddpo_config(ctx, track, use_ace=track == "cxr")
        assert cfg.epochs == getattr(params.rl, track).epochs and cfg.num_steps == params.rl.common.num_steps
        assert cfg.base_reward_every == params.rl.common.base_reward_every
        assert cfg.seed == int(wild["seed"])  # the seed comes from the job's wildcard
        reps = getattr(params.rl, track).prompt_repeats
        assert cfg.prompt_repeats == (params.rl.common.prompt_repeats if reps is None else reps)


# ----------------------------------------------------------------------------- 2 processes

SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
sys.path.insert(0, {tests!r})
import pytest
from test_trainer import small_cfg, prompt_fn, brightness
from accelerate import PartialState
from medrl.rl.trainer import train_ddpo
calls = []
def reward(images, prompts, anchor_images=None):
    r, terms = brightness(images, prompts)
    if not calls:  # each rank must draw its own noise and prompts; one file per rank, as the
        # ranks share one stdout pipe and unbuffered print() interleaves their pieces
        rank = PartialState().process_index
        Path({first!r}, f"{{rank}}.txt").write_text(f"{{prompts}} {{round(float(r[0]), 6)}}")
    calls.append(1)
    return r, terms
cfg = small_cfg(epochs=3, sample_batch_size=4, train_batch_size=2, checkpoint_every=2, use_ace=True, text_lora_rank=2)
out = train_ddpo(Path({stack!r}), Path({out!r}), reward_fn=reward, prompt_fn=prompt_fn, cfg=cfg,
                 ckpt_dir=Path({ckpt!r}))
print("SUMMARY", out, flush=True)
"""


@pytest.mark.slow
def test_two_process_gloo_cpu(stack_eps, tmp_path):
    script = tmp_path / "run.py"
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(Path(__file__).parent), stack=str(stack_eps),
                                                    out=str(out), ckpt=str(ckpt), first=str(tmp_path / "first"))))
    (tmp_path / "first").mkdir()
    accelerate = Path(sys.executable).with_name("accelerate")
    # `accelerate launch --cpu` always starts ONE process (multi-CPU needs mpirun there); the
    # torchrun-based launcher (--multi_gpu) with ACCELERATE_USE_CPU=1 gives 2 gloo CPU ranks.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517", str(script)],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("SUMMARY") == 2  # both ranks finished
    first = {f.stem: f.read_text() for f in (tmp_path / "first").iterdir()}
    assert sorted(first) == ["0", "1"] and first["0"] != first["1"]  # different samples per rank
    df = pd.read_csv(out / "rewards.csv")
    assert list(df["epoch"]) == [0, 1, 2]
    assert (df["samples"] == 8).all()  # rewards gathered from both ranks (2 x 4)
    assert np.isfinite(df[["reward_mean", "reward_std", "loss", "approx_kl", "kl"]].to_numpy()).all()
    assert ((df["reward_mean"] > 0) & (df["reward_mean"] < 1)).all()
    assert (df["reward_std"] > 0).all()
    assert all((out / "adapter" / f).is_file() for f in ("adapter_model.safetensors", "ace.safetensors", "text_encoder_lora.safetensors"))
    assert not ckpt.exists()


# ----------------------------------------------------------------------------- fused micro-steps


def _one_update(stack: Path, tmp: Path, cfg: DDPOConfig, ro=None):
    """One epoch's _ppo_update from the seeded initial LoRA (B made non-zero): the gradient of
    every optimizer step (before clipping), the returned statistics, the updated parameters."""
    from medrl.diffusion.sampler import Sampler
    from medrl.diffusion.stack import encode_prompts
    from medrl.rl import trainer as tr

    s = tr._setup(stack, cfg, brightness, False)
    with torch.no_grad():
        for n, p in s.policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    tr._resume(s, tmp / "no-ckpt", tmp / "out", None)
    with torch.no_grad():
        s.neg1 = encode_prompts(s.c, [""]).float()
    s.sampler = Sampler(s.policy.unet, s.c.vae, s.c.scheduler, s.neg1, num_steps=cfg.num_steps,
                        guidance_scale=cfg.guidance_scale, eta=cfg.eta)
    if ro is None:
        ro = tr._collect_rollouts(s, 0, np.random.default_rng(0), brightness, prompt_fn)
    s.c.scheduler.set_timesteps(cfg.num_steps)  # as sampling leaves it
    grads, step = [], s.optimizer.step

    def record(*a, **k):
        grads.append([p.grad.detach().clone() for p in s.params])
        return step(*a, **k)

    s.optimizer.step = record
    stats = tr._ppo_update(s, ro, np.random.default_rng(5))
    return ro, grads, stats, [p.detach().clone() for p in s.params]


@pytest.mark.parametrize("kl_coef", [0.0, 0.5])
def test_fused_micro_steps_give_the_unfused_gradient(stack_eps, tmp_path, kl_coef):
    """Micro-steps of an accumulation group fused into one forward/backward (3 at a time over
    groups of 4: chunks of 3 and 1) give the one-by-one gradients, statistics and weights."""
    kw = {"sample_batch_size": 8, "train_batch_size": 4, "gradient_accumulation_steps": 2, "num_steps": 3,
          "timestep_fraction": 0.67, "kl_coef": kl_coef}  # 2 batches x 2 timesteps: groups of 4 micro-steps
    ro, g1, st1, w1 = _one_update(stack_eps, tmp_path, small_cfg(fuse_micro_steps=1, **kw))
    _, g3, st3, w3 = _one_update(stack_eps, tmp_path, small_cfg(fuse_micro_steps=3, **kw), ro)
    assert len(g1) == len(g3) == 1 and any(g.abs().max() > 1e-6 for g in g1[0])
    for a, b in zip(g1[0], g3[0]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert st3 == pytest.approx(st1, rel=1e-4, abs=1e-7)  # loss, approx_kl, clipfrac, kl, grad_norm, kl_base
    for a, b in zip(w1, w3):  # Adam's first step is ~lr * sign(g): a near-zero g's rounding shows
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fuse_micro_steps"):
        small_cfg(fuse_micro_steps=0)
