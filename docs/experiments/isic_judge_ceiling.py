"""Is the APR ceiling bounded by the VAE or by the H=4 judge (NOTEBOOK ISIC-18)?

The H=4 evaluator's per-head AUROC, recall and false rate (cut 0.5) and the exact-set APR on real
phantoms of a split it was not trained on, as they are and after a round trip through the stack's
VAE: the pipeline's ceiling row (``vae_artifact_ceiling``) on another split than its test split, so
that a render or judge can be chosen without the test images. A high AUROC with a low recall
points at the cut; a low AUROC at what the round trip leaves.

``--train SPLIT --epochs N [--batch-size B] --out DIR``: first train a fresh judge with the H=4 recipe (the
workspace's ``classifiers.isic`` and image size) on SPLIT's images and their round trips, then score it.
Training on the larger ``train`` split and scoring on ``cls_b`` asks whether more data would help.
``--occlusion``: instead, how much of each drawn artifact the layers above it leave visible, from the
renderer's masks (an artifact labelled present can be hidden by the dark corner, bubbles or patches).

    python docs/experiments/isic_judge_ceiling.py <workspace> [--split train]
    python docs/experiments/isic_judge_ceiling.py <workspace> --train train --epochs 8 --split cls_b --out DIR
    python docs/experiments/isic_judge_ceiling.py <workspace> --occlusion
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medrl.data.prompts import ARTIFACTS4
from medrl.config import load_params
from medrl.diffusion.latents import add_vae_roundtrips
from medrl.io import read_table
from medrl.metrics.isic_eval import vae_artifact_ceiling
from medrl.models.classifiers import train_classifier


def _params(workspace: Path):
    return load_params(workspace / "params.yaml", check_paths=False)


def _items(workspace: Path) -> pd.DataFrame:
    items = read_table(workspace / "data/prepared/isic/items.csv", ["path", "split", *ARTIFACTS4])
    return items.assign(path=[str(workspace / p) for p in items["path"]])


def train_judge(workspace: Path, split: str, epochs: int, out: Path, seed: int, batch_size: int = 32) -> Path:
    """A judge with the H=4 recipe trained on ``split`` and its round trips; returns its folder."""
    p = _params(workspace)
    k, size = p.classifiers.isic, p.isic.prepare.size
    items = add_vae_roundtrips(workspace / "data/models/isic/stack", _items(workspace), split, out / "roundtrips", size=size)
    train_classifier(items, list(ARTIFACTS4), out / "clf", train_split=split, eval_split=split, size=size,
                     epochs=epochs, batch_size=batch_size, lr=k.lr, seed=seed, imagenet_weights=k.imagenet_weights,
                     ckpt_dir=out / "ckpt", pixel_branch=k.pixel_branch)
    return out / "clf"


def judge_report(workspace: Path, clf_dir: Path, split: str, n: int = 512) -> dict:
    """Per head AUROC / recall / false rate and APR, real and through the VAE, on ``split``
    (``vae_artifact_ceiling``, the pipeline's ceiling row, on another split)."""
    p, clf_dir = _params(workspace), clf_dir.resolve()
    os.chdir(workspace)  # items.csv paths are relative to the workspace
    full = vae_artifact_ceiling("data/models/isic/stack", "data/prepared/isic", clf_dir,
                                size=p.isic.prepare.size, n_boot=200, ci=0.95, seed=0, max_images=n, split=split)
    out: dict = {"split": split, "n": full["n_images"]}
    for block in ("real", "vae_roundtrip"):
        b = full[block]
        out[block] = {"apr": [round(b["apr"][k], 3) for k in ("value", "lo", "hi")],
                      **{h: {"auroc": b["auroc"][h], "recall": b["fires_when_present"][h],
                             "false": b["fires_when_absent"][h]} for h in full["heads"]}}
    return json.loads(json.dumps(out), parse_float=lambda v: round(float(v), 3))


def visible_shares(workspace: Path, n: int = 400) -> dict:
    """Per prompt artifact: the share of its drawn pixels (masks at the phantoms' size) that no later layer covers,
    over the first ``n`` phantoms that have it (quantiles, and the share of images under 30 %)."""
    from medrl.data.phantoms.derm import ARTIFACTS, render_derm

    phantom = _params(workspace).isic.phantom
    labels = pd.read_csv(workspace / "data/datasets/isic/labels.csv").head(n)
    shares: dict[str, list[float]] = {a: [] for a in ARTIFACTS4}
    for i, row in labels.iterrows():
        _, masks = render_derm({k: int(row[k]) for k in ["MEL", "NV", *ARTIFACTS]}, phantom.size, phantom.seed, int(i),
                               return_masks=True)
        drawn = list(masks)  # drawing order
        for a in ARTIFACTS4:
            if a in masks and masks[a].any():
                above = [masks[b] for b in drawn[drawn.index(a) + 1:] if b != "gel_border"]
                covered = np.logical_or.reduce(above) if above else np.zeros_like(masks[a])
                shares[a].append(float((masks[a] & ~covered).sum() / masks[a].sum()))
    return {a: {"n": len(v), "q05_q25_q50": np.round(np.quantile(v, [0.05, 0.25, 0.5]), 2).tolist(),
                "under_30pct": round(float(np.mean(np.array(v) < 0.3)), 3)} for a, v in shares.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--split", default="train", help="split scored (not the judge's own training split)")
    ap.add_argument("--train", help="train a fresh judge on this split first")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32, help="images per step of the fresh judge")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("judge_ceiling"))
    ap.add_argument("--occlusion", action="store_true", help="only the visible share of each drawn artifact")
    a = ap.parse_args()
    if a.occlusion:
        print(json.dumps(visible_shares(a.workspace), indent=1))
        return
    torch.set_grad_enabled(False)
    if a.train:
        with torch.enable_grad():
            clf_dir = train_judge(a.workspace, a.train, a.epochs, a.out, a.seed, a.batch_size)
    else:
        clf_dir = a.workspace / "data/models/isic/clf_h4"
    print(json.dumps(judge_report(a.workspace, clf_dir, a.split), indent=1))


if __name__ == "__main__":
    main()
