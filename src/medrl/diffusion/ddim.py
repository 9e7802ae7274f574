"""One DDIM step that also returns the log-density of the step it took.

DDPO treats every denoising step x_t -> x_{t-1} as an action of a Gaussian policy
    pi(x_{t-1} | x_t, c) = N(mu_theta(x_t, t, c), sigma_t^2 I)
where mu is the DDIM posterior mean (Song et al. 2021, eq. 12) and
sigma_t = eta * sqrt((1 - a_{t-1}) / (1 - a_t) * (1 - a_t / a_{t-1})) (eq. 16), a = alphas_cumprod.
The policy gradient needs log pi of the *recorded* x_{t-1}, both while sampling and later when
re-evaluating the same step under updated weights, so the step and the density live together.

The numbers match ``diffusers.DDIMScheduler.step`` (same prev-timestep rule, final_alpha_cumprod,
clip/threshold of x0), but everything is batched over timesteps and kept on the device: the
alphas are gathered by tensor indexing and the "t_prev < 0" case is a ``torch.where``, so a
sampling loop never waits on the GPU.
"""
from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _alphas_on(scheduler, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """alphas_cumprod and final_alpha_cumprod as float64 tensors on ``device`` (cached).

    Cached on the scheduler so a 50-step loop does one host->device copy, not 50. float64
    keeps 1 - a_t accurate near t=0 where a_t ~ 1; results are cast back to the sample dtype."""
    cache = scheduler.__dict__.setdefault("_medrl_alpha_cache", {})
    key = str(device)
    if key not in cache:
        acp = scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64).to(device)
        cache[key] = (acp, final)
    return cache[key]


def _threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen): per-sample percentile s of |x0|, clamp to [-s, s], divide by s.

    Same rule as the scheduler's config (thresholding=True); written out so it stays batched and
    does not depend on a private diffusers method."""
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def ddim_step_gaussian(
    scheduler, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian policy of one DDIM step: (mean, std) of x_{t-1} given x_t, in float32 or wider.

    ``std`` has shape (B, 1, ..., 1). Used by :func:`ddim_step_with_logprob` and by the KL
    penalty of the trainer (two policies' means at the same x_t share the same std)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_steps) must be called before a DDIM step")
    cfg = scheduler.config
    device = sample.device
    # Compute in at least float32: fp16 latents lose the small noise term otherwise.
    work = torch.promote_types(sample.dtype, torch.float32)
    x_t = sample.to(work)
    eps_or_x = model_output.to(work)
    bsz = x_t.shape[0]
    bshape = (bsz,) + (1,) * (x_t.ndim - 1)

    t = torch.as_tensor(timestep, device=device).long()
    if t.ndim == 0:
        t = t.expand(bsz)
    t_prev = t - cfg.num_train_timesteps // scheduler.num_inference_steps

    acp, final = _alphas_on(scheduler, device)
    a_t = acp[t]
    # clamp only to make the gather legal; torch.where picks final_alpha_cumprod for t_prev < 0.
    a_prev = torch.where(t_prev >= 0, acp[t_prev.clamp(min=0)], final)
    b_t = 1.0 - a_t
    b_prev = 1.0 - a_prev
    a_t_, a_prev_, b_t_ = (v.to(work).view(bshape) for v in (a_t, a_prev, b_t))

    # x0 and eps predictions from the network output (three parameterisations).
    if cfg.prediction_type == "epsilon":
        x0 = (x_t - b_t_.sqrt() * eps_or_x) / a_t_.sqrt()
        eps = eps_or_x
    elif cfg.prediction_type == "sample":
        x0 = eps_or_x
        eps = (x_t - a_t_.sqrt() * x0) / b_t_.sqrt()
    elif cfg.prediction_type == "v_prediction":
        x0 = a_t_.sqrt() * x_t - b_t_.sqrt() * eps_or_x
        eps = a_t_.sqrt() * eps_or_x + b_t_.sqrt() * x_t
    else:
        raise ValueError(f"scheduler.config.prediction_type={cfg.prediction_type!r}; expected epsilon, sample or v_prediction")

    if cfg.thresholding:
        x0 = _threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    # As in diffusers (use_clipped_model_output=False), eps is NOT re-derived from the clipped x0.

    # sigma_t^2 of DDIM eq. 16 (computed in float64, then cast).
    variance = (b_prev / b_t) * (1.0 - a_t / a_prev)
    std = (eta * variance.sqrt()).to(work).view(bshape)

    # Posterior mean: sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps ("direction to x_t").
    # clamp guards the sqrt against tiny negative rounding when eta > 1 is (mis)used.
    direction = (1.0 - a_prev_ - std**2).clamp(min=0.0).sqrt() * eps
    return a_prev_.sqrt() * x0 + direction, std


def gaussian_logprob(prev: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(prev; mean, std^2) per sample, averaged (not summed) over the non-batch dims, shape
    (B,); no gradient flows through ``prev`` (the recorded action). std > 0 for every DDIM step
    with eta > 0 (a_prev > a_t strictly), so no epsilon is needed."""
    logp = -((prev.detach() - mean) ** 2) / (2.0 * std**2) - std.log() - _LOG_SQRT_2PI
    return logp.mean(dim=tuple(range(1, logp.ndim)))


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) per sample, averaged (not summed) over the
    non-batch dims like the log-probs: ||mean_p - mean_q||^2 / (2 std^2) / D, shape (B,)."""
    kl = (mean_p - mean_q) ** 2 / (2.0 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM step x_t -> x_{t-1}; returns (prev_sample, log_prob) with log_prob of shape (B,).

    ``timestep`` is a scalar (int or 0-d tensor) or a (B,) tensor (one timestep per sample, as
    in DDPO training where timesteps are shuffled per sample). ``scheduler.set_timesteps`` must
    have been called: the step size is num_train_timesteps // num_inference_steps, as in diffusers.
    If ``prev_sample`` is None, x_{t-1} = mean + std * noise with noise from ``generator`` (one
    generator, or a list with one per batch element so each sample's noise stream does not
    depend on the batch it is in). log_prob is the Gaussian log-density of prev_sample averaged
    (not summed) over all non-batch dims, the DDPO convention that keeps its scale independent
    of the latent size. With eta == 0 the step is deterministic and has no density: log_prob is
    returned as zeros.
    """
    mean, std = ddim_step_gaussian(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        if eta > 0:
            noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            prev = mean + std * noise
        else:
            prev = mean
    else:
        prev = prev_sample.to(mean.dtype)

    if eta > 0:
        log_prob = gaussian_logprob(prev, mean, std)
    else:
        log_prob = torch.zeros(mean.shape[0], device=mean.device, dtype=mean.dtype)
    return prev.to(sample.dtype), log_prob
