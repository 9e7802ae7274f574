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
from medrl.diffusion.vae_train import edge_loss, load_images, train_vae


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



# The colour terms of NOTEBOOK ISIC-06/07: measured, not adopted, so they live here, not in the library.
def _opponent(t: torch.Tensor, who: str) -> torch.Tensor:
    """Two opponent-colour channels of (B, 3, H, W): R - G and B - (R + G) / 2 (no luminance)."""
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"{who}: expected RGB images (B, 3, H, W), got {tuple(t.shape)}")
    r, g, b = t[:, 0], t[:, 1], t[:, 2]
    return torch.stack([r - g, b - (r + g) / 2], dim=1)


def chroma_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 plus ``edge_loss`` on two opponent-colour channels (R - G, B - (R + G) / 2) of
    (B, 3, H, W) images: the hue of a thin stroke (purple ink on skin) is a small share of an
    image's RGB error, and a VAE can return the stroke's shape in grey at little cost; this
    term prices the hue on its own (NOTEBOOK ISIC-06)."""
    o_rec, o_x = _opponent(rec, "chroma_loss"), _opponent(x, "chroma_loss")
    return (o_rec - o_x).abs().mean() + edge_loss(o_rec, o_x)


def colour_focus_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """RGB L1 weighted per pixel by how far the target's colour is from the image's median
    colour (opponent channels; 0 on plain skin, ~0.5 on purple ink or a red vessel in [-1, 1]
    units). A round trip that turns every thin coloured stroke dark grey -- what the tiny VAE
    does with ink, vessels and colour charts, which together are ~1 % of the pixels -- costs
    little under a plain L1 and most of this term."""
    if rec.shape != x.shape:
        raise ValueError(f"colour_focus_loss: reconstruction {tuple(rec.shape)} and target {tuple(x.shape)} differ")
    o = _opponent(x, "colour_focus_loss")
    dev = (o - o.flatten(2).median(dim=2).values[..., None, None]).norm(dim=1, keepdim=True)
    return (dev * (rec - x).abs()).mean()


@torch.no_grad()
def colour_losses(chroma_weight: float, focus_weight: float) -> dict:
    """train_vae's extra_losses for the given weights (zero weights left out)."""
    terms = {"chroma_weight": (chroma_weight, chroma_loss), "focus_weight": (focus_weight, colour_focus_loss)}
    return {k: v for k, v in terms.items() if v[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--edge-weight", type=float, help="default: the workspace's models.vae_train.edge_weight")
    ap.add_argument("--chroma-weight", type=float, default=0.0, help="chroma_loss weight (below)")
    ap.add_argument("--focus-weight", type=float, default=0.0, help="colour_focus_loss weight (below)")
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
                      extra_losses=colour_losses(a.chroma_weight, a.focus_weight))
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
