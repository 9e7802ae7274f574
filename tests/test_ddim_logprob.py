"""DDIM step + log-prob (medrl.diffusion.ddim) and trajectory sampling (medrl.diffusion.rollout)."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from medrl.diffusion.ddim import ddim_step_gaussian, ddim_step_with_logprob, gaussian_kl
from medrl.diffusion.rollout import guided_eps, pad_uncond, sample_with_logprob

torch.set_num_threads(1)

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1}


def _sched(steps: int = 10, **kw) -> DDIMScheduler:
    s = DDIMScheduler(**{**SD15, **kw})
    s.set_timesteps(steps)
    return s


def _reference(s: DDIMScheduler, out, t: torch.Tensor, x, eta):
    """Mean/std of the DDIM step from the paper's equations, per sample, in float64."""
    acp = s.alphas_cumprod.double()
    ratio = s.config.num_train_timesteps // s.num_inference_steps
    means, stds = [], []
    for i, ti in enumerate(t.tolist()):
        a = acp[ti]
        ap = acp[ti - ratio] if ti - ratio >= 0 else acp[0]  # set_alpha_to_one=False
        o, xi = out[i].double(), x[i].double()
        if s.config.prediction_type == "epsilon":
            x0, eps = (xi - (1 - a).sqrt() * o) / a.sqrt(), o
        elif s.config.prediction_type == "sample":
            x0, eps = o, (xi - a.sqrt() * o) / (1 - a).sqrt()
        else:
            x0, eps = a.sqrt() * xi - (1 - a).sqrt() * o, a.sqrt() * o + (1 - a).sqrt() * xi
        std = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        means.append(ap.sqrt() * x0 + math.sqrt(1 - ap - std**2) * eps)
        stds.append(std)
    return torch.stack(means), torch.tensor(stds, dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("batched", [False, True])
def test_logprob_matches_normal(prediction_type, batched):
    s = _sched(10, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    B = 5
    x = torch.randn(B, 4, 6, 6, generator=g)
    out = torch.randn(B, 4, 6, 6, generator=g)
    prev = torch.randn(B, 4, 6, 6, generator=g)
    if batched:
        # includes the last step (t=1 -> t_prev<0 -> final_alpha_cumprod) and the first
        t = s.timesteps[torch.tensor([0, 3, 9, 9, 5])]
    else:
        t = s.timesteps[9]
    eta = 0.7
    got_prev, logp = ddim_step_with_logprob(s, out, t, x, eta=eta, prev_sample=prev)
    assert torch.equal(got_prev, prev)
    tt = t if t.ndim else t.expand(B)
    mean, std = _reference(s, out, tt, x, eta)
    ref = torch.stack([
        torch.distributions.Normal(mean[i], std[i]).log_prob(prev[i].double()).mean() for i in range(B)
    ])
    assert logp.shape == (B,)
    torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=1e-5)

    # and a sampled step lands on the mean + std * noise of the same equations
    got_prev, logp2 = ddim_step_with_logprob(s, out, t, x, eta=eta, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(B, 4, 6, 6, generator=torch.Generator().manual_seed(3)).double()
    torch.testing.assert_close(got_prev.double(), mean + std.view(-1, 1, 1, 1) * noise, rtol=1e-5, atol=1e-5)
    # log-density of a sample at its own distribution: -0.5*E[z^2] - log std - log sqrt(2 pi)
    ref2 = -0.5 * (noise**2).mean(dim=(1, 2, 3)) - std.log() - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(logp2.double(), ref2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prev_sample_matches_diffusers(eta, prediction_type):
    s = _sched(20, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    for t in s.timesteps[[0, 7, 19]]:
        out = torch.randn(3, 4, 8, 8, generator=g)
        ref = s.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(5)).prev_sample
        got, logp = ddim_step_with_logprob(s, out, t, x, eta=eta, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(logp).all()
        if eta == 0:
            assert torch.equal(logp, torch.zeros(3))


def test_clip_and_threshold_match_diffusers():
    for kw in ({"clip_sample": True, "clip_sample_range": 0.5},
               {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}):
        s = _sched(10, **kw)
        g = torch.Generator().manual_seed(2)
        x = 3 * torch.randn(2, 4, 8, 8, generator=g)
        out = 3 * torch.randn(2, 4, 8, 8, generator=g)
        t = s.timesteps[8]
        ref = s.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(0)).prev_sample
        got, _ = ddim_step_with_logprob(s, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_generator_list_is_per_sample():
    """With one generator per sample, a sample's noise does not depend on its batch."""
    s = _sched(10)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    full, _ = ddim_step_with_logprob(s, out, s.timesteps[2], x, generator=gens)
    one, _ = ddim_step_with_logprob(s, out[2:], s.timesteps[2], x[2:], generator=[torch.Generator().manual_seed(102)])
    torch.testing.assert_close(full[2:], one)


def test_gradient_flows_to_model_output_only_through_mean():
    s = _sched(10)
    out = torch.randn(2, 4, 4, 4, requires_grad=True)
    x = torch.randn(2, 4, 4, 4)
    prev = torch.randn(2, 4, 4, 4)
    _, logp = ddim_step_with_logprob(s, out, s.timesteps[4], x, prev_sample=prev)
    logp.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


def test_gaussian_kl_is_expected_logprob_gap():
    """The trainer's KL penalty: closed form == Monte-Carlo E_p[log p - log q] of two DDIM steps
    at the same x_t (same std, different model outputs), and zero for identical outputs."""
    s = _sched(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    out_p = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    out_q = out_p + 0.05 * torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = s.timesteps[[2, 5, 8]]
    mean_p, std = ddim_step_gaussian(s, out_p, t, x, eta=1.0)
    mean_q, std_q = ddim_step_gaussian(s, out_q, t, x, eta=1.0)
    torch.testing.assert_close(std, std_q)
    kl = gaussian_kl(mean_p, mean_q, std)
    assert kl.shape == (3,) and (kl > 0).all()
    torch.testing.assert_close(gaussian_kl(mean_p, mean_p, std), torch.zeros(3, dtype=torch.float64))
    gaps = []
    for _ in range(4000):
        prev, lp = ddim_step_with_logprob(s, out_p, t, x, eta=1.0, generator=g)
        _, lq = ddim_step_with_logprob(s, out_q, t, x, eta=1.0, prev_sample=prev)
        gaps.append(lp - lq)
    gaps = torch.stack(gaps)
    se = gaps.std(dim=0) / math.sqrt(len(gaps))
    assert ((gaps.mean(dim=0) - kl).abs() < 4 * se).all(), (gaps.mean(dim=0), kl, se)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).eval().requires_grad_(False)
    return unet


class _IdentityVAE(torch.nn.Module):
    """Stand-in decoder: first three latent channels as the image (no VAE needed for this test)."""

    class config:
        scaling_factor = 1.0

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def decode(self, z):
        return type("Out", (), {"sample": z[:, :3]})()


def test_trajectory_reevaluation_ratio_is_one(tiny_unet):
    s = _sched(6)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(4, 7, 32, generator=g)
    uncond = torch.randn(1, 5, 32, generator=g).expand(4, -1, -1)  # shorter: exercised padding + mask
    traj = sample_with_logprob(tiny_unet, _IdentityVAE(), s, cond, uncond, num_steps=6, guidance_scale=3.0, eta=1.0,
                               generator=torch.Generator().manual_seed(1))
    assert traj.latents.shape == (4, 7, 4, 8, 8)
    assert traj.log_probs.shape == (4, 6) and traj.timesteps.shape == (4, 6)
    assert traj.images.shape == (4, 3, 8, 8) and traj.images.min() >= 0 and traj.images.max() <= 1
    assert torch.equal(traj.timesteps[0], s.timesteps)
    # Re-evaluate every recorded step in a shuffled mini-batch with per-sample timesteps.
    idx = torch.tensor([3, 0, 2])
    for j in range(6):
        step = torch.tensor([j, (j + 2) % 6, (j + 4) % 6])
        t = traj.timesteps[idx, step]
        with torch.no_grad():
            eps = guided_eps(tiny_unet, traj.latents[idx, step], t, cond[idx], uncond[idx], 3.0)
        _, logp = ddim_step_with_logprob(s, eps, t, traj.latents[idx, step], eta=1.0,
                                         prev_sample=traj.latents[idx, step + 1])
        diff = (logp - traj.log_probs[idx, step]).abs().max().item()
        assert diff < 1e-5, diff  # 0.0 on CPU; batched-kernel rounding elsewhere
        assert torch.exp(logp - traj.log_probs[idx, step]).sub(1).abs().max() < 1e-4


def test_padded_uncond_is_masked_exactly(tiny_unet):
    """ACE pads the unconditional branch; the mask must make the padding invisible."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    uncond = torch.randn(2, 5, 32, generator=g)
    cond = torch.randn(2, 8, 32, generator=g)
    padded, mask = pad_uncond(cond, uncond)
    assert padded.shape == (2, 8, 32) and mask.shape == (4, 8) and mask[:2, :3].sum() == 0
    t = torch.tensor(500)
    with torch.no_grad():
        ref = tiny_unet(x, t, encoder_hidden_states=uncond).sample
        got = tiny_unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([padded, cond]),
                        encoder_attention_mask=mask).sample[:2]
        unmasked = tiny_unet(x, t, encoder_hidden_states=padded).sample
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert (unmasked - ref).abs().max() > 1e-4  # without the mask the zeros do change the output
