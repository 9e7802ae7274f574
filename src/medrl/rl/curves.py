"""The reward curve of one DDPO run as a PNG, from its rewards.csv."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medrl.io import atomic_path


def plot_reward_curve(rewards: pd.DataFrame, out_png: Path, *, title: str = "") -> Path:
    """Mean training reward per epoch (band: +-1 s.e. over the epoch's samples) and, where logged,
    the paired gain over the frozen base on fixed prompts and noise (+-1 s.e.)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    epoch = rewards["epoch"].to_numpy()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
    mean = rewards["reward_mean"].to_numpy()
    se = rewards["reward_std"].to_numpy() / np.sqrt(rewards["samples"].to_numpy().clip(1))
    axes[0].plot(epoch, mean, marker="o", ms=3)
    axes[0].fill_between(epoch, mean - se, mean + se, alpha=0.25)
    axes[0].set(xlabel="epoch", ylabel="mean reward", title="training reward")
    if "reward_gain_vs_base" in rewards:
        g = rewards.dropna(subset=["reward_gain_vs_base"])
        axes[1].errorbar(g["epoch"], g["reward_gain_vs_base"], yerr=g.get("reward_gain_vs_base_se"), marker="o", ms=3,
                         capsize=2)
        axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[1].set(xlabel="epoch", ylabel="policy - base", title="gain over the frozen base")
    if title:
        fig.suptitle(title)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out_png
