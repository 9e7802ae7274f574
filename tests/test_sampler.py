"""The Sampler's seed policy: same seeds -> same images; per-sample seeds -> a sample does not
depend on its batch; different purposes -> different noise; a paired anchor shares x_T (and the
step noise only when asked). The seed arithmetic is pinned: images, banks and resumes rely on it."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from medrl.diffusion.sampler import Noise, Sampler, derive_seed, offset_seed, paired_anchor_noise, text_seed

torch.set_num_threads(1)


class _PerSampleUNet(torch.nn.Module):
    """Toy UNet whose output for sample i uses only sample i's inputs, element by element, so a
    batch changes nothing but the noise: any difference between batches is the seed policy's."""

    class config:
        sample_size = 4
        in_channels = 4

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3), requires_grad=False)

    def forward(self, x, t, encoder_hidden_states, **_):
        shift = encoder_hidden_states[:, 0, 0].view(-1, 1, 1, 1)
        return type("Out", (), {"sample": self.w * x + shift})()


class _IdentityVAE(torch.nn.Module):
    class config:
        scaling_factor = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def decode(self, z):
        return type("Out", (), {"sample": z[:, :3]})()


def _toy(eta: float = 1.0) -> tuple[Sampler, torch.Tensor]:
    cond = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(0))
    neg = torch.zeros(1, 3, 8)
    return Sampler(_PerSampleUNet(), _IdentityVAE(), DDIMScheduler(), neg, num_steps=4, guidance_scale=2.0, eta=eta), cond


def _same(a, b) -> bool:
    """Bit-identical trajectories (the last step's log-prob is NaN by construction: std 0 at t=0)."""
    return (torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
            and torch.equal(a.log_probs.nan_to_num(), b.log_probs.nan_to_num()))


def test_same_seeds_same_images_with_a_real_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=32,
    ).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    cond, neg = torch.randn(3, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    s = Sampler(unet, _IdentityVAE(), DDIMScheduler(), neg, num_steps=3, guidance_scale=3.0, eta=1.0)
    for noise in (Noise(7), Noise.batch(7), Noise([1, 2, 3]), Noise([1, 2, 3], [4, 5, 6])):
        a, b = s.sample(cond, noise), s.sample(cond, noise)
        assert _same(a, b), noise
    assert not torch.equal(s.sample(cond, Noise(7)).images, s.sample(cond, Noise(8)).images)


def test_per_sample_seeds_do_not_depend_on_the_batch():
    s, cond = _toy()
    seeds = [11, 12, 13, 14, 15]
    full = s.sample(cond, Noise(seeds))
    # sample 2 alone, and inside another batch in another order
    alone = s.sample(cond[2:3], Noise(seeds[2:3]))
    mixed = s.sample(cond[[4, 2, 0]], Noise([seeds[4], seeds[2], seeds[0]]))
    for other, i in ((alone, 0), (mixed, 1)):
        assert torch.equal(other.latents[i], full.latents[2])
        assert torch.equal(other.images[i], full.images[2])
        torch.testing.assert_close(other.log_probs[i], full.log_probs[2], rtol=1e-6, atol=1e-6, equal_nan=True)
    # with separate step seeds too
    own = s.sample(cond, Noise(seeds, [offset_seed(x) for x in seeds]))
    assert torch.equal(s.sample(cond[3:], Noise(seeds[3:], [offset_seed(x) for x in seeds[3:]])).latents, own.latents[3:])


def test_one_batch_seed_ties_a_sample_to_its_batch():
    """The documented trade-off of an int seed: one generator for the batch, so sample 0's step
    noise changes with the batch size (its x_T, drawn first, does not)."""
    s, cond = _toy()
    big, small = s.sample(cond, Noise(3)), s.sample(cond[:2], Noise(3))
    assert torch.equal(big.latents[0, 0], small.latents[0, 0])
    assert not torch.equal(big.latents[0, -1], small.latents[0, -1])


def test_purposes_and_anchors_get_their_own_noise():
    s, cond = _toy()
    purposes = [derive_seed(3, 0, 0, p, 0) for p in range(6)]
    assert len(set(purposes)) == 6 and len({derive_seed(3, e, 0, 1, 0) for e in range(4)}) == 4
    assert len({text_seed(1, "a", 0), text_seed(1, "a", 1), text_seed(1, "b", 0), text_seed(2, "a", 0)}) == 4
    sample = Noise.batch(derive_seed(3, 0, 0, 1, 0))
    assert sample.steps != sample.init
    x = s.sample(cond, sample)
    own = s.sample(cond, paired_anchor_noise(sample, "initial", own_steps=derive_seed(3, 0, 0, 2, 0)))
    shared = s.sample(cond, paired_anchor_noise(sample, "shared", own_steps=derive_seed(3, 0, 0, 2, 0)))
    assert torch.equal(own.latents[:, 0], x.latents[:, 0])  # the same x_T ...
    assert not torch.equal(own.latents[:, 1], x.latents[:, 1])  # ... but its own step noise
    assert torch.equal(shared.latents, x.latents)  # everything shared: the same model gives the same images
    per_sample = Noise([1, 2, 3, 4, 5])
    assert paired_anchor_noise(per_sample, "shared", own_steps=[0] * 5) == per_sample
    assert paired_anchor_noise(per_sample, "initial", own_steps=[6, 7, 8, 9, 10]) == Noise([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    with pytest.raises(ValueError, match="paired anchor noise"):
        paired_anchor_noise(sample, "all", own_steps=0)


def test_per_sample_seeds_must_match_the_batch():
    s, cond = _toy()
    with pytest.raises(ValueError, match="one per sample"):
        s.sample(cond, Noise([1, 2]))
    with pytest.raises(ValueError, match="one per sample"):
        s.sample(cond, Noise(1, [1, 2, 3]))


def test_seed_arithmetic_is_pinned():
    """The formulas every existing image, anchor bank and checkpoint was made with."""
    ss = np.random.SeedSequence([3, 1, 0, 1, 2]).generate_state(1, dtype=np.uint64)[0] >> 1
    assert derive_seed(3, 1, 0, 1, 2) == int(ss)
    h = hashlib.sha256(b"5\x00Small left pleural effusion.\x001").digest()
    assert text_seed(5, "Small left pleural effusion.", 1) == int.from_bytes(h[:8], "little") >> 1
    assert offset_seed(2**63 - 1) == (2**63 - 1 + 0x9E3779B97F4A7C15) % 2**63
    assert Noise.batch(10) == Noise(10, 11) and Noise(np.int64(4)).init == 4 and Noise([1, 2]).init == (1, 2)


def test_lora_sampling_runs_merged_with_the_unmerged_numbers():
    """Sampler(merge_lora=True) folds LoRA into the base weights (merged_lora): trajectories match the
    unmerged forward to float rounding, the base weights come back bit for bit, and with grad
    enabled nothing is merged."""
    from medrl.diffusion.lora import add_lora
    from medrl.diffusion.rollout import merged_lora, sample_with_logprob

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    add_lora(unet, 4, target_modules=("to_q", "to_k", "to_v", "to_out.0", "conv_out"))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B is zero at init: make the adapter matter
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    g = torch.Generator().manual_seed(1)
    cond, neg = torch.randn(3, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    s = Sampler(unet, _IdentityVAE(), DDIMScheduler(), neg, num_steps=4, guidance_scale=3.0, eta=1.0, merge_lora=True)
    merged = s.sample(cond, Noise(7))
    from medrl.diffusion.sampler import generators
    from medrl.diffusion.rollout import initial_latents

    gen = generators(7, "cpu")
    x_T = initial_latents(unet, 3, gen)
    plain = sample_with_logprob(unet, _IdentityVAE(), DDIMScheduler(), cond, neg.expand(3, -1, -1), num_steps=4,
                                guidance_scale=3.0, eta=1.0, generator=gen, latents=x_T)
    assert (merged.latents - plain.latents).abs().max() < 1e-4
    lp = (merged.log_probs - plain.log_probs).nan_to_num()
    assert lp.abs().max() < 1e-4 and not torch.equal(merged.latents, s.sample(cond, Noise(8)).latents)
    for n, p in unet.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all(not m.merged for m in unet.modules() if hasattr(m, "merged_adapters"))
    lora = [m for m in unet.modules() if hasattr(m, "merged_adapters")]
    with merged_lora(unet):  # grad enabled: the adapters stay separate (training must see them)
        assert not any(m.merged for m in lora)
    with torch.no_grad(), merged_lora(unet):
        assert all(m.merged for m in lora)
        assert not any(torch.equal(m.base_layer.weight, before[n + ".base_layer.weight"])
                       for n, m in unet.named_modules() if m in lora)
