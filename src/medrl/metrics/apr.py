"""Artifact Prevalence Rate (RL4Med-DDPO): share of generated images whose predicted artifact
set equals the prompt's exactly.

The predictions come from the H=4 metric classifier (hair, gel_bubble, ruler, ink), trained
on a split disjoint from the H=6 reward classifier's. "Exactly" is set equality over all four
artifacts: a requested artifact that is missing and an unrequested one that appears both make
the image count as a miss.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from medrl.errors import DataError

__all__ = ["MANIFEST_COLUMNS", "exact_match", "apr", "apr_per_prompt", "read_manifest", "evaluate_apr"]

MANIFEST_COLUMNS = ["prompt_id", "prompt", "seed", "model", "path"]


def _as_array(x: torch.Tensor | np.ndarray | Sequence, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == bool:
        arr = arr.astype(np.float32)
    if arr.ndim != 2:
        raise DataError(f"{name}: expected a (N, K) array of artifact predictions/labels, got shape {arr.shape}")
    return arr.astype(np.float64)


def exact_match(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """(N,) bool: does the thresholded prediction (``pred > threshold``) equal ``target`` on
    every column? ``pred`` may be 0/1 decisions or probabilities; ``target`` must be 0/1."""
    p, t = _as_array(pred, "pred"), _as_array(target, "target")
    if p.shape != t.shape:
        raise DataError(f"pred/target: shapes differ, {p.shape} vs {t.shape}; expected the same (N, K)")
    if not np.isin(t, (0.0, 1.0)).all():
        raise DataError("target: expected 0/1 artifact labels")
    return ((p > threshold) == (t > 0.5)).all(axis=1)


def apr(pred_artifacts: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, threshold: float = 0.5) -> float:
    """Share of images whose predicted artifact set equals the target set exactly."""
    m = exact_match(pred_artifacts, target, threshold)
    if m.size == 0:
        raise DataError("pred/target: no images; APR of an empty set is undefined")
    return float(m.mean())


def apr_per_prompt(
    pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, prompts: Sequence[str], threshold: float = 0.5
) -> dict[str, float]:
    """APR of each prompt's images, keyed by prompt (in order of first appearance)."""
    m = exact_match(pred, target, threshold)
    prompts = list(prompts)
    if len(prompts) != m.size:
        raise DataError(f"prompts: {len(prompts)} prompts for {m.size} predictions; expected one per image")
    s = pd.Series(m.astype(float)).groupby(pd.Series(prompts), sort=False).mean()
    return {str(k): float(v) for k, v in s.items()}


def read_manifest(path: str | Path) -> pd.DataFrame:
    """A generation manifest with ``path`` resolved: absolute, else relative to the working
    directory (the workspace root), else relative to the manifest's folder."""
    from medrl.io import read_table

    path = Path(path)
    df = read_table(path, MANIFEST_COLUMNS)
    if df.empty:
        raise DataError(f"{path}: manifest has no rows; expected one row per generated image")

    def resolve(p: str) -> str:
        q = Path(str(p))
        if q.is_absolute() or q.exists():
            return str(q)
        alt = path.parent / q
        return str(alt) if alt.exists() else str(q)

    df = df.copy()
    df["path"] = [resolve(p) for p in df["path"]]
    missing = [p for p in df["path"] if not Path(p).is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} image paths do not exist (e.g. {missing[0]}); expected generated PNGs")
    return df


def evaluate_apr(
    samples_manifest: Path, classifier_dir: Path, *, device: str = "cpu", batch_size: int = 64
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Score every generated image with the H=4 classifier against its prompt's artifacts.

    Returns the per-image table (manifest columns + ``target_<a>``, ``prob_<a>``,
    ``pred_<a>`` for each artifact, ``exact``) and a summary of floats: ``apr`` (over
    images), ``apr_prompt_mean``/``apr_prompt_min`` (over prompts), ``acc_<a>`` (per-artifact
    agreement), counts, and ``apr_<model>`` when the manifest holds several models."""
    from medrl.data.prompts import ARTIFACTS4, prompt_to_labels
    from medrl.models.classifiers import load_classifier, predict_probs

    df = read_manifest(samples_manifest)
    model = load_classifier(classifier_dir, device=device)
    missing = [a for a in ARTIFACTS4 if a not in model.heads]
    if missing:
        raise DataError(f"{classifier_dir}: classifier heads {model.heads} lack artifacts {missing}; expected the H=4 metric classifier")
    cols = [model.heads.index(a) for a in ARTIFACTS4]
    probs = predict_probs(model, df, device=device, batch_size=batch_size, desc="APR")[:, cols]
    target = np.array([[prompt_to_labels(p)[a] for a in ARTIFACTS4] for p in df["prompt"]], dtype=int).reshape(len(df), 4)
    pred = (probs > 0.5).astype(int)
    out = df.copy()
    for j, a in enumerate(ARTIFACTS4):
        out[f"target_{a}"] = target[:, j]
        out[f"prob_{a}"] = probs[:, j]
        out[f"pred_{a}"] = pred[:, j]
    out["exact"] = exact_match(pred, target).astype(int)

    per_prompt = apr_per_prompt(pred, target, out["prompt"].tolist())
    summary: dict[str, float] = {
        "apr": apr(pred, target),
        "apr_prompt_mean": float(np.mean(list(per_prompt.values()))),
        "apr_prompt_min": float(np.min(list(per_prompt.values()))),
        "n_images": float(len(out)),
        "n_prompts": float(len(per_prompt)),
    }
    for j, a in enumerate(ARTIFACTS4):
        summary[f"acc_{a}"] = float((pred[:, j] == target[:, j]).mean())
    if out["model"].nunique() > 1:
        for name, g in out.groupby("model", sort=True):
            summary[f"apr_{name}"] = float(g["exact"].mean())
    return out, summary
