"""DDPO on a fixed set of CXR reports (so every epoch measures the same reports), with the
workspace's RL settings and a chosen reward mix; ``--shuffle`` permutes the rewards within
each report group before the advantages are computed (noise advantages, same logged means):
the control for how far a policy drifts when its gradient carries no signal.

    python docs/experiments/cxr_fixed_reports.py <workspace> <out_dir> [--shuffle] \
        [--reports 8 --epochs 20 --seed 0 --weights 0,0,10 --no-ace --set key=value ...]

Writes <out_dir>/rewards.csv (the trainer's per-epoch log, incl. reward_gain_vs_base).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from medrl.rewards.cxr import CXRReward
from medrl.rl.trainer import DDPOConfig, train_ddpo

from cxr_reward_variance import train_reports  # noqa: E402  (same folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--reports", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default="0,0,10", help="l_align,l_diag,l_consist")
    ap.add_argument("--no-ace", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="DDPOConfig field=JSON value, e.g. lr=0.001")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ws = a.workspace
    rl = yaml.safe_load((ws / "params.yaml").read_text())["rl"]
    reports, labels = train_reports(ws)
    sel = [reports[i] for i in np.random.default_rng(123).choice(len(reports), a.reports, replace=False)]
    l_align, l_diag, l_consist = (float(v) for v in a.weights.split(","))
    m = ws / "data/models/cxr"
    reward = CXRReward(m / "aligner", m / "diag", m / "dualenc", l_align=l_align, l_diag=l_diag, l_consist=l_consist,
                       rlcf=True, rlcf_mode="bank", labels_for=labels.__getitem__,
                       anchor_bank=m / "anchor_bank/bank.csv")
    shuffler = np.random.default_rng(7)

    def reward_fn(images, prompts, anchor_images=None):
        r, terms = reward(images, prompts, anchor_images=anchor_images)
        if a.shuffle and images is not anchor_images:  # the base model's scoring stays true
            r, p = r.clone(), np.asarray(prompts)
            for q in set(prompts):
                idx = np.flatnonzero(p == q)
                r[idx] = r[idx[shuffler.permutation(len(idx))]]
        return r, terms

    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    cfg = DDPOConfig.from_params(rl["common"], rl["cxr"], use_ace=not a.no_ace, ace_tokens=rl["cxr"]["ace_tokens"],
                                 epochs=a.epochs, seed=a.seed, **overrides)
    summary = train_ddpo(m / "base", a.out, reward_fn=reward_fn,
                         prompt_fn=lambda rng, n: [sel[i] for i in rng.choice(len(sel), n, replace=len(sel) < n)],
                         cfg=cfg, ckpt_dir=a.out / "ckpt")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
