"""How much of each CXR reward term's variance within a report the base model's x_T fixes
(no action can change it, so DDPO's likelihood-ratio gradient gets no credit for it) and how
much the per-step noise (the actions) decides; plus the terms' within-report correlations.

    python docs/experiments/cxr_reward_variance.py <workspace> [--reports 8 --xt 6 --noise 4]
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
from medrl.diffusion.rollout import initial_latents, sample_with_logprob

TERMS = ("r_align", "raw_diag", "raw_consist")


def train_reports(ws: Path) -> tuple[list[str], dict[str, dict[str, float]]]:
    pairs = pd.read_csv(ws / "data/prepared/cxr/pairs.csv")
    train = pairs[pairs.split == "train"]
    labels = {r["impression"]: {k: r[k] for k in PATHOLOGIES} for r in train.to_dict("records")}
    return sorted(labels), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--reports", type=int, default=8)
    ap.add_argument("--xt", type=int, default=6, help="initial noises per report")
    ap.add_argument("--noise", type=int, default=4, help="per-step noise draws per x_T")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ws, R, X, S = a.workspace, a.reports, a.xt, a.noise
    common = yaml.safe_load((ws / "params.yaml").read_text())["rl"]["common"]
    reports, labels = train_reports(ws)
    sel = [reports[i] for i in np.random.default_rng(123).choice(len(reports), R, replace=False)]
    m = ws / "data/models/cxr"
    reward = CXRReward(m / "aligner", m / "diag", m / "dualenc", rlcf=False, labels_for=labels.__getitem__)
    c = load_components(str(m / "base"))
    out = {k: np.zeros((R, X, S)) for k in TERMS}
    with torch.no_grad():
        neg = encode_prompts(c, [""]).float().expand(X * S, -1, -1)
        for i, rep in enumerate(sel):
            text = encode_prompts(c, [rep] * (X * S)).float()
            x_T = initial_latents(c.unet, X, torch.Generator().manual_seed(1000 + i)).repeat_interleave(S, 0)
            gens = [torch.Generator().manual_seed(10_000 * i + j) for j in range(X * S)]
            traj = sample_with_logprob(c.unet, c.vae, c.scheduler, text, neg, num_steps=common["num_steps"],
                                       guidance_scale=common["guidance_scale"], eta=common["eta"],
                                       generator=gens, latents=x_T)
            _, terms = reward(traj.images, [rep] * (X * S))
            for k in TERMS:
                out[k][i] = terms[k].numpy().reshape(X, S)
    for k, v in out.items():
        step_var = v.var(axis=2, ddof=1).mean()  # x_T fixed
        total = v.reshape(R, -1).var(axis=1, ddof=1).mean()  # within report
        print(f"{k:12s} within-report var {total:.5f}  fixed by x_T {1 - step_var / total:.2f}  "
              f"within-report std {np.sqrt(total):.3f}")
    centred = {k: (v.reshape(R, -1) - v.reshape(R, -1).mean(1, keepdims=True)).ravel() for k, v in out.items()}
    for i, p in enumerate(TERMS):
        for q in TERMS[i + 1:]:
            print(f"within-report corr({p}, {q}) {np.corrcoef(centred[p], centred[q])[0, 1]:+.2f}")


if __name__ == "__main__":
    main()
