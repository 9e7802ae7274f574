"""DDIM sampling with classifier-free guidance that records what DDPO needs to train on.

A trajectory keeps every latent x_T..x_0, the per-step log-probs under the sampling policy and
the timesteps, so the PPO update can re-evaluate each recorded step under new weights without
re-sampling.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from medrl.diffusion.ddim import ddim_step_with_logprob


@dataclass
class Trajectory:
    latents: torch.Tensor  # (B, T+1, C, h, w): x_T (initial noise) ... x_0
    log_probs: torch.Tensor  # (B, T): log pi(x_{t-1} | x_t) at sampling time
    timesteps: torch.Tensor  # (B, T): the scheduler timestep of each step
    prompt_embeds: torch.Tensor  # (B, Lc, D) conditional embeddings as fed to the UNet
    negative_embeds: torch.Tensor  # (B, Lu, D) unconditional embeddings as fed to the UNet
    images: torch.Tensor  # (B, 3, H, W) decoded x_0 in [0, 1]


def pad_uncond(
    cond: torch.Tensor, uncond: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Make uncond as long as cond for one batched CFG forward; return (uncond, attention mask).

    ACE prepends N learned tokens to the *conditional* embeddings only (the unconditional branch
    of CFG stands for "no report", which ACE has no business changing). To keep one batched UNet
    call, the unconditional embeddings are left-padded with N zero tokens and those tokens are
    masked out of cross-attention with ``encoder_attention_mask``, so the unconditional
    prediction is exactly the unpadded one. Returns mask None when no padding was needed.
    """
    lc, lu = cond.shape[1], uncond.shape[1]
    if lu == lc:
        return uncond, None
    if lu > lc:
        raise ValueError(f"unconditional embeddings ({lu} tokens) longer than conditional ({lc}); expected <=")
    n = lc - lu
    pad = uncond.new_zeros(uncond.shape[0], n, uncond.shape[2])
    mask_u = torch.cat([uncond.new_zeros(uncond.shape[0], n), uncond.new_ones(uncond.shape[0], lu)], dim=1)
    mask_c = cond.new_ones(cond.shape[0], lc)
    return torch.cat([pad, uncond], dim=1), torch.cat([mask_u, mask_c], dim=0)


def guided_eps(
    unet,
    latents: torch.Tensor,
    t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """UNet output with classifier-free guidance: one batched (uncond, cond) forward pass.

    ``t`` is a scalar or (B,) tensor. Used identically by sampling and by the PPO update, which is
    what makes the re-evaluated log-prob of an unchanged model equal the recorded one."""
    dtype = next(unet.parameters()).dtype
    if guidance_scale <= 1.0:
        return unet(latents.to(dtype), t, encoder_hidden_states=prompt_embeds.to(dtype)).sample.to(latents.dtype)
    uncond, mask = pad_uncond(prompt_embeds, negative_embeds)
    x_in = torch.cat([latents, latents], dim=0).to(dtype)
    t_in = t if t.ndim == 0 else torch.cat([t, t], dim=0)
    ctx = torch.cat([uncond, prompt_embeds], dim=0).to(dtype)
    kw = {} if mask is None else {"encoder_attention_mask": mask.to(dtype)}
    out = unet(x_in, t_in, encoder_hidden_states=ctx, **kw).sample.to(latents.dtype)
    out_u, out_c = out.chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


@contextlib.contextmanager
def merged_lora(unet) -> Iterator[None]:
    """Fold the active LoRA adapters of ``unet`` into their base weights while no gradient is
    taken (sampling): one matmul per adapted projection instead of three, ~10 % of a tiny UNet's
    forward. The base weights are swapped back afterwards, so they are restored bit for bit
    (un-merging by subtraction would drift). Outputs match the unmerged forward to float
    rounding (~1e-5). A no-op without LoRA, with adapters disabled, or with grad enabled."""
    try:
        from peft.tuners.lora import Conv2d as LoraConv2d, Linear as LoraLinear
    except ImportError:  # no peft: nothing to merge
        yield
        return
    saved: list[tuple[torch.nn.Module, torch.Tensor]] = []
    try:
        if not torch.is_grad_enabled():
            for m in unet.modules():
                if not isinstance(m, (LoraLinear, LoraConv2d)) or m.disable_adapters or m.merged:
                    continue
                names = [a for a in m.active_adapters if a in m.lora_A]
                if not names or any(a in m.lora_variant for a in names):  # DoRA etc.: not W + BA
                    continue
                w = m.base_layer.weight
                merged = w.data + sum(m.get_delta_weight(a) for a in names).to(w.dtype)
                saved.append((m, w.data))
                w.data = merged
                m.merged_adapters = names  # peft's forward then runs base_layer only
        yield
    finally:
        for m, data in saved:
            m.base_layer.weight.data = data
            m.merged_adapters = []


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents (already scaled by scaling_factor) to images in [0, 1]."""
    dtype = next(vae.parameters()).dtype
    x = vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


def initial_latents(
    unet, batch_size: int, generator=None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """x_T ~ N(0, I) with the UNet's latent shape (float32; init_noise_sigma is 1 for DDIM)."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (batch_size, unet.config.in_channels, h, w)
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)


@torch.no_grad()
def sample_with_logprob(
    unet,
    vae,
    scheduler,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
) -> Trajectory:
    """Sample B images with DDIM + CFG, recording latents, log-probs and timesteps.

    ``prompt_embeds`` (B, Lc, D) may be longer than ``negative_embeds`` (B, Lu, D) when ACE
    tokens were prepended (see :func:`pad_uncond`). ``generator`` draws both the initial noise
    (unless ``latents`` is given) and the per-step noise; a list of per-sample generators makes
    each sample independent of the batch it is drawn in. Latents stay float32 whatever the UNet
    dtype, so recorded trajectories are re-evaluated at the same precision.
    """
    device = prompt_embeds.device
    bsz = prompt_embeds.shape[0]
    if negative_embeds.shape[0] != bsz:
        raise ValueError(f"negative_embeds batch {negative_embeds.shape[0]} != prompt_embeds batch {bsz}")
    scheduler.set_timesteps(num_steps, device=device)
    timesteps = scheduler.timesteps
    if latents is None:
        latents = initial_latents(unet, bsz, generator, device)
    latents = latents.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma

    all_latents = [latents]
    all_logp = []
    for t in timesteps:
        eps = guided_eps(unet, latents, t, prompt_embeds, negative_embeds, guidance_scale)
        latents, logp = ddim_step_with_logprob(scheduler, eps, t, latents, eta=eta, generator=generator)
        all_latents.append(latents)
        all_logp.append(logp)

    images = decode_latents(vae, latents)
    return Trajectory(
        latents=torch.stack(all_latents, dim=1),
        log_probs=torch.stack(all_logp, dim=1),
        timesteps=timesteps.to(device).unsqueeze(0).expand(bsz, -1).clone(),
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
        images=images,
    )
