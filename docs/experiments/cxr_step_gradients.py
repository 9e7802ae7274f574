"""Which denoising steps carry the policy gradient's signal and which its noise (CXR track).

64 trajectories (8 training reports x 8 samples, the trainer's grouping) from the base model
or a trained adapter, scored by the full variant's reward (bank RLCF, the workspace's
weights), advantages normalised per report as in training. For every step j the policy
gradient g_j = -mean_i A_i grad log pi(x_{j+1} | x_j) over the LoRA parameters is computed
on two halves of the reports (4 + 4) separately: |g_j| says how much step j weighs in the
update, cos(g_j^first half, g_j^second half) whether its direction is reproducible (signal)
or not (noise, cos ~ 0). A fresh LoRA has B = 0, so its gradient lives in B only; a trained
adapter's covers A and B.

    python docs/experiments/cxr_step_gradients.py <workspace> [--adapter data/rl/cxr/full/seed_0/adapter] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from medrl.data.reports import PATHOLOGIES
from medrl.diffusion.stack import encode_prompts, load_components
from medrl.rewards.cxr import CXRReward
from medrl.diffusion.ddim import ddim_step_with_logprob
from medrl.diffusion.lora import DEFAULT_TARGETS, add_lora, load_adapter
from medrl.rl.ppo import PerPromptStatTracker
from medrl.diffusion.rollout import guided_eps, sample_with_logprob


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--adapter", type=Path, help="a trained adapter dir; default: a fresh LoRA on the base")
    ap.add_argument("--seeds", default="0,1,2", help="independent draws of 8 reports and noise")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ws = a.workspace
    p = yaml.safe_load((ws / "params.yaml").read_text())["rl"]
    steps, gs, eta = p["common"]["num_steps"], p["common"]["guidance_scale"], p["common"]["eta"]
    v = p["cxr"]["variants"]["full"]
    pairs = pd.read_csv(ws / "data/prepared/cxr/pairs.csv")
    train = pairs[pairs.split == "train"]
    labels = {r["impression"]: {k: r[k] for k in PATHOLOGIES} for r in train.to_dict("records")}
    reports = sorted(labels)
    m = ws / "data/models/cxr"
    reward = CXRReward(m / "aligner", m / "diag", m / "dualenc", l_align=v["l_align"], l_diag=v["l_diag"],
                       l_consist=v["l_consist"], rlcf=True, rlcf_mode="bank", labels_for=labels.__getitem__,
                       anchor_bank=m / "anchor_bank" / "bank.csv", diag_unmentioned=p["cxr"]["diag_unmentioned"])
    c = load_components(str(m / "base"))
    ace = None
    if a.adapter is not None:
        ace = load_adapter(c.unet, ws / a.adapter if not a.adapter.is_absolute() else a.adapter)
    else:
        add_lora(c.unet, p["common"]["lora_rank"], None, DEFAULT_TARGETS, seed=0)
    params = [q for n, q in c.unet.named_parameters() if "lora_" in n]
    for q in params:
        q.requires_grad_(True)

    norms, coss = [], []
    for seed in (int(s) for s in a.seeds.split(",")):
        rng = np.random.default_rng(seed)
        prompts = [reports[i] for i in rng.integers(0, len(reports), 8) for _ in range(8)]
        with torch.no_grad():
            text = encode_prompts(c, prompts).float()
            neg = encode_prompts(c, [""] * len(prompts)).float()
            cond = ace(text) if ace is not None else text
            tr = sample_with_logprob(c.unet, c.vae, c.scheduler, cond, neg, num_steps=steps, guidance_scale=gs, eta=eta,
                                     generator=torch.Generator().manual_seed(1000 + seed))
        r, _ = reward(tr.images, prompts)
        adv = torch.as_tensor(PerPromptStatTracker(32, 8).update(prompts, r.numpy()), dtype=torch.float32).clamp(-5, 5)
        n_j, cos_j = [], []
        for j in range(steps):
            halves = []
            for idx in (torch.arange(0, 32), torch.arange(32, 64)):
                x, t = tr.latents[idx, j], tr.timesteps[idx, j]
                eps = guided_eps(c.unet, x, t, cond[idx], neg[idx], gs)
                _, logp = ddim_step_with_logprob(c.scheduler, eps, t, x, eta=eta, prev_sample=tr.latents[idx, j + 1])
                g = torch.autograd.grad(-(adv[idx] * logp).mean(), params)
                halves.append(torch.cat([x.flatten() for x in g]))
            n_j.append(0.5 * float(halves[0].norm() + halves[1].norm()))
            cos_j.append(float(torch.nn.functional.cosine_similarity(halves[0], halves[1], dim=0)))
        norms.append(n_j)
        coss.append(cos_j)
        print(f"draw {seed}: |g_j| {' '.join(f'{x:.3g}' for x in n_j)}", flush=True)
        print(f"draw {seed}: cos   {' '.join(f'{x:+.2f}' for x in cos_j)}", flush=True)
    norms, coss = np.array(norms), np.array(coss)
    share = (norms**2) / (norms**2).sum(axis=1, keepdims=True)
    print("step            " + " ".join(f"{j:>6d}" for j in range(steps)))
    print("|g_j| mean      " + " ".join(f"{x:6.3g}" for x in norms.mean(0)))
    print("share of |g|^2  " + " ".join(f"{x:6.3f}" for x in share.mean(0)))
    print("cos(halves)     " + " ".join(f"{x:+6.2f}" for x in coss.mean(0)))


if __name__ == "__main__":
    main()
