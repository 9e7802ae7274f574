"""MS-SSIM between samples generated for the same report (diversity; lower = more diverse).

Uses torchmetrics' ``MultiScaleStructuralSimilarityIndexMeasure``. The standard setting
(11x11 Gaussian, sigma 1.5, 5 scales with betas 0.0448/0.2856/0.3001/0.2363/0.1333) needs
images of at least ~176 px; the embedded default works at 32-64 px. ``msssim_config`` adapts:

* min side >= 176: the standard setting;
* otherwise a 7x7 Gaussian window (sigma 1.5, so truncated at ~2 sigma) and the largest number
  of scales s <= 5 whose coarsest level (side / 2^(s-1)) is still >= the window and that
  torchmetrics accepts; the first s standard betas are renormalised to sum to 1 so the index
  keeps the same scale. This gives 4 scales at 64 px and 3 scales at 32 px.

The chosen kernel/scales/betas are returned with the result (and go into the table notes).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Hashable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from medrl.errors import DataError
from medrl.io import load_image
from medrl.metrics.bootstrap import bootstrap_ci
from medrl.progress import progress

STANDARD_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def msssim_config(height: int, width: int | None = None) -> dict[str, Any]:
    """Kernel size and betas for images of this size (see module docstring)."""
    side = min(height, width if width is not None else height)
    if side >= 176:
        return {"kernel_size": 11, "sigma": 1.5, "betas": STANDARD_BETAS, "scales": 5}
    k = 7
    best = 0
    for s in range(1, 6):
        coarsest_ok = side / 2 ** (s - 1) >= k
        torchmetrics_ok = side >= 2 ** s and side // max(1, s - 1) ** 2 > k - 1
        if coarsest_ok and torchmetrics_ok:
            best = s
    if best == 0:
        raise DataError(f"images of {height}x{width or height} px are too small for MS-SSIM; expected >= {k} px")
    betas = np.asarray(STANDARD_BETAS[:best], dtype=np.float64)
    betas = tuple(float(b) for b in betas / betas.sum())
    return {"kernel_size": k, "sigma": 1.5, "betas": betas, "scales": best}


def msssim_pairs(x: torch.Tensor, y: torch.Tensor, *, device: str = "cpu") -> torch.Tensor:
    """Per-pair MS-SSIM of two (B, C, H, W) batches in [0, 1]."""
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    if x.shape != y.shape or x.ndim != 4:
        raise DataError(f"MS-SSIM: batch shapes {tuple(x.shape)} and {tuple(y.shape)}; expected equal (B,C,H,W)")
    cfg = msssim_config(x.shape[-2], x.shape[-1])
    metric = MultiScaleStructuralSimilarityIndexMeasure(
        kernel_size=cfg["kernel_size"], sigma=cfg["sigma"], betas=cfg["betas"], data_range=1.0,
        reduction="none").to(device)
    with torch.no_grad():
        return metric(x.to(device).float(), y.to(device).float()).reshape(-1).cpu()


def _mode(path: Path) -> str:
    with Image.open(path) as im:
        return "L" if im.mode in ("L", "I", "I;16", "F", "1") else "RGB"


def msssim_within_groups(
    groups: Mapping[Hashable, Sequence[str | Path]],
    *,
    channels: Literal["auto", "L", "RGB"] = "auto",
    size: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """MS-SSIM of every pair of samples inside each group (e.g. the samples of one report).

    Returns the per-pair table (``group, a, b, msssim``) and a summary Metric dict:
    ``value`` = mean over pairs, CI from a bootstrap over *groups* (pairs inside a group share
    images, so groups are the independent units), plus ``n_pairs``, ``n_groups`` and the
    ``kernel_size``/``scales``/``betas`` used. Groups with fewer than 2 images are skipped
    (counted in ``n_groups_skipped``). Images are read as grey (``L``) or ``RGB``; ``auto``
    takes the mode of the first image."""
    pairs: list[tuple[str, Path, Path]] = []
    skipped = 0
    for key, paths in groups.items():
        paths = sorted(Path(p) for p in paths)
        if len(paths) < 2:
            skipped += 1
            continue
        pairs.extend((str(key), a, b) for a, b in itertools.combinations(paths, 2))
    if not pairs:
        raise DataError(f"MS-SSIM: no group has 2 or more images ({len(groups)} groups); expected several samples "
                        "per report/prompt")
    mode = _mode(pairs[0][1]) if channels == "auto" else channels
    values: list[float] = []
    shape: tuple[int, ...] | None = None
    for start in progress(range(0, len(pairs), batch_size), desc="MS-SSIM"):
        chunk = pairs[start:start + batch_size]
        xa = torch.stack([load_image(a, size=size, mode=mode) for _, a, _ in chunk])
        xb = torch.stack([load_image(b, size=size, mode=mode) for _, _, b in chunk])
        if shape is None:
            shape = tuple(xa.shape[1:])
        if tuple(xa.shape[1:]) != shape or xa.shape != xb.shape:
            raise DataError(f"MS-SSIM: images of different sizes ({shape} vs {tuple(xa.shape[1:])}, "
                            f"{tuple(xb.shape[1:])}) near {chunk[0][1]}; expected one size or size=")
        values.extend(msssim_pairs(xa, xb, device=device).tolist())
    df = pd.DataFrame({"group": [g for g, _, _ in pairs], "a": [str(a) for _, a, _ in pairs],
                       "b": [str(b) for _, _, b in pairs], "msssim": values})
    per_group = df.groupby("group", sort=True)["msssim"].agg(["sum", "count"])
    summary = bootstrap_ci((per_group["sum"].to_numpy(), per_group["count"].to_numpy()),
                           lambda s, c: s.sum() / c.sum(), n_boot=n_boot, ci=ci, seed=seed,
                           keep_boot=True, items=list(per_group.index))
    assert shape is not None
    cfg = msssim_config(shape[-2], shape[-1])
    summary.update(n_pairs=len(df), n_groups=len(per_group), n_groups_skipped=skipped,
                   kernel_size=cfg["kernel_size"], scales=cfg["scales"], betas=list(cfg["betas"]), channels=mode)
    return df, summary
