"""What does the tiny VAE lose of ink and gel bubbles? Train the workspace's stack VAE further,
or a fresh one with changed architecture, with the workspace's `models.vae_train` settings (a
fresh optimizer and warm-up, the seed after its own) plus optional colour losses, and score
real held-out images before / after a round trip with the workspace's classifiers
(`vae_artifact_ceiling`: APR and per-head recall through the VAE; and the global colour error).

    python docs/experiments/isic_vae_continue.py <workspace> <out_dir> [--steps 1200 --edge-weight W]
        [--chroma-weight W | --focus-weight W]          # continue the stack's VAE
    python docs/experiments/isic_vae_continue.py <workspace> <out_dir> --steps 0   # score the stack's VAE only
    python docs/experiments/isic_vae_continue.py <workspace> <out_dir> --latent-channels 8 --norm-groups 4
        # a fresh VAE: the workspace's models.tiny with these changed, trained --steps from scratch
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import torch

from medrl.config import load_params
from medrl.metrics.isic_eval import vae_artifact_ceiling
from medrl.diffusion.stack import build_tiny_vae, load_vae
from medrl.diffusion.vae_train import load_images, train_vae


@torch.no_grad()
def colour_error(stack_dir: Path, size: int) -> list[float]:
    """Per RGB channel, mean over the test images of |mean colour of the round trip - mean
    colour of the image| in [0, 1] units: how much of each image's overall colour the VAE keeps."""
    items = pd.read_csv("data/prepared/isic/items.csv")
    x = load_images([Path(p) for p in items[items.split == "test"].path], size, "RGB")
    vae = load_vae(str(stack_dir))
    rec = torch.cat([vae.decode(vae.encode(x[i:i + 64]).latent_dist.mean).sample.clamp(-1, 1)
                     for i in range(0, len(x), 64)])
    return ((rec.mean((2, 3)) - x.mean((2, 3))) / 2).abs().mean(0).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--edge-weight", type=float, help="default: the workspace's models.vae_train.edge_weight")
    ap.add_argument("--chroma-weight", type=float, default=0.0, help="medrl.diffusion.vae_train.chroma_loss weight")
    ap.add_argument("--focus-weight", type=float, default=0.0, help="medrl.diffusion.vae_train.colour_focus_loss weight")
    ap.add_argument("--norm-groups", type=int, default=0, help="fresh VAE with these GroupNorm groups")
    ap.add_argument("--latent-channels", type=int, default=0, help="fresh VAE with this many latent channels")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = a.out.resolve()
    os.chdir(a.workspace)  # items.csv paths are relative to the workspace
    params = load_params("params.yaml", check_paths=False)
    vt, size = params.models.vae_train, params.isic.prepare.size
    stack = Path("data/models/isic/stack")
    vae_dir = stack
    if a.steps:
        items = pd.read_csv("data/prepared/isic/items.csv")
        train = [Path(p) for p in items[items.split == "train"].path]
        if a.latent_channels or a.norm_groups:
            tiny = params.models.tiny.model_dump()
            tiny.update({k: v for k, v in (("latent_channels", a.latent_channels),
                                           ("vae_norm_groups", a.norm_groups)) if v})
            vae = build_tiny_vae(tiny, size, vt.seed)
        else:
            vae = load_vae(str(stack))
        edge = vt.edge_weight if a.edge_weight is None else a.edge_weight
        m = train_vae(vae, train, size=size, mode="RGB", steps=a.steps, batch_size=vt.batch_size, lr=vt.lr,
                      kl_weight=vt.kl_weight, seed=vt.seed + 1, ckpt_dir=out / "ckpt", edge_weight=edge,
                      chroma_weight=a.chroma_weight, focus_weight=a.focus_weight)
        print("vae", {k: round(v, 4) for k, v in m.items()})
        vae_dir = out / "stack"  # vae_artifact_ceiling reads a whole stack directory
        shutil.copytree(stack, vae_dir, dirs_exist_ok=True)
        vae.save_pretrained(vae_dir / "vae")
    res = {"colour_error": colour_error(vae_dir, size)}
    print("global colour error R/G/B", [round(v, 4) for v in res["colour_error"]])
    for clf in ("clf_h6", "clf_h4"):
        o = vae_artifact_ceiling(vae_dir, "data/prepared/isic", f"data/models/isic/{clf}", size=size, n_boot=200,
                                 ci=0.95, seed=0)
        res[clf] = o
        for k in ("real", "vae_roundtrip"):
            print(clf, k, "APR", round(o[k]["apr"]["value"], 3), "recall",
                  {h: round(v, 2) for h, v in o[k]["fires_when_present"].items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
