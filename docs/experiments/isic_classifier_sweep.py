"""Why the ISIC classifiers are blind to gel bubbles and ink: per-head AUROC of an H=6
EfficientNet-B0 trained with `train_classifier` under one setting (test and train split),
and a one-feature colour baseline on the same test images.

    python docs/experiments/isic_classifier_sweep.py <workspace> <out_dir> [--epochs 15 --lr 1e-3
        --size 64 --batch-size 32 --no-reg --max-pool --stem-stride 1 --pixel-branch 32]
    python docs/experiments/isic_classifier_sweep.py <workspace> --baseline [--model <clf dir>]

--baseline skips training: colour-feature AUROC (share of purple pixels for ink, of near-white
pixels for gel bubbles) and, with --model, that classifier's AUROC on train and test splits.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from medrl.io import load_image
from medrl.models import classifiers as C

HEADS6 = ["hair", "gel_bubble", "ruler", "ink", "MEL", "NV"]


def colour_baseline(items: pd.DataFrame) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    test = items[items.split == "test"]
    x = torch.stack([load_image(p) for p in test.path]).numpy()  # (N, 3, H, W)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    purple = ((b - r > 0.05) & (b - g > 0.15)).mean(axis=(1, 2))
    white = (x.min(axis=1) > 0.9).mean(axis=(1, 2))
    return {"ink": roc_auc_score(test.ink, purple), "gel_bubble": roc_auc_score(test.gel_bubble, white)}


def split_aurocs(model_dir: Path, items: pd.DataFrame) -> dict[str, dict[str, float]]:
    model = C.load_classifier(model_dir)
    out = {}
    for split in ("train", "test"):
        rows = items[items.split == split]
        probs = C.predict_probs(model, rows, desc=split)
        out[split] = {h: C.binary_metrics(probs[:, j], rows[h].to_numpy())["auroc"] for j, h in enumerate(model.heads)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--no-reg", action="store_true", help="no dropout, no stochastic depth")
    ap.add_argument("--max-pool", action="store_true", help="global max instead of average pooling")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pixel-branch", type=int, default=0, help="classifiers.isic.pixel_branch (0 = plain EfficientNet)")
    ap.add_argument("--stem-stride", type=int, default=2, help="1 keeps full resolution in the first block")
    a = ap.parse_args()
    torch.set_num_threads(1)
    os.chdir(a.workspace)  # items.csv paths are relative to the workspace
    items = pd.read_csv("data/prepared/isic/items.csv")
    if a.baseline:
        print("colour feature AUROC", {k: round(v, 3) for k, v in colour_baseline(items).items()})
        if a.model:
            for split, m in split_aurocs(a.model.resolve() if a.model.is_absolute() else a.model, items).items():
                print(split, {k: round(v, 3) for k, v in m.items()})
        return
    if a.out is None:
        ap.error("out_dir is needed unless --baseline")
    build = C.build_classifier

    def variant(heads, **kw):
        import torchvision

        if a.no_reg:  # torchvision's defaults are dropout 0.2, stochastic depth 0.2
            orig = torchvision.models.efficientnet_b0
            torchvision.models.efficientnet_b0 = lambda weights=None: orig(weights=weights, dropout=0.0,
                                                                           stochastic_depth_prob=0.0)
        try:
            m = build(heads, **kw)
        finally:
            if a.no_reg:
                torchvision.models.efficientnet_b0 = orig
        if a.max_pool:
            m.net.avgpool = nn.AdaptiveMaxPool2d(1)
        if a.stem_stride != 2:  # same weights, finer feature maps
            m.net.features[0][0].stride = (a.stem_stride, a.stem_stride)
        return m

    C.build_classifier = variant  # train_classifier builds through the module attribute
    out = a.out.resolve()
    m = C.train_classifier(items, HEADS6, out, train_split="train", eval_split="test", size=a.size, epochs=a.epochs,
                           batch_size=a.batch_size, lr=a.lr, seed=0, imagenet_weights=None, ckpt_dir=out.with_suffix(".ckpt"),
                           pixel_branch=a.pixel_branch)
    print({k: round(v, 3) for k, v in m.items() if k.startswith("auroc")})


if __name__ == "__main__":
    main()
