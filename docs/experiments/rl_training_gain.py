"""Paired training gain of an RL run against the frozen base, from its rewards.csv (written by
`rl_isic` / `rl_cxr` with `rl.common.log_base_reward`): mean over epochs 1.. (epoch 0 is
sampled before any update) and over the last 8, with standard errors over epochs, and the
same for every per-term `<term>_gain_vs_base` column; optionally per block of epochs.

    python docs/experiments/rl_training_gain.py <data/rl/.../rewards.csv> [--periods 1,10,20,30]
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd


def _mean_se(x: pd.Series) -> str:
    return f"{x.mean():+.4f} ({x.std(ddof=1) / np.sqrt(len(x)):.4f})" if len(x) > 1 else f"{x.mean():+.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rewards")
    ap.add_argument("--periods", help="epoch boundaries, e.g. 1,10,20,30: epochs 1-9, 10-19, 20-29")
    a = ap.parse_args()
    d = pd.read_csv(a.rewards)
    if "reward_gain_vs_base" not in d:
        raise SystemExit(f"{a.rewards}: no reward_gain_vs_base column; run with rl.common.log_base_reward: true")
    g = d["reward_gain_vs_base"]
    print(f"{len(d)} epochs; gain, epochs 1-{len(d) - 1}: {_mean_se(g[1:])}; last 8: {_mean_se(g[-8:])}; "
          f"above the base in {(g[1:] > 0).sum()} of {len(g) - 1}")
    terms = [c for c in d.columns if c.endswith("_gain_vs_base") and c != "reward_gain_vs_base"
             and not c.startswith(("psi_", "anchor_", "raw_"))]
    for c in terms:
        print(f"  {c}: {_mean_se(d[c][1:])}")
    if a.periods:
        b = [int(x) for x in a.periods.split(",")]
        for lo, hi in zip(b, b[1:]):
            print(f"epochs {lo}-{hi - 1}: {_mean_se(g[lo:hi])}; " + ", ".join(
                f"{c.removesuffix('_gain_vs_base')} {d[c][lo:hi].mean():+.4f}" for c in terms))


if __name__ == "__main__":
    main()
