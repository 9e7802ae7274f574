"""Measure the RLCF modes against each other on the same policy samples.

``paired`` (the paper) samples an anchor image for every policy sample from the same report
and x_T, with its own per-step noise (what the trainer does by default); ``paired_shared``
also shares every step's noise (lower variance, but a baseline that depends on the sample's
own noise biases the policy gradient); ``bank`` subtracts the anchor's mean score over K
precomputed samples per report. All estimate the same expected reward; they differ in cost
(paired needs a second sampling pass and a second scoring pass per epoch) and in variance:
the shared noise makes a paired anchor a control variate, which helps while the policy is
close to the anchor and stops helping as it drifts, while the bank's baseline carries no
per-sample noise of its own.

``compare_rlcf_modes`` draws policy samples (base + adapter), both kinds of paired anchor
samples, scores every way and reports cost per sample and per RL epoch, mean, std and
variance ratio (over bank) of the comparative reward ``l_diag * r_diag + l_consist *
r_consist``, with bootstrap CIs.
"""
from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medrl.errors import DataError
from medrl.progress import progress

__all__ = ["MODES", "PAIRED_MODES", "compare_rlcf_modes"]

PAIRED_MODES = ("paired", "paired_shared")
MODES = (*PAIRED_MODES, "bank")


def _ratio_of_variances(a: np.ndarray, b: np.ndarray) -> float:
    vb = float(np.var(b, ddof=1))
    return float(np.var(a, ddof=1)) / vb if vb > 0 else float("nan")


def compare_rlcf_modes(
    base_dir: str | Path,
    adapter_dir: str | Path | None,
    *,
    aligner_dir: str | Path,
    diag_dir: str | Path,
    dualenc_dir: str | Path,
    bank: str | Path,
    reports: Sequence[str],
    labels_for: Any = None,
    n_samples: int,
    batch_size: int,
    seed: int,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    l_diag: float = 10.0,
    l_consist: float = 10.0,
    diag_unmentioned: str = "ignore",
    samples_per_epoch: int | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    device: str = "cpu",
) -> tuple[dict[str, Any], pd.DataFrame]:
    """(metrics, per-sample table). Policy = base stack (+ LoRA/ACE adapter when given)."""
    from medrl.diffusion.stack import encode_prompts

    reports = list(reports)
    if not reports:
        raise DataError("compare_rlcf_modes: no reports given")
    if n_samples < 2 or batch_size < 1:
        raise DataError(f"compare_rlcf_modes: n_samples={n_samples}, batch_size={batch_size}; expected >= 2 and >= 1")
    if l_diag == 0 and l_consist == 0:
        raise DataError("compare_rlcf_modes: l_diag and l_consist are both 0; nothing is comparative")
    c, anchor_unet, ace = _policy_and_anchor(base_dir, adapter_dir, device)
    kw: dict[str, Any] = {"l_align": 0.0, "l_diag": l_diag, "l_consist": l_consist, "rlcf": True,
                          "labels_for": labels_for, "device": device, "diag_unmentioned": diag_unmentioned}
    paired, banked = _paired_and_bank_rewards(aligner_dir, diag_dir, dualenc_dir, bank, kw)

    rng = np.random.default_rng(seed)
    prompts_all = [reports[i] for i in rng.integers(0, len(reports), n_samples)]
    seeds_all = [int(s) for s in rng.integers(0, 2**62, n_samples)]
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        s = _TimedSampler(c, encode_prompts(c, [""]).float(), num_steps=num_steps, guidance_scale=guidance_scale, eta=eta)
        # warm-up outside the clock (first-call allocations, lazy inits)
        s.sample(c.unet, encode_prompts(c, prompts_all[:1]).float(), seeds_all[:1])
        for start in progress(range(0, n_samples, batch_size), desc="rlcf modes", total=-(-n_samples // batch_size)):
            prompts, seeds = prompts_all[start:start + batch_size], seeds_all[start:start + batch_size]
            rows += _score_batch(s, ace, anchor_unet, paired, banked, prompts, seeds)
    df = pd.DataFrame(rows)
    metrics = _summarise(df, s.seconds, l_diag=l_diag, l_consist=l_consist, with_adapter=adapter_dir is not None,
                         samples_per_epoch=samples_per_epoch, boot={"n_boot": n_boot, "ci": ci, "seed": seed})
    return metrics, df


def _policy_and_anchor(base_dir: str | Path, adapter_dir: str | Path | None, device: str) -> tuple[Any, Any, Any]:
    """(stack whose UNet carries the adapter, a frozen copy of the base UNet as anchor, the ACE module or None)."""
    from medrl.diffusion.stack import load_components
    from medrl.diffusion.lora import load_adapter, read_adapter_config

    if adapter_dir is not None and read_adapter_config(adapter_dir).get("text_lora"):
        raise DataError(f"{adapter_dir}: the RLCF-mode comparison scores policy and anchor on one text encoding; "
                        "expected an adapter without a text-encoder LoRA (rl.common.text_lora_rank: 0)")
    c = load_components(str(base_dir), device=device)
    anchor_unet = copy.deepcopy(c.unet).requires_grad_(False)  # a separate copy works for LoRA and full fine-tunes
    ace = load_adapter(c.unet, adapter_dir) if adapter_dir is not None else None
    return c, anchor_unet, ace


def _paired_and_bank_rewards(aligner_dir: str | Path, diag_dir: str | Path, dualenc_dir: str | Path,
                             bank: str | Path, kw: dict[str, Any]) -> tuple[Any, Any]:
    """The CXR reward in ``paired`` mode and in ``bank`` mode, sharing one scorer."""
    from medrl.rewards.cxr import CXRReward

    paired = CXRReward(aligner_dir, diag_dir, dualenc_dir, rlcf_mode="paired", **kw)
    banked = CXRReward(aligner_dir, diag_dir, dualenc_dir, rlcf_mode="bank", anchor_bank=bank, **kw)
    # one scorer for both keeps their text-embedding caches warm alike (fair timing)
    banked.scorer = paired.scorer
    return paired, banked


class _TimedSampler:
    """DDIM sampling from per-sample seeds (a sample's noise does not depend on its batch), with
    wall-clock totals per phase in ``seconds``."""

    def __init__(self, c: Any, neg1: torch.Tensor, *, num_steps: int, guidance_scale: float, eta: float) -> None:
        from medrl.diffusion.sampler import Sampler

        self.c = c
        self.sampler = Sampler(c.unet, c.vae, c.scheduler, neg1, num_steps=num_steps, guidance_scale=guidance_scale,
                               eta=eta)
        self.seconds = {"policy": 0.0, "anchor": 0.0, "anchor_shared": 0.0, "score_paired": 0.0,
                        "score_paired_shared": 0.0, "score_bank": 0.0}

    @contextlib.contextmanager
    def clock(self, key: str):
        t0 = time.perf_counter()
        yield
        self.seconds[key] += time.perf_counter() - t0

    def sample(self, unet: Any, cond: torch.Tensor, seeds: Sequence[int], anchor_of_mode: str | None = None
               ) -> torch.Tensor:
        """Images of ``unet``, each sample's x_T and step noise from its own seed; with
        ``anchor_of_mode`` ("initial" or "shared"), the paired anchor's noise for those samples."""
        from medrl.diffusion.sampler import Noise, offset_seed, paired_anchor_noise

        noise = Noise(seeds)
        if anchor_of_mode is not None:
            noise = paired_anchor_noise(noise, anchor_of_mode, own_steps=[offset_seed(s) for s in seeds])
        return self.sampler.sample(cond, noise, unet=unet).images


def _score_batch(s: _TimedSampler, ace: Any, anchor_unet: Any, paired: Any, banked: Any, prompts: list[str],
                 seeds: list[int]) -> list[dict[str, Any]]:
    """Sample one batch from the policy and both kinds of paired anchor, score it in every mode;
    one row per sample."""
    from medrl.diffusion.stack import encode_prompts

    with s.clock("policy"):
        text = encode_prompts(s.c, prompts).float()
        x = s.sample(s.c.unet, ace(text) if ace is not None else text, seeds)
    with s.clock("anchor"):  # the trainer's paired mode: same x_T, own step noise
        x_hat = s.sample(anchor_unet, text, seeds, anchor_of_mode="initial")
    with s.clock("anchor_shared"):
        x_hat_s = s.sample(anchor_unet, text, seeds, anchor_of_mode="shared")
    with s.clock("score_paired"):
        r_p, tp = paired(x, prompts, anchor_images=x_hat)
    with s.clock("score_paired_shared"):
        r_s, ts = paired(x, prompts, anchor_images=x_hat_s)
    with s.clock("score_bank"):
        r_b, tb = banked(x, prompts)
    rows = []
    for i, p in enumerate(prompts):
        rows.append({
            "report": p, "seed": seeds[i], "r_paired": float(r_p[i]), "r_paired_shared": float(r_s[i]),
            "r_bank": float(r_b[i]),
            "raw_diag": float(tp["raw_diag"][i]), "raw_consist": float(tp["raw_consist"][i]),
            "anchor_diag_paired": float(tp["anchor_diag"][i]), "anchor_consist_paired": float(tp["anchor_consist"][i]),
            "anchor_diag_paired_shared": float(ts["anchor_diag"][i]),
            "anchor_consist_paired_shared": float(ts["anchor_consist"][i]),
            "anchor_diag_bank": float(tb["anchor_diag"][i]), "anchor_consist_bank": float(tb["anchor_consist"][i]),
        })
    return rows


def _summarise(df: pd.DataFrame, t: dict[str, float], *, l_diag: float, l_consist: float, with_adapter: bool,
               samples_per_epoch: int | None, boot: dict[str, Any]) -> dict[str, Any]:
    """Cost per sample and per epoch, mean/std per mode and each paired mode against the bank (CIs)."""
    from medrl.metrics.bootstrap import bootstrap_ci

    n = len(df)
    r = {m: df[f"r_{m}"].to_numpy() for m in MODES}
    per_sample = {
        "paired": (t["policy"] + t["anchor"] + t["score_paired"]) / n,
        "paired_shared": (t["policy"] + t["anchor_shared"] + t["score_paired_shared"]) / n,
        "bank": (t["policy"] + t["score_bank"]) / n,
    }
    per_epoch = samples_per_epoch or n
    own = l_diag * df.raw_diag + l_consist * df.raw_consist
    metrics: dict[str, Any] = {"n_samples": n, "with_adapter": with_adapter}
    for m in MODES:
        metrics[f"mean_{m}"] = bootstrap_ci(r[m], **boot)
        metrics[f"std_{m}"] = bootstrap_ci(r[m], lambda a: float(np.std(a, ddof=1)), **boot)
    for m in PAIRED_MODES:
        metrics[f"mean_diff_{m}_minus_bank"] = bootstrap_ci(r[m] - r["bank"], **boot)
        metrics[f"var_ratio_{m}_over_bank"] = bootstrap_ci((r[m], r["bank"]), _ratio_of_variances, **boot)
        # how much of the policy score's spread each paired baseline can remove
        metrics[f"corr_policy_anchor_{m}"] = float(np.corrcoef(
            own, l_diag * df[f"anchor_diag_{m}"] + l_consist * df[f"anchor_consist_{m}"])[0, 1])
        metrics[f"cost_ratio_{m}_over_bank"] = per_sample[m] / per_sample["bank"]
    metrics.update({
        "seconds": dict(t),
        "seconds_per_sample": per_sample,
        "samples_per_epoch": per_epoch,
        # sampling + scoring only: the PPO update that follows is the same in every mode
        "reward_seconds_per_epoch": {k: v * per_epoch for k, v in per_sample.items()},
    })
    return metrics
