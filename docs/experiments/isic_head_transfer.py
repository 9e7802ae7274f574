"""RL - SD per classifier head on held-out samples, under the reward (H=6) and the metric
(H=4) classifier: which heads carry a reward gain, and does it reach APR?

    python docs/experiments/isic_head_transfer.py <workspace> [--bootstrap 1000]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medrl.io import load_image
from medrl.metrics.apr import read_manifest
from medrl.rewards.isic import ArtifactReward


def head_matches(ws: Path, model: str, clfs: dict[str, ArtifactReward]) -> pd.DataFrame:
    """Per image: reward, all-artifacts-right and per-head match under each classifier."""
    man = read_manifest(ws / f"data/samples/isic/{'sd' if model == 'sd' else 'rl/seed_0'}/manifest.csv")
    x = torch.stack([load_image(p) for p in man["path"]])
    cols = {}
    for name, clf in clfs.items():
        r, terms = clf(x, list(man["prompt"]))
        cols[f"{name}_reward"] = r.numpy()
        cols.update({f"{name}_{k}": v.numpy() for k, v in terms.items()})
    return pd.DataFrame(cols, index=pd.MultiIndex.from_arrays([man["prompt"], man["seed"]]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--bootstrap", type=int, default=1000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    clfs = {h: ArtifactReward(a.workspace / f"data/models/isic/clf_{h}") for h in ("h6", "h4")}
    sd, rl = head_matches(a.workspace, "sd", clfs), head_matches(a.workspace, "rl", clfs)
    rl = rl.loc[sd.index]  # same prompt and seed: a paired comparison
    rng = np.random.default_rng(0)
    n = len(sd)
    idx = rng.integers(0, n, (a.bootstrap, n))
    for col in sd.columns:
        d = rl[col].to_numpy() - sd[col].to_numpy()
        lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
        print(f"{col:22s} SD {sd[col].mean():.3f}  RL {rl[col].mean():.3f}  RL-SD {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")


if __name__ == "__main__":
    main()
