"""Per-step KL(policy || base) of trained CXR adapters on their own trajectories: how far RL
moved each denoising step from the frozen base, the quantity `rl.common.kl_coef` penalises.

For each adapter: 32 training reports (fixed draw), one DDIM trajectory each from the policy
(LoRA + ACE) with the workspace's rl settings, then at every recorded x_t the Gaussian step
of policy and base compared (`medrl.diffusion.ddim.gaussian_kl`, averaged over latent dims).

    python docs/experiments/cxr_kl_to_base.py <workspace> <data/rl/cxr/<variant>/seed_<s>> [...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from medrl.diffusion.stack import encode_prompts, load_components
from medrl.diffusion.ddim import ddim_step_gaussian, gaussian_kl
from medrl.diffusion.lora import load_adapter
from medrl.diffusion.rollout import guided_eps, sample_with_logprob


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace", type=Path)
    ap.add_argument("runs", nargs="+", type=Path, help="RL output dirs (each with adapter/)")
    ap.add_argument("--n", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rl = yaml.safe_load((a.workspace / "params.yaml").read_text())["rl"]["common"]
    steps, gs, eta = rl["num_steps"], rl["guidance_scale"], rl["eta"]
    base_dir = str(a.workspace / "data/models/cxr/base")
    pairs = pd.read_csv(a.workspace / "data/prepared/cxr/pairs.csv")
    reports = sorted(set(pairs[pairs.split == "train"].impression))
    prompts = [reports[i] for i in np.random.default_rng(0).integers(0, len(reports), a.n)]
    base = load_components(base_dir)
    for run in a.runs:
        pol = load_components(base_dir)
        ace = load_adapter(pol.unet, run / "adapter")
        with torch.no_grad():
            text = encode_prompts(pol, prompts).float()
            neg = encode_prompts(pol, [""] * a.n).float()
            cond = ace(text) if ace is not None else text
            tr = sample_with_logprob(pol.unet, pol.vae, pol.scheduler, cond, neg, num_steps=steps, guidance_scale=gs,
                                     eta=eta, generator=torch.Generator().manual_seed(1))
            kls = []
            for j in range(steps):
                x, t = tr.latents[:, j], tr.timesteps[:, j]
                m_pol, std = ddim_step_gaussian(pol.scheduler, guided_eps(pol.unet, x, t, cond, neg, gs), t, x, eta)
                m_base, _ = ddim_step_gaussian(pol.scheduler, guided_eps(base.unet, x, t, text, neg, gs), t, x, eta)
                kls.append(gaussian_kl(m_pol, m_base, std).mean().item())
        print(f"{run}: per-step KL, steps 0-{steps - 1}: {' '.join(f'{k:.4f}' for k in kls)}; mean {np.mean(kls):.4f}")


if __name__ == "__main__":
    main()
