"""How much the ISIC base model's text condition changes when a prompt asks for one more
artifact, per lesion (NOTEBOOK ISIC-13).

For every artifact subset of the 32 evaluation prompts and every artifact not in it, the prompt
with the artifact added is encoded by the base model's text encoder; the figure is the mean of
||e(with) - e(without)|| / ||e(without)|| over the whole token sequence (the UNet's cross-attention
sees every token). Near 0: the condition no longer says whether the artifact was asked for, so
nothing downstream of the text encoder (the UNet, its RL LoRA) can follow that request.
``--adapters``: the same for the text encoders of RL runs trained with ``text_lora_rank`` (ISIC-14).

    python docs/experiments/isic_text_condition.py <workspace> [<workspace> ...] [--adapters DIR ...]
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from medrl.data.prompts import ARTIFACTS4, labels_to_prompt
from medrl.diffusion.lora import load_adapter
from medrl.diffusion.stack import encode_prompts, load_components


def condition_change(base_dir: Path, adapter: Path | None = None) -> dict[str, dict[str, float]]:
    """lesion -> artifact -> mean relative change of the text condition when it is added."""
    c = load_components(str(base_dir))
    if adapter is not None:
        load_adapter(c.unet, adapter, text_encoder=c.text_encoder)
    out: dict[str, dict[str, float]] = {}
    for lesion in ("MEL", "NV"):
        change: dict[str, list[float]] = {a: [] for a in ARTIFACTS4}
        for bits in itertools.product((0, 1), repeat=len(ARTIFACTS4)):
            labels = {**dict(zip(ARTIFACTS4, bits)), "MEL": int(lesion == "MEL"), "NV": int(lesion == "NV")}
            for a in (a for a in ARTIFACTS4 if not labels[a]):
                with torch.no_grad():
                    e = encode_prompts(c, [labels_to_prompt(labels), labels_to_prompt({**labels, a: 1})]).float()
                change[a].append(float((e[1] - e[0]).norm() / e[0].norm()))
        out[lesion] = {a: sum(v) / len(v) for a, v in change.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workspaces", type=Path, nargs="+")
    ap.add_argument("--adapters", nargs="*", default=[], help="RL adapter dirs (data/rl/isic/seed_N/adapter), "
                    "scored on the first workspace's base")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = args.workspaces[0] / "data/models/isic/base"
    runs = [(str(ws), ws / "data/models/isic/base", None) for ws in args.workspaces]
    runs += [(a, base, Path(a)) for a in args.adapters]
    for name, base_dir, adapter in runs:
        for lesion, per_artifact in condition_change(base_dir, adapter).items():
            print(f"{name} {lesion}: " + "  ".join(f"{a} {v:.3f}" for a, v in per_artifact.items()))


if __name__ == "__main__":
    main()
