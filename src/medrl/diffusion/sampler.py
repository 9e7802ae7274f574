"""One way to set up DDIM sampling: :class:`Sampler` (components + settings) and the seed policy.

Every place that samples (the DDPO trainer, the CXR anchor bank, the RLCF-mode measurement,
held-out generation, the benchmark) goes through :meth:`Sampler.sample` with a :class:`Noise`.

Seed policy
-----------
1. A purpose's seed is derived from the run's seed and integer indices with :func:`derive_seed`
   (e.g. (seed, epoch, rank, purpose, batch) in the trainer, (seed, prompt, image) in
   generation); a sample keyed by text (the anchor bank's report) uses :func:`text_seed`.
2. :class:`Noise` names the seeds of one batch: ``init`` draws x_T, ``steps`` the per-step
   noise (None: the generators that drew x_T go on to draw the step noise).
   An int seeds ONE generator for the whole batch: a sample then depends on the batch it is in
   (fine for training rollouts and benchmarks). A sequence seeds ONE GENERATOR PER SAMPLE: the
   noise of sample i depends on its own seed only, not on batch size, order or neighbours
   (held-out images, the anchor bank, the RLCF-mode measurement promise that).
3. A paired RLCF anchor shares its sample's x_T, and its step noise only when asked
   (:func:`paired_anchor_noise`).

The seed arithmetic is fixed: changing it changes every sampled image, bank and resumed run.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch

from medrl.config import RLCxr
from medrl.diffusion.rollout import Trajectory, initial_latents, merged_lora, sample_with_logprob

Seeds = int | tuple[int, ...]

# What a paired anchor may share with its sample: the values of rl.cxr.rlcf_paired_noise.
PAIRED_NOISE: tuple[str, ...] = get_args(RLCxr.model_fields["rlcf_paired_noise"].annotation)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy SeedSequence: well spread, platform independent)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def text_seed(seed: int, text: str, j: int) -> int:
    """Seed of the j-th sample for ``text``: depends on (seed, text, j) only, so it does not change
    with the list the text is in, its position or the batch size."""
    h = hashlib.sha256(f"{int(seed)}\x00{text}\x00{int(j)}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def offset_seed(seed: int) -> int:
    """A second seed from one seed (golden-ratio offset), for a stream independent of the first."""
    return (int(seed) + 0x9E3779B97F4A7C15) % 2**63


def _as_seeds(seeds: int | Sequence[int] | None) -> Seeds | None:
    """int for one batch generator, a tuple of ints for per-sample ones (numpy ints and lists accepted)."""
    if seeds is None:
        return None
    if isinstance(seeds, (int, np.integer)):
        return int(seeds)
    return tuple(int(s) for s in seeds)


@dataclass(frozen=True)
class Noise:
    """The seeds of one batch's noise (see the module's seed policy): ``init`` draws x_T,
    ``steps`` the per-step noise (None: the x_T generators go on). An int is one generator for
    the batch, a sequence one generator per sample."""

    init: Seeds
    steps: Seeds | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "init", _as_seeds(self.init))
        object.__setattr__(self, "steps", _as_seeds(self.steps))

    @classmethod
    def batch(cls, seed: int) -> Noise:
        """One generator for the batch's x_T (``seed``) and another for its step noise (``seed + 1``),
        so x_T can be shared without sharing the step noise."""
        return cls(int(seed), int(seed) + 1)

    def check(self, n: int) -> None:
        for name, s in (("init", self.init), ("steps", self.steps)):
            if isinstance(s, tuple) and len(s) != n:
                raise ValueError(f"Noise.{name}: {len(s)} per-sample seeds for a batch of {n}; expected one per sample")


def generators(seeds: Seeds, device: torch.device | str) -> torch.Generator | list[torch.Generator]:
    """One generator for an int seed, one per sample for a tuple of seeds."""
    if isinstance(seeds, int):
        return torch.Generator(device=device).manual_seed(seeds)
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def paired_anchor_noise(sample: Noise, mode: str, own_steps: int | Sequence[int]) -> Noise:
    """The noise of a paired RLCF anchor (the frozen base model's image for the same prompt) given
    its policy sample's noise. The anchor always shares x_T (paper Eq. 2's x-hat); with
    ``mode="shared"`` it also shares every step's noise (lower reward variance, but a baseline that
    depends on the sample's own noise biases the policy gradient), with ``"initial"`` it draws its
    step noise from ``own_steps``."""
    if mode not in PAIRED_NOISE:
        raise ValueError(f"paired anchor noise {mode!r}: expected one of {PAIRED_NOISE}")
    return sample if mode == "shared" else Noise(sample.init, own_steps)


@dataclass
class Sampler:
    """DDIM + classifier-free guidance with fixed components and settings.

    ``negative`` is the unconditional embedding, (1, L, D) (expanded to the batch) or (N, L, D)
    with one row per sample (the first B rows are used); its device is the sampler's, where the
    generators live too. Sampling (no_grad) runs under whatever autocast the caller entered."""

    unet: Any
    vae: Any
    scheduler: Any
    negative: torch.Tensor
    num_steps: int
    guidance_scale: float
    eta: float
    merge_lora: bool = False  # True: LoRA merged into the base weights while sampling (~1.06x; latents differ ~1e-5)

    @property
    def device(self) -> torch.device:
        return self.negative.device

    def negatives(self, n: int) -> torch.Tensor:
        return self.negative.expand(n, -1, -1) if self.negative.shape[0] == 1 else self.negative[:n]

    def sample(self, cond: torch.Tensor, noise: Noise, *, unet: Any = None) -> Trajectory:
        """Trajectories of ``unet`` (default: the sampler's) for the conditional embeddings
        ``cond`` (B, L, D), x_T and per-step noise from ``noise``; LoRA adapters run merged
        into the base weights (:func:`merged_lora`) unless ``merge_lora`` is off."""
        unet = self.unet if unet is None else unet
        n = cond.shape[0]
        noise.check(n)
        gens = generators(noise.init, self.device)
        x_T = initial_latents(unet, n, gens, self.device)
        if noise.steps is not None:
            gens = generators(noise.steps, self.device)
        with torch.no_grad(), merged_lora(unet) if self.merge_lora else contextlib.nullcontext():
            return sample_with_logprob(unet, self.vae, self.scheduler, cond, self.negatives(n),
                                       num_steps=self.num_steps, guidance_scale=self.guidance_scale, eta=self.eta,
                                       generator=gens, latents=x_T)
