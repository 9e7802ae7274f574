"""DDPO (Black et al. 2023) with LoRA (+ optional ACE), shared by the ISIC and CXR tracks.

Per epoch: sample trajectories with log-probs -> rewards (optionally against the frozen anchor
model, CXRL's RLCF) -> per-prompt advantages -> PPO updates on random timesteps of the recorded
trajectories. Runs in one process or several (``accelerate launch``), checkpoints every
``checkpoint_every`` epochs and resumes to the same numbers as an uninterrupted run.

Randomness: every random draw of an epoch comes from generators seeded by
(seed, epoch, process index[, batch]) -- prompts, shuffles, initial and per-step noise. A
resumed run therefore needs only weights, optimizer and stat-tracker state to continue
exactly; the global torch RNG is saved too, for library code that draws from it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
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
from safetensors.torch import load_file, save_file
from torch import nn

from medrl.errors import DataError
from medrl.io import atomic_dir, image_grid, save_image, write_table
from medrl.progress import progress
from medrl.rl.ace import ACE
from medrl.rl.ddim import ddim_step_gaussian, gaussian_kl, gaussian_logprob
from medrl.rl.lora import DEFAULT_TARGETS, add_lora, save_adapter
from medrl.rl.ppo import PerPromptStatTracker, ppo_loss
from medrl.rl.sampling import guided_eps, initial_latents, sample_with_logprob

RewardFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
PromptFn = Callable[[np.random.Generator, int], list[str]]
LogFn = Callable[[dict[str, float], int], None]

# Config fields that must not change between a checkpoint and the run resuming it.
_RESUME_KEYS = (
    "sample_batch_size", "sample_batches_per_epoch", "train_batch_size", "gradient_accumulation_steps",
    "num_steps", "eta", "guidance_scale", "lr", "clip_range", "adv_clip_max", "timestep_fraction",
    "num_inner_epochs", "per_prompt_buffer", "per_prompt_min_count", "lora_rank", "lora_alpha", "lora_target_modules",
    "full_finetune", "seed", "use_ace", "ace_tokens", "mixed_precision", "prompt_repeats", "anchor_noise", "kl_coef",
    "skip_last_steps",
)


@dataclass
class DDPOConfig:
    """params.yaml rl.common + rl.<track> (+ the variant's ``use_ace``). Per-process sizes:
    each process samples sample_batch_size x sample_batches_per_epoch trajectories per epoch."""

    epochs: int = 30
    sample_batch_size: int = 32
    sample_batches_per_epoch: int = 2
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 4
    num_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 5.0
    lr: float = 3e-4
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    timestep_fraction: float = 1.0
    # The last N denoising steps are sampled but not trained on. Their sigma_t is tiny (10 DDIM
    # steps: 0.04 and 0.02 against 0.26-0.78 before), so grad log pi ~ 1/sigma_t is large there
    # while the step barely changes the image: mostly gradient noise (docs/RESULTS.md, exp. K).
    skip_last_steps: int = 0
    num_inner_epochs: int = 1
    per_prompt_buffer: int = 16
    per_prompt_min_count: int = 16
    lora_rank: int = 4
    full_finetune: bool = False
    checkpoint_every: int = 5
    # Each drawn prompt is sampled this many times per sample batch, so the per-prompt
    # advantage has within-prompt statistics from the first epoch (1 = i.i.d. prompts, DDPO).
    prompt_repeats: int = 1
    # Also score the frozen base model on the same prompts and noise each epoch, and log the
    # paired gain (reward_gain_vs_base): costs one extra sampling pass, removes prompt/noise luck.
    log_base_reward: bool = False
    # Noise the anchor images handed to a reward (RLCF paired mode) share with the policy sample:
    # "initial" = x_T only (its per-step noise is independent, so the subtracted anchor score
    # does not depend on the actions and the policy gradient stays unbiased); "shared" = x_T and
    # every step's noise (lower variance, biased: docs/RESULTS.md, experiment B').
    anchor_noise: str = "initial"
    # KL penalty towards the frozen base (DPOK, Fan et al. 2023): loss += kl_coef * KL(pi_theta
    # || pi_base) per denoising step at the recorded x_t, i.e. ||mu_theta - mu_base||^2 /
    # (2 sigma_t^2) averaged over latent dims. 0 = DDPO (no penalty, no extra forward pass).
    # The base has no ACE tokens, so with ACE the penalty also holds the tokens' effect back.
    kl_coef: float = 0.0
    seed: int = 0
    use_ace: bool = False
    ace_tokens: int = 3
    mixed_precision: str = "no"
    # Not in params.yaml: DDPO's defaults.
    lora_alpha: int | None = None  # None: = lora_rank (scale 1)
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGETS  # attention projections, as in DDPO
    max_grad_norm: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    grid_every: int = 0  # sample grid every N epochs; 0 = every checkpoint_every epochs

    @classmethod
    def from_params(cls, common: dict[str, Any], track: dict[str, Any], **overrides: Any) -> DDPOConfig:
        """Build from params.rl.common and params.rl.<track>; keys that are not fields (e.g. the
        CXR reward's rlcf_mode, bank_k, variants) are left to the caller."""
        names = {f.name for f in dataclasses.fields(cls)}
        # a track's null (e.g. rl.cxr.lr: null) means "use rl.common's value"
        kw = {k: v for src in (common, track) for k, v in src.items() if k in names and v is not None}
        kw.update(overrides)
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"DDPOConfig has no fields {unknown}")
        return cls(**kw)

    def validate(self) -> None:
        if self.num_steps < 1 or self.sample_batch_size < 1 or self.train_batch_size < 1:
            raise ValueError(f"rl: num_steps, sample_batch_size, train_batch_size must be >= 1 ({self})")
        if not 0 <= self.skip_last_steps < self.num_steps:
            raise ValueError(f"rl.common.skip_last_steps={self.skip_last_steps}; expected 0 <= N < num_steps={self.num_steps}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"rl.common.timestep_fraction={self.timestep_fraction}; expected in (0, 1]")
        if self.eta <= 0:
            raise ValueError(f"rl.common.eta={self.eta}; DDPO needs a stochastic sampler (eta > 0)")
        if self.prompt_repeats < 1 or self.sample_batch_size % self.prompt_repeats:
            raise ValueError(f"rl.common.prompt_repeats={self.prompt_repeats}; expected >= 1 and a divisor of "
                             f"sample_batch_size={self.sample_batch_size}")
        if not (self.kl_coef >= 0 and math.isfinite(self.kl_coef)):
            raise ValueError(f"rl.common.kl_coef={self.kl_coef}; expected a finite number >= 0")
        if self.anchor_noise not in ("initial", "shared"):
            raise ValueError(f"rl.cxr.rlcf_paired_noise={self.anchor_noise!r}; expected 'initial' or 'shared'")


class Policy(nn.Module):
    """UNet (+ LoRA) and optional ACE as one module, so DDP syncs both and one forward does CFG."""

    def __init__(self, unet: nn.Module, ace: ACE | None) -> None:
        super().__init__()
        self.unet = unet
        self.ace = ace

    def condition(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.ace(text_embeds) if self.ace is not None else text_embeds

    def forward(self, latents, t, text_embeds, negative_embeds, guidance_scale: float) -> torch.Tensor:
        return guided_eps(self.unet, latents, t, self.condition(text_embeds), negative_embeds, guidance_scale)


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy SeedSequence: well spread, platform independent)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _torch_gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def _base_model(policy: Policy, anchor_unet: nn.Module | None):
    """The frozen anchor (base) UNet: LoRA disabled, or a frozen copy for full fine-tuning."""
    if anchor_unet is not None:
        yield anchor_unet
        return
    unet = policy.unet
    trainable = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
        # peft's enable/disable touch requires_grad; restore exactly what we had.
        for n, p in unet.named_parameters():
            p.requires_grad_(trainable[n])


# ----------------------------------------------------------------------------- checkpoints

CKPT = "latest"


def _trainable_state(policy: Policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in policy.named_parameters() if p.requires_grad}


def _save_checkpoint(ckpt_dir: Path, policy: Policy, optimizer, tracker, epoch: int, history: list, cfg: DDPOConfig) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with atomic_dir(ckpt_dir / CKPT) as tmp:
        save_file(_trainable_state(policy), str(tmp / "policy.safetensors"))
        # Optimizer state: tensors + plain Python numbers, loadable with weights_only=True.
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {
            "next_epoch": epoch,
            "tracker": tracker.state_dict(),
            "history": history,
            "config": {k: getattr(cfg, k) for k in _RESUME_KEYS},
        }
        (tmp / "state.json").write_text(json.dumps(state))


def _load_checkpoint(ckpt_dir: Path, policy: Policy, optimizer, tracker, cfg: DDPOConfig) -> tuple[int, list]:
    d = ckpt_dir / CKPT
    try:
        state = json.loads((d / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{d}/state.json: unreadable checkpoint state ({e}); delete {ckpt_dir} to restart") from None
    want = {k: getattr(cfg, k) for k in _RESUME_KEYS}
    saved = state.get("config", {})
    # JSON turns tuples into lists; compare after the same round trip. A key an older checkpoint
    # lacks (a field added since) counts as that field's default, which is what that run used.
    defaults = {f.name: f.default for f in dataclasses.fields(DDPOConfig)}
    diff = sorted(k for k in _RESUME_KEYS
                  if json.loads(json.dumps(want[k])) != saved.get(k, json.loads(json.dumps(defaults[k]))))
    if diff:
        raise DataError(
            f"{d}: checkpoint was written with different rl params {[(k, saved.get(k), want[k]) for k in diff]}; "
            f"expected the same values to resume (delete {ckpt_dir} to start over)"
        )
    params = dict(policy.named_parameters())
    sd = load_file(str(d / "policy.safetensors"))
    missing = [n for n, p in params.items() if p.requires_grad and n not in sd]
    if missing or any(n not in params for n in sd):
        raise DataError(f"{d}/policy.safetensors: parameter names do not match the policy (missing {missing[:3]})")
    with torch.no_grad():
        for n, v in sd.items():
            params[n].copy_(v.to(params[n].device, params[n].dtype))
    optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location="cpu", weights_only=True))
    rng = load_file(str(d / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    tracker.load_state_dict(state["tracker"])
    return int(state["next_epoch"]), list(state["history"])


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
    Anchor images (the frozen base model, no ACE, the same initial and per-step noise) are
    sampled and passed when ``reward_fn.needs_anchor`` is true or ``anchor=True``.
    ``prompt_fn(rng, n) -> n prompts``. ``log_fn(metrics, epoch)`` is called on the main process.
    ``max_epochs_this_call`` stops after that many epochs (checkpointing first) so long runs can
    be split over jobs; the returned dict then has finished=0.

    Logged per epoch: reward_mean/std, <term>_mean, loss, approx_kl, clipfrac, kl (sample
    estimate of KL(pi_old || pi_new) per denoising step, E_old[log pi_old - log pi_new] over the
    trained (sample, timestep) pairs, i.e. how far the PPO updates moved the policy during the
    epoch), grad_norm (pre-clip), epoch_time_s, and trajectories_per_s; with ``cfg.log_base_reward`` also
    base_reward_mean and reward_gain_vs_base (+ its s.e.): policy minus frozen base model on the
    same prompts and noise, the epoch's paired measure of what training has gained so far, and
    <term>_gain_vs_base for every reward term. With ``cfg.kl_coef > 0``: kl_to_base, the mean
    per-step KL(pi_theta || pi_base) over the epoch's updates; ``loss`` then includes the penalty.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from medrl.models.tiny_sd import encode_prompts, load_components

    cfg.validate()
    base_dir, out_dir, ckpt_dir = Path(base_dir), Path(out_dir), Path(ckpt_dir)
    # Accumulation is done explicitly below (reset every inner epoch, trailing partial group
    # stepped), so accelerate's own counter stays at 1; it would otherwise rescale the loss.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1)
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process

    c = load_components(str(base_dir), device=str(device))
    unet, vae, scheduler = c.unet, c.vae, c.scheduler
    anchor_unet = None
    reward_uses_anchor = bool(anchor or getattr(reward_fn, "needs_anchor", False))
    need_anchor = reward_uses_anchor or cfg.log_base_reward
    if cfg.full_finetune:
        if need_anchor or cfg.kl_coef > 0:
            anchor_unet = copy.deepcopy(unet).requires_grad_(False)
        unet.requires_grad_(True)
    else:
        add_lora(unet, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_target_modules), seed=cfg.seed)
    ace = None
    if cfg.use_ace:
        ace = ACE(cfg.ace_tokens, c.text_encoder.config.hidden_size, seed=cfg.seed).to(device)
    policy = Policy(unet, ace)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_eps
    )
    tracker = PerPromptStatTracker(cfg.per_prompt_buffer, cfg.per_prompt_min_count)

    start_epoch, history = 0, []
    if (ckpt_dir / CKPT / "state.json").is_file():
        start_epoch, history = _load_checkpoint(ckpt_dir, policy, optimizer, tracker, cfg)
    model, optimizer = accelerator.prepare(policy, optimizer)
    policy = accelerator.unwrap_model(model)

    with torch.no_grad():
        neg1 = encode_prompts(c, [""]).float()

    T = cfg.num_steps
    T_train = T - cfg.skip_last_steps  # trained steps: 0 .. T_train-1 (the first, noisiest ones)
    n_train_t = max(1, math.floor(T_train * cfg.timestep_fraction))
    n_local = cfg.sample_batch_size * cfg.sample_batches_per_epoch
    samples_dir = out_dir / "samples"
    grid_every = cfg.grid_every or cfg.checkpoint_every

    epoch_iter = range(start_epoch, cfg.epochs)
    for epoch in progress(epoch_iter, desc="ddpo", total=len(epoch_iter), disable=not is_main):
        epochs_run = epoch - start_epoch  # completed in this call
        if max_epochs_this_call is not None and epochs_run >= max_epochs_this_call:
            break
        t0 = time.time()
        rng = np.random.default_rng(_seed(cfg.seed, epoch, rank, 0))

        # ---------------------------------------------------------------- sampling
        policy.eval()
        lat, logps, tsteps, embeds, prompts_local, rewards_l, terms_l = [], [], [], [], [], [], {}
        base_rewards_l, base_terms_l = [], {}
        first_images = None
        for b in range(cfg.sample_batches_per_epoch):
            n_groups = cfg.sample_batch_size // cfg.prompt_repeats
            prompts = _check_prompts(prompt_fn(rng, n_groups), n_groups)
            prompts = [p for p in prompts for _ in range(cfg.prompt_repeats)]
            noise_seed = _seed(cfg.seed, epoch, rank, 1, b)
            with torch.no_grad():
                text = encode_prompts(c, prompts).float()
                neg = neg1.expand(len(prompts), -1, -1)
                x_T = initial_latents(unet, len(prompts), _torch_gen(device, noise_seed), device)
                with accelerator.autocast():
                    traj = sample_with_logprob(
                        policy.unet, vae, scheduler, policy.condition(text), neg,
                        num_steps=T, guidance_scale=cfg.guidance_scale, eta=cfg.eta,
                        generator=_torch_gen(device, noise_seed + 1), latents=x_T,
                    )
                    anchor_images = None
                    if need_anchor:
                        # Always the same x_T. The per-step noise is the sample's own when the
                        # anchor only serves as a measurement (log_base_reward: an exact paired
                        # gain), and independent when a reward subtracts the anchor's score
                        # (RLCF paired mode), unless anchor_noise="shared": a baseline that
                        # depends on the sample's step noise biases the policy gradient.
                        step_seed = noise_seed + 1
                        if reward_uses_anchor and cfg.anchor_noise == "initial":
                            step_seed = _seed(cfg.seed, epoch, rank, 2, b)
                        with _base_model(policy, anchor_unet) as base_unet:
                            anchor_images = sample_with_logprob(
                                base_unet, vae, scheduler, text, neg,
                                num_steps=T, guidance_scale=cfg.guidance_scale, eta=cfg.eta,
                                generator=_torch_gen(device, step_seed), latents=x_T,
                            ).images
            r, terms = _check_rewards(reward_fn(traj.images, prompts, anchor_images=anchor_images), len(prompts))
            if cfg.log_base_reward:
                # The base model scored as if it were the policy (paired RLCF terms are then zero).
                rb, tb = _check_rewards(reward_fn(anchor_images, prompts, anchor_images=anchor_images), len(prompts))
                base_rewards_l.append(rb)
                for k, v in tb.items():
                    base_terms_l.setdefault(k, []).append(v)
            lat.append(traj.latents)
            logps.append(traj.log_probs.float())
            tsteps.append(traj.timesteps)
            embeds.append(text)
            prompts_local += prompts
            rewards_l.append(r)
            for k, v in terms.items():
                terms_l.setdefault(k, []).append(v)
            if first_images is None:
                first_images = traj.images[:16].detach().cpu()

        latents = torch.cat(lat)  # (N, T+1, C, h, w)
        old_logp = torch.cat(logps)  # (N, T)
        timesteps = torch.cat(tsteps)  # (N, T)
        text_embeds = torch.cat(embeds)
        neg_all = neg1.expand(n_local, -1, -1)
        rewards_local = torch.cat(rewards_l).to(device)

        # Every process sees every reward, so the per-prompt statistics (and the tracker state,
        # which must be identical on all ranks) do not depend on how samples were split.
        rewards_all = accelerator.gather(rewards_local).cpu().numpy()
        prompts_all = gather_object(prompts_local) if world > 1 else prompts_local
        adv_all = tracker.update(prompts_all, rewards_all)
        adv = torch.as_tensor(adv_all.reshape(world, -1)[rank], dtype=torch.float32, device=device)
        terms_all = {k: accelerator.gather(torch.cat(v).to(device)).cpu().numpy() for k, v in terms_l.items()}
        base_all = accelerator.gather(torch.cat(base_rewards_l).to(device)).cpu().numpy() if base_rewards_l else None
        base_terms = {k: accelerator.gather(torch.cat(v).to(device)).cpu().numpy() for k, v in base_terms_l.items()}

        # ---------------------------------------------------------------- PPO updates
        policy.train()
        acc = {"loss": [], "approx_kl": [], "clipfrac": [], "kl": [], "kl_base": []}
        grad_norms: list[torch.Tensor] = []
        micro_per_step = cfg.gradient_accumulation_steps * n_train_t
        for inner in range(cfg.num_inner_epochs):
            perm = rng.permutation(n_local)
            # Each sample trains on its own random subset of timesteps, in random order.
            t_order = np.stack([rng.permutation(T_train)[:n_train_t] for _ in range(n_local)])
            batches = [perm[i : i + cfg.train_batch_size] for i in range(0, n_local, cfg.train_batch_size)]
            n_micro = len(batches) * n_train_t
            micro = 0
            for idx in batches:
                idx_t = torch.as_tensor(idx, device=device)
                for j in range(n_train_t):
                    step_idx = torch.as_tensor(t_order[idx, j], device=device)
                    x_t = latents[idx_t, step_idx]
                    x_prev = latents[idx_t, step_idx + 1]
                    t = timesteps[idx_t, step_idx]
                    group_start = (micro // micro_per_step) * micro_per_step
                    group_size = min(micro_per_step, n_micro - group_start)
                    sync = micro - group_start + 1 == group_size
                    ctx = contextlib.nullcontext() if sync else accelerator.no_sync(model)
                    if cfg.kl_coef > 0:
                        # The base's step at the same x_t (no grad; the LoRA is switched off for it).
                        with torch.no_grad(), accelerator.autocast(), _base_model(policy, anchor_unet) as base_unet:
                            eps_base = guided_eps(base_unet, x_t, t, text_embeds[idx_t], neg_all[idx_t], cfg.guidance_scale)
                    with ctx:
                        with accelerator.autocast():
                            eps = model(x_t, t, text_embeds[idx_t], neg_all[idx_t], cfg.guidance_scale)
                        # the same Gaussian step as sampling (ddim_step_with_logprob), evaluated once
                        mean, std = ddim_step_gaussian(scheduler, eps.float(), t, x_t, eta=cfg.eta)
                        logp = gaussian_logprob(x_prev, mean, std)
                        loss, info = ppo_loss(logp, old_logp[idx_t, step_idx], adv[idx_t], cfg.clip_range, cfg.adv_clip_max)
                        if cfg.kl_coef > 0:
                            mean_base, _ = ddim_step_gaussian(scheduler, eps_base.float(), t, x_t, eta=cfg.eta)
                            kl_base = gaussian_kl(mean, mean_base, std).mean()
                            loss = loss + cfg.kl_coef * kl_base
                            acc["kl_base"].append(kl_base.detach())
                        # Mean over the accumulation group: each micro-step is one (batch, timestep).
                        accelerator.backward(loss / group_size)
                    if sync:
                        grad_norms.append(torch.as_tensor(accelerator.clip_grad_norm_(params, cfg.max_grad_norm)).detach().float())
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    acc["loss"].append(loss.detach())
                    for k in ("approx_kl", "clipfrac", "kl"):
                        acc[k].append(info[k])
                    micro += 1

        gn = torch.stack(grad_norms).to(device) if grad_norms else torch.zeros(1, device=device)
        kl_base_mean = torch.stack(acc["kl_base"]).mean() if acc["kl_base"] else torch.zeros((), device=device)
        stats = torch.stack([torch.stack(acc[k]).mean() for k in ("loss", "approx_kl", "clipfrac", "kl")] + [gn.mean(), kl_base_mean])
        stats = accelerator.reduce(stats, reduction="mean").cpu().tolist()
        dt = time.time() - t0
        metrics: dict[str, float] = {
            "epoch": float(epoch),
            "samples": float(len(rewards_all)),
            "reward_mean": float(rewards_all.mean()),
            "reward_std": float(rewards_all.std()),
            **{f"{k}_mean": float(v.mean()) for k, v in terms_all.items()},
            "loss": stats[0],
            "approx_kl": stats[1],
            "clipfrac": stats[2],
            "kl": stats[3],
            "grad_norm": stats[4],  # before clipping to max_grad_norm; mean over the epoch's optimizer steps
            "epoch_time_s": dt,
            "trajectories_per_s": float(len(rewards_all)) / max(dt, 1e-9),
        }
        if cfg.kl_coef > 0:
            metrics["kl_to_base"] = stats[5]  # KL(pi_theta || pi_base) per step, mean over the epoch's updates
        if base_all is not None:
            gain = rewards_all - base_all
            metrics.update(base_reward_mean=float(base_all.mean()), reward_gain_vs_base=float(gain.mean()),
                           reward_gain_vs_base_se=float(gain.std(ddof=1) / math.sqrt(len(gain))) if len(gain) > 1 else 0.0)
            # Per reward term too: which term a combined reward's gain (or loss) comes from.
            metrics.update({f"{k}_gain_vs_base": float((terms_all[k] - base_terms[k]).mean())
                            for k in terms_all if k in base_terms})
        history.append(metrics)
        epochs_run += 1
        if is_main:
            if log_fn is not None:
                log_fn(metrics, epoch)
            write_table(pd.DataFrame(history), out_dir / "rewards.csv")
            if (epoch + 1) % grid_every == 0 or epoch + 1 == cfg.epochs:
                save_image(image_grid(list(first_images), nrow=4), samples_dir / f"epoch_{epoch:04d}.png")

        last = epoch + 1 == cfg.epochs
        stopping = max_epochs_this_call is not None and epochs_run >= max_epochs_this_call
        if not last and ((epoch + 1) % cfg.checkpoint_every == 0 or stopping):
            if is_main:
                _save_checkpoint(ckpt_dir, policy, optimizer, tracker, epoch + 1, history, cfg)
            accelerator.wait_for_everyone()

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
        if "reward_gain_vs_base" in history[-1]:
            g = [h["reward_gain_vs_base"] for h in history]
            summary.update(gain_vs_base_first=float(np.mean(g[:k])), gain_vs_base_last=float(np.mean(g[-k:])))
    accelerator.wait_for_everyone()
    if finished and is_main:
        save_adapter(policy.unet, policy.ace, out_dir / "adapter")
        write_table(pd.DataFrame(history), out_dir / "rewards.csv")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return summary
