"""DDPO (Black et al. 2023) with LoRA (+ optional ACE), shared by the ISIC and CXR tracks.

Per epoch (:func:`train_ddpo`): :func:`_collect_rollouts` (sample trajectories with log-probs ->
rewards, optionally against the frozen anchor model, CXRL's RLCF -> per-prompt advantages) ->
:func:`_ppo_update` (PPO on random timesteps of the recorded trajectories) -> :func:`_epoch_metrics`;
with ``log_base_reward``, every ``base_reward_every`` epochs :func:`_compare_with_base` scores the
policy against the frozen base on a fixed set of prompts and noises. Runs in one process or several (``accelerate launch``), checkpoints every
``checkpoint_every`` epochs and resumes to the same numbers as an uninterrupted run.

Randomness: every random draw of an epoch comes from generators seeded by
(seed, epoch, process index, purpose[, batch]) -- prompts, shuffles, initial and per-step noise
(medrl.diffusion.sampler's seed policy; the purposes are the ``_P_*`` constants). A resumed run
therefore needs only weights, optimizer and stat-tracker state to continue exactly; the global
torch RNG is saved too, for library code that draws from it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medrl.config import RLCommon, RLCxr, RLTrack, Run, rl_track_settings
from medrl.diffusion.ace import ACE
from medrl.diffusion.ddim import ddim_step_gaussian, gaussian_kl, gaussian_logprob
from medrl.diffusion.lora import DEFAULT_TARGETS, add_lora, add_text_lora, save_adapter, set_adapters_enabled
from medrl.diffusion.rollout import guided_eps
from medrl.diffusion.sampler import Noise, Sampler, derive_seed, paired_anchor_noise
from medrl.errors import DataError
from medrl.io import image_grid, save_image, write_table
from medrl.progress import progress
from medrl.rl.curves import plot_reward_curve
from medrl.rl.ppo import PerPromptStatTracker, ppo_loss

RewardFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
PromptFn = Callable[[np.random.Generator, int], list[str]]
LogFn = Callable[[dict[str, float], int], None]

# Config fields that must not change between a checkpoint and the run resuming it.
_RESUME_KEYS = (
    "sample_batch_size", "sample_batches_per_epoch", "train_batch_size", "gradient_accumulation_steps",
    "num_steps", "eta", "guidance_scale", "lr", "clip_range", "adv_clip_max", "timestep_fraction",
    "num_inner_epochs", "per_prompt_buffer", "per_prompt_min_count", "lora_rank", "lora_alpha", "lora_target_modules",
    "full_finetune", "seed", "use_ace", "ace_tokens", "mixed_precision", "prompt_repeats", "rlcf_paired_noise", "kl_coef",
    "skip_last_steps", "text_lora_rank",
)


@dataclass
class DDPOConfig:
    """The trainer's settings, already validated: ``rl.common`` merged with ``rl.<track>`` by
    :func:`medrl.config.rl_track_settings` (where every default and check lives; see params.yaml
    for what each key means), plus the run's ``mixed_precision`` and the variant's ACE / RLCF
    settings. Build it with :meth:`from_params` (or :meth:`from_flat`). Per-process sizes: each
    process samples sample_batch_size x sample_batches_per_epoch trajectories per epoch."""

    # rl.<track>
    epochs: int
    sample_batch_size: int
    sample_batches_per_epoch: int
    seed: int
    # rl.common, after the track's overrides
    num_steps: int
    eta: float
    guidance_scale: float
    lora_rank: int
    text_lora_rank: int  # 0: the text encoder stays the base's
    full_finetune: bool
    lr: float
    clip_range: float
    adv_clip_max: float
    timestep_fraction: float
    skip_last_steps: int  # the last N denoising steps are sampled but not trained on
    num_inner_epochs: int
    train_batch_size: int
    gradient_accumulation_steps: int
    per_prompt_buffer: int
    per_prompt_min_count: int
    prompt_repeats: int
    log_base_reward: bool
    base_reward_every: int
    base_reward_samples: int
    kl_coef: float
    checkpoint_every: int
    # Execution only (the same gradient up to float rounding): PPO micro-steps of an accumulation
    # group run this many at a time in one forward/backward; activation memory grows with it.
    # 1 (one by one) keeps the reference's numerics bit for bit.
    fuse_micro_steps: int
    # the run's and the variant's settings (run.mixed_precision, rl.cxr.ace_tokens, rl.cxr.rlcf_paired_noise)
    mixed_precision: str
    use_ace: bool
    ace_tokens: int
    rlcf_paired_noise: str
    # Not in params.yaml: DDPO's constants.
    lora_alpha: int | None = None  # None: = lora_rank (scale 1)
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGETS  # attention projections, as in DDPO
    max_grad_norm: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    grid_every: int = 0  # sample grid every N epochs; 0 = every checkpoint_every epochs

    @classmethod
    def from_params(cls, common: RLCommon | dict[str, Any], track: RLTrack | dict[str, Any], *, track_name: str = "",
                    mixed_precision: str | None = None, use_ace: bool = False, ace_tokens: int | None = None,
                    rlcf_paired_noise: str | None = None, **constants: Any) -> DDPOConfig:
        """From params.rl.common and params.rl.<track> (schema models or raw dicts, validated by
        the schema either way) and the run's / variant's settings; ``constants`` override the
        trainer-only fields (lora_target_modules, grid_every, ...)."""
        settings = rl_track_settings(common, track, name=track_name)
        # unset (None): the schema's run.mixed_precision / rl.cxr.rlcf_paired_noise / ace_tokens defaults
        extra = {"mixed_precision": Run.model_fields["mixed_precision"].default if mixed_precision is None
                 else mixed_precision, "use_ace": bool(use_ace),
                 "rlcf_paired_noise": RLCxr.model_fields["rlcf_paired_noise"].default if rlcf_paired_noise is None
                 else rlcf_paired_noise,
                 "ace_tokens": RLCxr.model_fields["ace_tokens"].default if ace_tokens is None else int(ace_tokens)}
        # the run's / variant's values are checked by the schema fields they come from
        Run(mixed_precision=extra["mixed_precision"])
        RLCxr(rlcf_paired_noise=extra["rlcf_paired_noise"])
        own = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        unknown = sorted(set(constants) - own)
        if unknown:
            raise ValueError(f"DDPOConfig has no trainer-only fields {unknown}")
        return cls(**settings, **extra, **constants)

    @classmethod
    def from_flat(cls, **settings: Any) -> DDPOConfig:
        """From one flat mapping of rl.common / rl.<track> keys and from_params' keyword
        arguments (tests, benchmarks, scripts); a key of both goes to rl.common."""
        common = {k: settings.pop(k) for k in list(settings) if k in RLCommon.model_fields}
        track = {k: settings.pop(k) for k in list(settings) if k in RLTrack.model_fields}
        return cls.from_params(common, track, **settings)


# What a checkpoint written before a key existed ran with (not a default of the current schema).
_LEGACY = {"skip_last_steps": 0, "kl_coef": 0.0, "prompt_repeats": 1, "rlcf_paired_noise": "initial",
           "text_lora_rank": 0}


class Policy(nn.Module):
    """UNet (+ LoRA), optional ACE and optional text encoder with a LoRA (``rl.common.text_lora_rank``)
    as one module, so DDP syncs all of them and one forward does CFG. The text LoRA, like ACE,
    changes what a prompt means to the UNet, not the unconditional ("") branch."""

    def __init__(self, unet: nn.Module, ace: ACE | None, text_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.ace = ace
        self.text_encoder = text_encoder

    def condition(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.ace(text_embeds) if self.ace is not None else text_embeds

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0].float()

    def forward(self, latents, t, text_embeds, negative_embeds, guidance_scale: float,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids is not None:  # the adapted text encoder: embed here, so its LoRA gets gradients
            text_embeds = self.embed(input_ids)
        return guided_eps(self.unet, latents, t, self.condition(text_embeds), negative_embeds, guidance_scale)


# Purposes of the trainer's derived seeds, (seed, epoch, rank, purpose[, batch]) during an epoch and
# (seed, rank, purpose) for the fixed base comparison. Fixed: checkpoints resume on these numbers.
_P_EPOCH, _P_ROLLOUT, _P_ANCHOR_STEPS, _P_BASE_PROMPTS, _P_BASE_NOISE, _P_TEXT_LORA = 0, 1, 2, 4, 5, 6


@contextlib.contextmanager
def _base_model(policy: Policy, anchor_unet: nn.Module | None):
    """The frozen anchor (base) UNet: LoRA disabled, or a frozen copy for full fine-tuning. A text
    encoder LoRA is off inside too, so prompts encoded there are the base's."""
    text = policy.text_encoder
    trainable = {n: p.requires_grad for n, p in policy.named_parameters()}
    if text is not None:
        set_adapters_enabled(text, False)
    if anchor_unet is None:
        policy.unet.disable_adapters()
    try:
        yield anchor_unet if anchor_unet is not None else policy.unet
    finally:
        if anchor_unet is None:
            policy.unet.enable_adapters()
        if text is not None:
            set_adapters_enabled(text, True)
        # peft's enable/disable touch requires_grad; restore exactly what we had.
        for n, p in policy.named_parameters():
            p.requires_grad_(trainable[n])


# ----------------------------------------------------------------------------- checkpoints


def _trainable_state(policy: Policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in policy.named_parameters() if p.requires_grad}


def _save_checkpoint(ckpt_dir: Path, policy: Policy, optimizer, tracker, epoch: int, history: list, cfg: DDPOConfig,
                     samples_dir: Path | None = None) -> None:
    """Checkpoint (medrl.checkpoints) the trainable weights, optimizer, RNG and tracker. The sample
    grids written so far (``samples_dir``) are stored too, so a resumed stage rebuilds the output
    folder of an uninterrupted run."""
    from medrl.checkpoints import TrainState, save_train_state

    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    samples = {f.name: f for f in sorted(samples_dir.glob("*.png"))} if samples_dir is not None and samples_dir.is_dir() else {}
    state = TrainState(tensors={"policy": _trainable_state(policy), "rng": rng}, objects={"optimizer": optimizer.state_dict()},
                       meta={"next_epoch": epoch, "tracker": tracker.state_dict(), "history": history}, files=samples)
    save_train_state(ckpt_dir, state, {k: getattr(cfg, k) for k in _RESUME_KEYS})


def _restore_checkpoint(ckpt_dir: Path, policy: Policy, optimizer, tracker, cfg: DDPOConfig) -> dict[str, Any] | None:
    """Load the checkpoint (medrl.checkpoints: ``latest``, or ``previous`` when latest is corrupt)
    into policy, optimizer and tracker; None (start afresh) when no readable checkpoint is left.
    A checkpoint of other rl params, or of a policy with other parameters, raises DataError."""
    from medrl.checkpoints import load_train_state

    ck = load_train_state(ckpt_dir, {k: getattr(cfg, k) for k in _RESUME_KEYS}, on_mismatch="raise", defaults=_LEGACY)
    if ck is None:
        return None
    params = dict(policy.named_parameters())
    sd = ck.tensors["policy"]
    missing = [n for n, p in params.items() if p.requires_grad and n not in sd]
    if missing or any(n not in params for n in sd):
        raise DataError(f"{ckpt_dir}: policy checkpoint's parameter names do not match the policy (missing {missing[:3]})")
    with torch.no_grad():
        for n, v in sd.items():
            params[n].copy_(v.to(params[n].device, params[n].dtype))
    optimizer.load_state_dict(ck.objects["optimizer"])
    rng = ck.tensors["rng"]
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    tracker.load_state_dict(ck.meta["tracker"])
    return {"state": ck.meta, "samples": ck.files}


# ----------------------------------------------------------------------------- training


def _check_prompts(prompts: Any, n: int) -> list[str]:
    if not isinstance(prompts, (list, tuple)) or len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt_fn must return a list of {n} strings, got {type(prompts).__name__} of length {len(prompts) if hasattr(prompts, '__len__') else '?'}")
    return list(prompts)


def _check_rewards(out: Any, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError("reward_fn must return (rewards Tensor (B,), terms dict[str, Tensor (B,)])")
    rewards, terms = out
    rewards = torch.as_tensor(rewards).detach().float().reshape(-1)
    if rewards.shape[0] != n:
        raise ValueError(f"reward_fn returned {rewards.shape[0]} rewards for {n} images")
    terms = {k: torch.as_tensor(v).detach().float().reshape(-1) for k, v in (terms or {}).items()}
    for k, v in terms.items():
        if v.shape[0] != n:
            raise ValueError(f"reward_fn term {k!r} has {v.shape[0]} values for {n} images")
    return rewards, terms


@dataclass
class _Setup:
    """What a DDPO run builds once: models, optimizer, stat tracker and the loop's sizes."""

    cfg: DDPOConfig
    accelerator: Any
    c: Any  # the stack's components (medrl.diffusion.stack.load_components)
    policy: Policy
    model: nn.Module  # the policy as prepared by accelerate (DDP-wrapped with several processes)
    optimizer: Any
    params: list[torch.nn.Parameter]
    tracker: PerPromptStatTracker
    anchor_unet: nn.Module | None  # frozen copy of the base for full fine-tuning, else None
    reward_uses_anchor: bool
    neg1: torch.Tensor = None  # the unconditional ("") embedding, encoded once
    sampler: Sampler | None = None  # DDIM + CFG with the run's settings, built with neg1
    base_eval: dict[str, Any] | None = None  # the frozen base's fixed comparison set, once sampled

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def t_train(self) -> int:  # trained steps: 0 .. t_train-1 (the first, noisiest ones)
        return self.cfg.num_steps - self.cfg.skip_last_steps

    @property
    def n_train_t(self) -> int:
        return max(1, math.floor(self.t_train * self.cfg.timestep_fraction))


def _setup(base_dir: Path, cfg: DDPOConfig, reward_fn: RewardFn, anchor: bool) -> _Setup:
    from accelerate import Accelerator

    from medrl.diffusion.stack import load_components

    # Accumulation is done explicitly in _ppo_update (reset every inner epoch, trailing partial
    # group stepped), so accelerate's own counter stays at 1; it would otherwise rescale the loss.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1)
    device = accelerator.device
    c = load_components(str(base_dir), device=str(device))
    unet = c.unet
    anchor_unet = None
    reward_uses_anchor = bool(anchor or getattr(reward_fn, "needs_anchor", False))
    if cfg.full_finetune:
        if reward_uses_anchor or cfg.log_base_reward or cfg.kl_coef > 0:
            anchor_unet = copy.deepcopy(unet).requires_grad_(False)
        unet.requires_grad_(True)
    else:
        add_lora(unet, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_target_modules), seed=cfg.seed)
    text_encoder = None
    if cfg.text_lora_rank:  # c.text_encoder itself: encode_prompts(c, ...) then gives the policy's embeddings
        text_encoder = add_text_lora(c.text_encoder, cfg.text_lora_rank, seed=derive_seed(cfg.seed, _P_TEXT_LORA))
    ace = ACE(cfg.ace_tokens, c.text_encoder.config.hidden_size, seed=cfg.seed).to(device) if cfg.use_ace else None
    policy = Policy(unet, ace, text_encoder)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_eps
    )
    tracker = PerPromptStatTracker(cfg.per_prompt_buffer, cfg.per_prompt_min_count)
    return _Setup(cfg, accelerator, c, policy, policy, optimizer, params, tracker, anchor_unet, reward_uses_anchor)


def _resume(s: _Setup, ckpt_dir: Path, out_dir: Path, log_fn: LogFn | None) -> tuple[int, list[dict[str, float]]]:
    """Restore the checkpoint in ``ckpt_dir`` if any, then let accelerate wrap the model. A
    resumed stage starts from an empty temp output and a new MLflow run: the epochs already done
    are rebuilt from the checkpoint (sample grids, rewards.csv) and their metrics logged again,
    so both hold the whole run as an uninterrupted one would. Returns (start epoch, history)."""
    resumed = _restore_checkpoint(ckpt_dir, s.policy, s.optimizer, s.tracker, s.cfg) if ckpt_dir.is_dir() else None
    start_epoch, history = 0, []
    if resumed is not None:
        start_epoch, history = int(resumed["state"]["next_epoch"]), list(resumed["state"]["history"])
    s.model, s.optimizer = s.accelerator.prepare(s.policy, s.optimizer)
    s.policy = s.accelerator.unwrap_model(s.model)
    if resumed is not None and s.accelerator.is_main_process:
        for name, data in sorted(resumed["samples"].items()):
            (out_dir / "samples").mkdir(parents=True, exist_ok=True)
            (out_dir / "samples" / name).write_bytes(data)
        if history:
            write_table(pd.DataFrame(history), out_dir / "rewards.csv")
        if log_fn is not None:
            for h in history:
                log_fn(h, int(h["epoch"]))
    return start_epoch, history


def _sample(s: _Setup, unet, condition: Callable, text: torch.Tensor, noise: Noise):
    """One batch of trajectories of ``unet`` on ``condition(text)`` (the policy's ACE, or none
    for the base) with x_T and per-step noise from ``noise``."""
    with torch.no_grad(), s.accelerator.autocast():
        return s.sampler.sample(condition(text), noise, unet=unet)


def _as_is(text: torch.Tensor) -> torch.Tensor:  # the base model's condition: no ACE tokens
    return text


@dataclass
class _Rollouts:
    """One epoch's trajectories on this process and the rewards of all processes."""

    latents: torch.Tensor  # (N, T+1, C, h, w)
    old_logp: torch.Tensor  # (N, T)
    timesteps: torch.Tensor  # (N, T)
    text_embeds: torch.Tensor  # (N, L, D), without ACE tokens
    input_ids: torch.Tensor | None  # (N, L) the prompts' tokens, when the policy adapts the text encoder
    rewards_all: np.ndarray  # (N x processes,)
    terms_all: dict[str, np.ndarray]
    adv: torch.Tensor | None = None  # (N,) this process's advantages
    first_images: torch.Tensor | None = None  # up to 16 images of the first batch, for the grid
    seconds: float = 0.0  # wall time of the collection


def _collect_rollouts(s: _Setup, epoch: int, rng: np.random.Generator, reward_fn: RewardFn,
                      prompt_fn: PromptFn) -> _Rollouts:
    """Sample the epoch's trajectories (prompts from ``rng``, noise seeded by (seed, epoch,
    rank, batch)), score them, and turn the gathered rewards into per-prompt advantages."""
    from accelerate.utils import gather_object

    from medrl.diffusion.stack import tokenize_prompts

    cfg, acc = s.cfg, s.accelerator
    s.policy.eval()
    trajs, texts, ids_l, prompts_local, rewards_l, terms_l = [], [], [], [], [], {}
    for b in range(cfg.sample_batches_per_epoch):
        n_groups = cfg.sample_batch_size // cfg.prompt_repeats
        prompts = _check_prompts(prompt_fn(rng, n_groups), n_groups)
        prompts = [p for p in prompts for _ in range(cfg.prompt_repeats)]
        noise = Noise.batch(derive_seed(cfg.seed, epoch, s.rank, _P_ROLLOUT, b))
        with torch.no_grad():
            ids = tokenize_prompts(s.c, prompts)
            text = s.c.text_encoder(ids)[0].float()  # the policy's (text LoRA on, if any)
            traj = _sample(s, s.policy.unet, s.policy.condition, text, noise)
            anchor_images = None
            if s.reward_uses_anchor:
                anchor = paired_anchor_noise(noise, cfg.rlcf_paired_noise,
                                             own_steps=derive_seed(cfg.seed, epoch, s.rank, _P_ANCHOR_STEPS, b))
                with _base_model(s.policy, s.anchor_unet) as base_unet:
                    base_text = s.policy.embed(ids) if s.policy.text_encoder is not None else text
                    anchor_images = _sample(s, base_unet, _as_is, base_text, anchor).images
        r, terms = _check_rewards(reward_fn(traj.images, prompts, anchor_images=anchor_images), len(prompts))
        trajs.append(traj)
        texts.append(text)
        ids_l.append(ids)
        prompts_local += prompts
        rewards_l.append(r)
        for k, v in terms.items():
            terms_l.setdefault(k, []).append(v)

    # Every process sees every reward, so the per-prompt statistics (and the tracker state,
    # which must be identical on all ranks) do not depend on how samples were split.
    rewards_all = acc.gather(torch.cat(rewards_l).to(s.device)).cpu().numpy()
    prompts_all = gather_object(prompts_local) if acc.num_processes > 1 else prompts_local
    adv_all = s.tracker.update(prompts_all, rewards_all)
    adv = torch.as_tensor(adv_all.reshape(acc.num_processes, -1)[s.rank], dtype=torch.float32, device=s.device)
    return _Rollouts(
        latents=torch.cat([t.latents for t in trajs]), old_logp=torch.cat([t.log_probs.float() for t in trajs]),
        timesteps=torch.cat([t.timesteps for t in trajs]), text_embeds=torch.cat(texts),
        input_ids=torch.cat(ids_l) if s.policy.text_encoder is not None else None,
        rewards_all=rewards_all,
        terms_all={k: acc.gather(torch.cat(v).to(s.device)).cpu().numpy() for k, v in terms_l.items()},
        adv=adv, first_images=trajs[0].images[:16].detach().cpu(),
    )


def _ppo_micro_steps(s: _Setup, ro: _Rollouts, parts: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[torch.Tensor, dict]]:
    """Loss and PPO statistics of each micro-step in ``parts`` ((samples ``idx``, their recorded
    steps) pairs) under the current policy, from ONE forward over all of them: the same Gaussian
    step as sampling, evaluated once (+ the KL penalty). Each micro-step's loss and statistics
    are over its own batch only, as if it ran alone."""
    cfg, acc, device = s.cfg, s.accelerator, s.device
    idx_t = torch.as_tensor(np.concatenate([idx for idx, _ in parts]), device=device)
    step_idx = torch.as_tensor(np.concatenate([steps for _, steps in parts]), device=device)
    x_t, x_prev = ro.latents[idx_t, step_idx], ro.latents[idx_t, step_idx + 1]
    t = ro.timesteps[idx_t, step_idx]
    text, neg = ro.text_embeds[idx_t], s.neg1.expand(len(idx_t), -1, -1)
    ids = ro.input_ids[idx_t] if ro.input_ids is not None else None
    if cfg.kl_coef > 0:
        # The base's step at the same x_t (no grad; the LoRA is switched off for it).
        with torch.no_grad(), acc.autocast(), _base_model(s.policy, s.anchor_unet) as base_unet:
            base_text = s.policy.embed(ids) if ids is not None else text
            eps_base = guided_eps(base_unet, x_t, t, base_text, neg, cfg.guidance_scale)
        mean_base, _ = ddim_step_gaussian(s.c.scheduler, eps_base.float(), t, x_t, eta=cfg.eta)
    with acc.autocast():
        eps = s.model(x_t, t, text, neg, cfg.guidance_scale, input_ids=ids)
    mean, std = ddim_step_gaussian(s.c.scheduler, eps.float(), t, x_t, eta=cfg.eta)
    logp = gaussian_logprob(x_prev, mean, std)
    old_logp, adv = ro.old_logp[idx_t, step_idx], ro.adv[idx_t]
    out, start = [], 0
    for idx, _ in parts:
        b = slice(start, start + len(idx))
        start += len(idx)
        loss, info = ppo_loss(logp[b], old_logp[b], adv[b], cfg.clip_range, cfg.adv_clip_max)
        if cfg.kl_coef > 0:
            info["kl_base"] = gaussian_kl(mean[b], mean_base[b], std[b]).mean()
            loss = loss + cfg.kl_coef * info["kl_base"]
        out.append((loss, info))
    return out


def _ppo_micro_step(s: _Setup, ro: _Rollouts, idx: np.ndarray, steps: np.ndarray) -> tuple[torch.Tensor, dict]:
    """Loss (and PPO statistics) of the recorded steps ``steps`` of samples ``idx``."""
    return _ppo_micro_steps(s, ro, [(idx, steps)])[0]


def _ppo_update(s: _Setup, ro: _Rollouts, rng: np.random.Generator) -> list[float]:
    """PPO updates on random timesteps of the recorded trajectories; returns the epoch's mean
    loss, approx_kl, clipfrac, kl, grad_norm and kl_base over all processes.

    One optimizer step per accumulation group of gradient_accumulation_steps x n_train_t
    micro-steps (one (batch, timestep) each). The weights do not change within a group, so its
    micro-steps run fuse_micro_steps at a time in one forward/backward: the gradient is the
    same sum (the group's mean), each micro-step's statistics its own."""
    cfg, acc, device = s.cfg, s.accelerator, s.device
    s.policy.train()
    n_local, n_train_t = len(ro.latents), s.n_train_t
    stats: dict[str, list[torch.Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": [], "kl": [], "kl_base": []}
    grad_norms: list[torch.Tensor] = []
    micro_per_step = cfg.gradient_accumulation_steps * n_train_t
    for _inner in range(cfg.num_inner_epochs):
        perm = rng.permutation(n_local)
        # Each sample trains on its own random subset of timesteps, in random order.
        t_order = np.stack([rng.permutation(s.t_train)[:n_train_t] for _ in range(n_local)])
        batches = [perm[i : i + cfg.train_batch_size] for i in range(0, n_local, cfg.train_batch_size)]
        micro = [(idx, t_order[idx, j]) for idx in batches for j in range(n_train_t)]
        for g0 in range(0, len(micro), micro_per_step):
            group = micro[g0 : g0 + micro_per_step]
            for c0 in range(0, len(group), cfg.fuse_micro_steps):
                chunk = group[c0 : c0 + cfg.fuse_micro_steps]
                sync = c0 + len(chunk) == len(group)  # DDP all-reduces on the group's last backward
                with contextlib.nullcontext() if sync else acc.no_sync(s.model):
                    results = _ppo_micro_steps(s, ro, chunk)
                    # Mean over the accumulation group: each micro-step is one (batch, timestep).
                    acc.backward(torch.stack([loss for loss, _ in results]).sum() / len(group))
                for loss, info in results:
                    stats["loss"].append(loss.detach())
                    for k in ("approx_kl", "clipfrac", "kl", "kl_base"):
                        if k in info:
                            stats[k].append(info[k].detach())
            grad_norms.append(torch.as_tensor(acc.clip_grad_norm_(s.params, cfg.max_grad_norm)).detach().float())
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
    gn = torch.stack(grad_norms).to(device) if grad_norms else torch.zeros(1, device=device)
    kl_base = torch.stack(stats["kl_base"]).mean() if stats["kl_base"] else torch.zeros((), device=device)
    out = torch.stack([torch.stack(stats[k]).mean() for k in ("loss", "approx_kl", "clipfrac", "kl")] + [gn.mean(), kl_base])
    return acc.reduce(out, reduction="mean").cpu().tolist()


def _base_comparison_due(cfg: DDPOConfig, epoch: int) -> bool:
    return cfg.log_base_reward and (epoch == 0 or (epoch + 1) % cfg.base_reward_every == 0 or epoch + 1 == cfg.epochs)


def _compare_with_base(s: _Setup, reward_fn: RewardFn, prompt_fn: PromptFn) -> dict[str, float]:
    """Policy vs frozen base on a fixed set of base_reward_samples prompts and noises (split over
    processes; exactly paired: the same x_T and per-step noise). The base's images and rewards
    are computed once per run; each call samples the policy on the set again."""
    from medrl.diffusion.stack import encode_prompts

    cfg, acc = s.cfg, s.accelerator
    n = -(-cfg.base_reward_samples // acc.num_processes)
    if s.base_eval is None:
        prompt_rng = np.random.default_rng(derive_seed(cfg.seed, s.rank, _P_BASE_PROMPTS))
        prompts = _check_prompts(prompt_fn(prompt_rng, n), n)
        noise = Noise.batch(derive_seed(cfg.seed, s.rank, _P_BASE_NOISE))
        with torch.no_grad(), _base_model(s.policy, s.anchor_unet) as base_unet:
            text = encode_prompts(s.c, prompts).float()
            images = _sample(s, base_unet, _as_is, text, noise).images
        # The base scored as if it were the policy (paired RLCF terms are then zero).
        r, terms = _check_rewards(reward_fn(images, prompts, anchor_images=images), n)
        s.base_eval = {"prompts": prompts, "text": text, "noise": noise, "images": images,
                       "rewards": acc.gather(r.to(s.device)).cpu().numpy(),
                       "terms": {k: acc.gather(v.to(s.device)).cpu().numpy() for k, v in terms.items()}}
    b = s.base_eval
    s.policy.eval()
    with torch.no_grad():
        text = encode_prompts(s.c, b["prompts"]).float() if s.policy.text_encoder is not None else b["text"]
        images = _sample(s, s.policy.unet, s.policy.condition, text, b["noise"]).images
    r, terms = _check_rewards(reward_fn(images, b["prompts"], anchor_images=b["images"]), n)
    gain = acc.gather(r.to(s.device)).cpu().numpy() - b["rewards"]
    out = {"base_reward_mean": float(b["rewards"].mean()), "reward_gain_vs_base": float(gain.mean()),
           "reward_gain_vs_base_se": float(gain.std(ddof=1) / math.sqrt(len(gain)))}
    # Per reward term too: which term a combined reward's gain (or loss) comes from.
    for k, v in terms.items():
        if k in b["terms"]:
            out[f"{k}_gain_vs_base"] = float((acc.gather(v.to(s.device)).cpu().numpy() - b["terms"][k]).mean())
    return out


def _epoch_metrics(epoch: int, ro: _Rollouts, stats: list[float], base: dict[str, float], dt: float,
                   cfg: DDPOConfig) -> dict[str, float]:
    metrics: dict[str, float] = {
        "epoch": float(epoch),
        "samples": float(len(ro.rewards_all)),
        "reward_mean": float(ro.rewards_all.mean()),
        "reward_std": float(ro.rewards_all.std()),
        **{f"{k}_mean": float(v.mean()) for k, v in ro.terms_all.items()},
        "loss": stats[0],
        "approx_kl": stats[1],
        "clipfrac": stats[2],
        "kl": stats[3],
        "grad_norm": stats[4],  # before clipping to max_grad_norm; mean over the epoch's optimizer steps
        "epoch_time_s": dt,
        "trajectories_per_s": float(len(ro.rewards_all)) / max(dt, 1e-9),
    }
    if cfg.kl_coef > 0:
        metrics["kl_to_base"] = stats[5]  # KL(pi_theta || pi_base) per step, mean over the epoch's updates
    metrics.update(base)
    return metrics


def _finish_epoch(s: _Setup, epoch: int, ro: _Rollouts, history: list, out_dir: Path, ckpt_dir: Path,
                  log_fn: LogFn | None, stopping: bool) -> None:
    """Log and write the epoch (rewards.csv, sample grid), then checkpoint when due."""
    cfg = s.cfg
    if s.accelerator.is_main_process:
        if log_fn is not None:
            log_fn(history[-1], epoch)
        write_table(pd.DataFrame(history), out_dir / "rewards.csv")
        if (epoch + 1) % (cfg.grid_every or cfg.checkpoint_every) == 0 or epoch + 1 == cfg.epochs:
            save_image(image_grid(list(ro.first_images), nrow=4), out_dir / "samples" / f"epoch_{epoch:04d}.png")
    if epoch + 1 != cfg.epochs and ((epoch + 1) % cfg.checkpoint_every == 0 or stopping):
        if s.accelerator.is_main_process:
            _save_checkpoint(ckpt_dir, s.policy, s.optimizer, s.tracker, epoch + 1, history, cfg, out_dir / "samples")
        s.accelerator.wait_for_everyone()


def _summary(history: list[dict[str, float]], cfg: DDPOConfig) -> dict[str, float]:
    finished = bool(history) and int(history[-1]["epoch"]) + 1 >= cfg.epochs
    summary: dict[str, float] = {"finished": float(finished), "epochs_done": float(len(history))}
    if history:
        rm = [h["reward_mean"] for h in history]
        k = max(1, min(3, len(rm) // 2))
        summary.update(
            reward_mean_first=rm[0],
            reward_mean_last=rm[-1],
            reward_mean_best=max(rm),
            # first-k vs last-k epochs: less noisy than single epochs
            reward_gain=float(np.mean(rm[-k:]) - np.mean(rm[:k])),
            approx_kl_last=history[-1]["approx_kl"],
            clipfrac_last=history[-1]["clipfrac"],
            train_time_s=float(sum(h["epoch_time_s"] for h in history)),
        )
        g = [h["reward_gain_vs_base"] for h in history if not math.isnan(h.get("reward_gain_vs_base", math.nan))]
        if g:  # the comparisons with the base: first and last (not epochs: they run every few)
            summary.update(gain_vs_base_first=g[0], gain_vs_base_last=g[-1])
    return summary


def train_ddpo(
    base_dir: Path,
    out_dir: Path,
    *,
    reward_fn: RewardFn,
    prompt_fn: PromptFn,
    cfg: DDPOConfig,
    ckpt_dir: Path,
    log_fn: LogFn | None = None,
    anchor: bool = False,
    max_epochs_this_call: int | None = None,
) -> dict[str, float]:
    """DDPO fine-tuning of the stack in ``base_dir``; adapter (+ACE) to ``out_dir/adapter``.

    ``reward_fn(images (B,3,H,W) [0,1], prompts, anchor_images=None) -> (rewards (B,), terms)``.
    Anchor images (the frozen base model, no ACE, the same initial noise) are sampled and passed
    when ``reward_fn.needs_anchor`` is true or ``anchor=True``. ``prompt_fn(rng, n) -> n prompts``.
    ``log_fn(metrics, epoch)`` is called on the main process. ``max_epochs_this_call`` stops after
    that many epochs (checkpointing first) so long runs can be split over jobs; the returned
    dict then has finished=0. Each epoch: _collect_rollouts -> _ppo_update -> _epoch_metrics.

    Logged per epoch: reward_mean/std, <term>_mean, loss, approx_kl, clipfrac, kl (sample
    estimate of KL(pi_old || pi_new) per denoising step over the trained (sample, timestep)
    pairs: how far the PPO updates moved the policy during the epoch), grad_norm (pre-clip),
    epoch_time_s and trajectories_per_s. With ``cfg.log_base_reward``, on the epochs of
    :func:`_base_comparison_due`: base_reward_mean, reward_gain_vs_base (+ its s.e.) and
    <term>_gain_vs_base, the policy before the epoch's update minus the frozen base on a fixed
    set of prompts and noises. With ``cfg.kl_coef > 0``: kl_to_base, the mean per-step
    KL(pi_theta || pi_base) over the epoch's updates; ``loss`` then includes the penalty.
    """
    from medrl.diffusion.stack import encode_prompts

    base_dir, out_dir, ckpt_dir = Path(base_dir), Path(out_dir), Path(ckpt_dir)
    s = _setup(base_dir, cfg, reward_fn, anchor)
    start_epoch, history = _resume(s, ckpt_dir, out_dir, log_fn)
    # "" stays the base's (see Policy): encoded with a resumed text LoRA switched off
    base_text = _base_model(s.policy, s.anchor_unet) if s.policy.text_encoder is not None else contextlib.nullcontext()
    with torch.no_grad(), base_text:
        s.neg1 = encode_prompts(s.c, [""]).float()
    s.sampler = Sampler(s.policy.unet, s.c.vae, s.c.scheduler, s.neg1, num_steps=cfg.num_steps,
                        guidance_scale=cfg.guidance_scale, eta=cfg.eta)
    epoch_iter = range(start_epoch, cfg.epochs)
    for epoch in progress(epoch_iter, desc="ddpo", total=len(epoch_iter), disable=not s.accelerator.is_main_process):
        if max_epochs_this_call is not None and epoch - start_epoch >= max_epochs_this_call:
            break
        t0 = time.time()
        rng = np.random.default_rng(derive_seed(cfg.seed, epoch, s.rank, _P_EPOCH))
        ro = _collect_rollouts(s, epoch, rng, reward_fn, prompt_fn)
        ro.seconds = time.time() - t0
        base = _compare_with_base(s, reward_fn, prompt_fn) if _base_comparison_due(cfg, epoch) else {}
        if base:
            base["base_comparison_s"] = time.time() - t0 - ro.seconds  # its share of epoch_time_s
        stats = _ppo_update(s, ro, rng)
        history.append(_epoch_metrics(epoch, ro, stats, base, time.time() - t0, cfg))
        stopping = max_epochs_this_call is not None and epoch + 1 - start_epoch >= max_epochs_this_call
        _finish_epoch(s, epoch, ro, history, out_dir, ckpt_dir, log_fn, stopping)

    summary = _summary(history, cfg)
    s.accelerator.wait_for_everyone()
    if summary["finished"] and s.accelerator.is_main_process:
        save_adapter(s.policy.unet, s.policy.ace, out_dir / "adapter", text_encoder=s.policy.text_encoder)
        write_table(pd.DataFrame(history), out_dir / "rewards.csv")
        plot_reward_curve(pd.DataFrame(history), out_dir / "reward_curve.png", title=f"DDPO, seed {cfg.seed}")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    s.accelerator.wait_for_everyone()
    return summary
