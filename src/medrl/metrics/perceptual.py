"""Perceptual distance (LPIPS) between real and generated images of the same prompt.

The LPIPS construction (Zhang et al. 2018): for layers k of a network, unit-normalise the
features over channels, take the squared difference, weight channels with non-negative
weights w_k (a 1x1 conv), average over space and sum over layers::

    d(x, y) = sum_k mean_hw sum_c w_kc (f_k(x)/|f_k(x)| - f_k(y)/|f_k(y)|)^2

Two ways to get a ``PerceptualNet`` (its ``name`` is part of every result and goes into tables):

* ``lpips_from_local(path)`` — real runs: true LPIPS (AlexNet or VGG-16, v0.1 linear weights).
  Built with torchmetrics' LPIPS module (``torchmetrics.functional.image.lpips._LPIPS``) with
  ``pnet_rand=True, pretrained=False`` so nothing is downloaded; the ImageNet backbone comes
  from the LOCAL file ``metrics.lpips_weights`` (a torchvision ``alexnet``/``vgg16`` state
  dict, or a full LPIPS state dict) and the linear weights from that file if present, else
  from the LPIPS v0.1 file shipped inside the torchmetrics wheel. All loads are
  ``weights_only=True`` / safetensors.
* ``perceptual_net_from_sequential(seq, taps, ...)`` — embedded default: the same
  construction on a pipeline-trained classifier's intermediate features (e.g. the ISIC
  EfficientNet-B0: ``model.features`` with taps ``EFFICIENTNET_B0_TAPS``) with uniform
  (untrained) channel weights w = 1, which is the LPIPS paper's ``lin=False`` baseline. Name it
  honestly, e.g. ``construction_name("EfficientNet-B0 (phantom-trained)")``.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from medrl.errors import DataError
from medrl.io import load_image
from medrl.metrics.bootstrap import bootstrap_ci
from medrl.metrics.fidelity import item_key
from medrl.progress import progress

# torchvision EfficientNet-B0 ``features`` stages tapped for the LPIPS construction: outputs at
# strides 2, 4, 8, 16, 32 (16, 24, 40, 112, 320 channels), like LPIPS' five AlexNet/VGG taps.
EFFICIENTNET_B0_TAPS = (1, 2, 3, 5, 7)


def construction_name(backbone: str) -> str:
    """Honest name of the embedded-default measure, e.g. for 'EfficientNet-B0 (phantom-trained)'."""
    return f"LPIPS-construction on {backbone} features, uniform weights"


@dataclass(eq=False)
class PerceptualNet:
    """A feature network plus channel weights for the LPIPS construction.

    ``layers(x)`` takes the preprocessed batch (B, in_channels, S, S) and returns the list of
    tapped feature maps. Preprocessing of [0, 1] RGB images: resize to ``input_size``
    (bilinear, antialiased) -> channel mean if ``in_channels == 1`` -> ``(x - mean) / std``.
    ``weights``: one non-negative (C_k,) tensor per layer, or None for uniform weights of 1."""

    name: str
    module: nn.Module
    layers: Callable[[torch.Tensor], Sequence[torch.Tensor]]
    weights: list[torch.Tensor] | None = None
    input_size: int | None = None
    in_channels: int = 3
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        if self.in_channels == 1:
            x = x.mean(dim=1, keepdim=True)
        c = x.shape[1]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).expand(c).view(1, c, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).expand(c).view(1, c, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised (over channels) feature maps of [0, 1] images."""
        feats = self.layers(self.preprocess(x))
        return [f / torch.sqrt(1e-8 + (f * f).sum(dim=1, keepdim=True)) for f in feats]

    @torch.no_grad()
    def distance_from_features(self, fa: Sequence[torch.Tensor], fb: Sequence[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(fa[0].shape[0], device=fa[0].device)
        for k, (a, b) in enumerate(zip(fa, fb)):
            d = (a - b) ** 2
            if self.weights is not None:
                w = self.weights[k].to(d.device, d.dtype).view(1, -1, 1, 1)
                d = d * w
            total = total + d.sum(dim=1).mean(dim=(1, 2))
        return total

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) distances between two [0, 1] batches."""
        return self.distance_from_features(self.features(x), self.features(y))


def sequential_taps(seq: nn.Sequential, taps: Sequence[int]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """Run ``seq`` and return the outputs of the children at indices ``taps``."""
    taps = sorted(set(int(t) for t in taps))
    if not taps or taps[0] < 0 or taps[-1] >= len(seq):
        raise DataError(f"taps {taps}: expected indices into a Sequential of length {len(seq)}")

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, block in enumerate(seq):
            x = block(x)
            if i in taps:
                out.append(x)
            if i == taps[-1]:
                break
        return out

    return run


def perceptual_net_from_sequential(
    seq: nn.Sequential, taps: Sequence[int], *, name: str, input_size: int | None = None, in_channels: int = 3,
    mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
) -> PerceptualNet:
    """LPIPS construction with uniform weights on a (trained) Sequential feature stack."""
    seq.eval()
    return PerceptualNet(name=name, module=seq, layers=sequential_taps(seq, taps), weights=None,
                         input_size=input_size, in_channels=in_channels, mean=tuple(mean), std=tuple(std))


# ----------------------------------------------------------------------------- real LPIPS


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for us
        raise DataError(f"{path}: not a loadable state dict ({e}); expected a .pth/.safetensors state dict") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise DataError(f"{path}: holds a {type(sd).__name__}; expected a state dict")
    return sd


_SLICES = {  # torchvision `features` index -> torchmetrics LPIPS slice, as in torchmetrics' Alexnet/Vgg16
    "alex": [range(0, 2), range(2, 5), range(5, 8), range(8, 10), range(10, 12)],
    "vgg": [range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30)],
}


def lpips_from_local(weights_path: str | Path, *, net_type: str | None = None) -> PerceptualNet:
    """True LPIPS from local files only (see module docstring)."""
    from torchmetrics.functional.image import lpips as tm_lpips

    path = Path(weights_path) if weights_path is not None else None
    if path is None or not path.is_file():
        raise DataError(f"{weights_path}: LPIPS backbone weights not found; expected a local torchvision alexnet/vgg16 "
                        "state dict (params: metrics.lpips_weights) — weights are never downloaded")
    sd = _load_state(path)
    if any(k.startswith("net.slice") for k in sd):  # a full LPIPS state dict
        backbone = {k: v for k, v in sd.items() if k.startswith("net.")}
        first = next(v for k, v in backbone.items() if k.endswith("weight"))
    elif "features.0.weight" in sd:
        first = sd["features.0.weight"]
        backbone = {}
    else:
        raise DataError(f"{path}: no 'features.0.weight' or 'net.slice*' keys; expected a torchvision alexnet/vgg16 "
                        "or LPIPS state dict")
    inferred = "alex" if tuple(first.shape[-2:]) == (11, 11) else "vgg"
    net = net_type or inferred
    if net not in _SLICES:
        raise DataError(f"LPIPS net {net!r}: expected 'alex' or 'vgg'")
    if net != inferred:
        raise DataError(f"{path}: looks like a {inferred} backbone but net_type={net!r}")
    if not backbone:
        for k, v in sd.items():
            if not k.startswith("features."):
                continue  # classifier head
            idx, rest = k.split(".", 2)[1:]
            slice_no = next(s for s, r in enumerate(_SLICES[net]) if int(idx) in r)
            backbone[f"net.slice{slice_no + 1}.{idx}.{rest}"] = v
    lins = {k: v for k, v in sd.items() if k.startswith("lin")}
    lin_source = path.name
    if not lins:
        packaged = Path(tm_lpips.__file__).parent / "lpips_models" / f"{net}.pth"
        if not packaged.is_file():
            raise DataError(f"{packaged}: torchmetrics' packaged LPIPS linear weights are missing")
        lins = torch.load(packaged, map_location="cpu", weights_only=True)
        lin_source = "torchmetrics-packaged v0.1"
    # _LPIPS registers each linear layer twice (lin<k> and lins.<k>): fill both names.
    lins = {**lins, **{re.sub(r"^lin(\d+)\.", r"lins.\1.", k): v for k, v in lins.items() if re.match(r"^lin\d+\.", k)},
            **{re.sub(r"^lins\.(\d+)\.", r"lin\1.", k): v for k, v in lins.items() if k.startswith("lins.")}}
    # pnet_rand=True -> torchvision builds the backbone with weights=None: no download.
    model = tm_lpips._LPIPS(pretrained=False, net=net, pnet_rand=True, use_dropout=True)
    missing, unexpected = model.load_state_dict({**backbone, **lins}, strict=False)
    if missing or unexpected:
        raise DataError(f"{path}: LPIPS state mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()

    def layers(x: torch.Tensor) -> list[torch.Tensor]:
        return list(model.net(model.scaling_layer(2.0 * x - 1.0)))

    weights = [lin.model[-1].weight.detach().reshape(-1) for lin in model.lins]
    return PerceptualNet(name=f"LPIPS ({net}, linear weights: {lin_source}; backbone: {path.name})", module=model,
                         layers=layers, weights=weights)


# ----------------------------------------------------------------------------- pairs


def _prompt_rng(seed: int, prompt: str) -> np.random.Generator:
    # Depends only on (seed, prompt): every model gets the same pair indices for a prompt.
    return np.random.default_rng([int(seed), zlib.crc32(prompt.encode())])


def _first_size(path: Path) -> int:
    with Image.open(path) as im:
        return int(min(im.size))


def perceptual_distance(
    real_by_prompt: Mapping[str, Sequence[str | Path]],
    fake_by_prompt: Mapping[str, Sequence[str | Path]],
    *,
    net: PerceptualNet,
    pairs_per_prompt: int,
    seed: int,
    device: str = "cpu",
    size: int | None = None,
    batch_size: int = 32,
    n_boot: int = 1000,
    ci: float = 0.95,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Distance between random (real, generated) pairs of the same prompt.

    Per prompt, ``pairs_per_prompt`` distinct (real, fake) pairs are drawn without replacement
    from the real x fake grid (all pairs if the grid is smaller); the draw depends only on
    (seed, prompt, set sizes) and files are sorted by ``<parent>/<name>``, so two models with
    the same sample layout are scored on the same pairs. Images are read as RGB at ``size``
    (default: the generated images' size). Prompts without real or without generated images
    are skipped (listed in ``prompts_skipped``).

    Returns the per-pair table (``prompt, real, fake, distance``) and a summary: the Metric
    (``value`` = mean over pairs, CI from a bootstrap over prompts — pairs of one prompt share
    images), ``name`` (what was measured), ``n_pairs``, ``n_prompts``, ``per_prompt``
    ({prompt: mean}), ``prompts_skipped``."""
    if pairs_per_prompt < 1:
        raise DataError(f"pairs_per_prompt={pairs_per_prompt}; expected >= 1")
    plan: list[tuple[str, Path, Path]] = []
    skipped = []
    for prompt in sorted(fake_by_prompt):
        fakes = sorted((Path(p) for p in fake_by_prompt[prompt]), key=lambda p: (item_key(p), str(p)))
        reals = sorted((Path(p) for p in real_by_prompt.get(prompt, [])), key=lambda p: (item_key(p), str(p)))
        if not fakes or not reals:
            skipped.append(prompt)
            continue
        total = len(reals) * len(fakes)
        flat = _prompt_rng(seed, prompt).choice(total, size=min(pairs_per_prompt, total), replace=False)
        plan.extend((prompt, reals[i // len(fakes)], fakes[i % len(fakes)]) for i in sorted(flat.tolist()))
    if not plan:
        raise DataError(f"perceptual distance: no prompt has both real and generated images "
                        f"({len(real_by_prompt)} real prompts, {len(fake_by_prompt)} generated prompts); expected "
                        "matching prompt keys")
    size = size or _first_size(plan[0][2])
    net.module.to(device).eval()

    # Features once per unique image, then distances per pair.
    unique = sorted({p for _, r, f in plan for p in (r, f)}, key=str)
    feats: dict[Path, list[torch.Tensor]] = {}
    for start in progress(range(0, len(unique), batch_size), desc="perceptual features"):
        chunk = unique[start:start + batch_size]
        x = torch.stack([load_image(p, size=size, mode="RGB") for p in chunk]).to(device)
        out = net.features(x)
        for i, p in enumerate(chunk):
            feats[p] = [f[i:i + 1].cpu() for f in out]
    dists: list[float] = []
    for start in range(0, len(plan), batch_size):
        chunk = plan[start:start + batch_size]
        fa = [torch.cat([feats[r][k] for _, r, _ in chunk]).to(device) for k in range(len(feats[chunk[0][1]]))]
        fb = [torch.cat([feats[f][k] for _, _, f in chunk]).to(device) for k in range(len(fa))]
        dists.extend(net.distance_from_features(fa, fb).cpu().tolist())
    df = pd.DataFrame({"prompt": [p for p, _, _ in plan], "real": [str(r) for _, r, _ in plan],
                       "fake": [str(f) for _, _, f in plan], "distance": dists})
    per_prompt = df.groupby("prompt", sort=True)["distance"].agg(["sum", "count", "mean"])
    summary = bootstrap_ci((per_prompt["sum"].to_numpy(), per_prompt["count"].to_numpy()),
                           lambda s, c: s.sum() / c.sum(), n_boot=n_boot, ci=ci, seed=seed, keep_boot=True,
                           items=list(per_prompt.index))
    summary.update(name=net.name, n_pairs=int(len(df)), n_prompts=int(len(per_prompt)),
                   per_prompt={str(k): float(v) for k, v in per_prompt["mean"].items()}, prompts_skipped=skipped,
                   image_size=int(size))
    return df, summary
