"""Per-class AUROC with uncertain / missing targets ignored, macro average, bootstrap CIs.

Targets follow CheXpert: 1 positive, 0 negative, -1 uncertain, NaN/blank not mentioned.
For each class only rows with a 0/1 target are used: uncertain (-1) and NaN rows are ignored
*for that class only* (a row can count for Effusion and be ignored for Edema). With
``nan_as_negative=True`` blanks count as negatives instead (the common "U-ignore, blank = 0"
CheXpert convention); -1 is always ignored. A class whose valid targets are all one value has
no AUROC (NaN); the macro average ("avg") is the mean over classes with a defined AUROC.

CIs resample *rows* (images; or whole clusters of rows, ``clusters=``) jointly for all classes (``bootstrap_ci`` over the aligned
(y, p) arrays), so the macro-average CI respects the correlation between classes. The
bootstrap AUROC uses the rank (Mann-Whitney) form with mid-ranks, identical to
``sklearn.metrics.roc_auc_score`` including ties; replicates where a class has one label
value are dropped for that class.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from medrl.errors import DataError
from medrl.metrics.bootstrap import boot_indices, boot_key, metric_from_reps


def _check(y_true: Any, y_prob: Any, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.ndim != 2 or p.shape != y.shape or y.shape[1] != len(classes):
        raise DataError(f"AUROC: y_true {y.shape}, y_prob {p.shape}, {len(classes)} classes; expected two (N, C) "
                        "arrays with C = len(classes)")
    bad = ~np.isnan(y) & ~np.isin(y, (-1.0, 0.0, 1.0))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"AUROC: y_true[{r}, {classes[c]!r}] = {y[r, c]}; expected 1, 0, -1 or NaN")
    if not np.all(np.isfinite(p)):
        raise DataError("AUROC: y_prob contains NaN/inf; expected finite scores")
    return y, p


def _valid(y: np.ndarray, nan_as_negative: bool) -> tuple[np.ndarray, np.ndarray]:
    if nan_as_negative:
        y = np.where(np.isnan(y), 0.0, y)
    return y, (y == 0) | (y == 1)


def per_class_auroc(
    y_true: Any, y_prob: Any, classes: Sequence[str], *, nan_as_negative: bool = False,
) -> dict[str, float]:
    """{class: AUROC or NaN} plus ``"avg"`` (macro mean over defined classes; NaN if none)."""
    y, p = _check(y_true, y_prob, classes)
    y, valid = _valid(y, nan_as_negative)
    out: dict[str, float] = {}
    for c, name in enumerate(classes):
        yc, pc = y[valid[:, c], c], p[valid[:, c], c]
        out[name] = float(roc_auc_score(yc, pc)) if np.unique(yc).size == 2 else float("nan")
    vals = np.array([out[c] for c in classes])
    out["avg"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


def _rank_auroc(y: np.ndarray, p: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Row-wise AUROC of (B, N) arrays; entries with valid=False are ignored."""
    scores = np.where(valid, p, np.nan)
    ranks = rankdata(scores, axis=1, nan_policy="omit")
    pos = valid & (y == 1)
    n_pos = pos.sum(1).astype(np.float64)
    n_neg = (valid & (y == 0)).sum(1).astype(np.float64)
    r_pos = np.where(pos, ranks, 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def auroc_with_ci(
    y_true: Any,
    y_prob: Any,
    classes: Sequence[str],
    *,
    n_boot: int,
    ci: float,
    seed: int,
    nan_as_negative: bool = False,
    keep_boot: bool = True,
    items: Sequence[Any] | None = None,
    chunk: int = 100,
    clusters: Sequence[Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """{class: Metric, "avg": Metric} with row-bootstrap percentile CIs (see module docstring).

    ``Metric["n"]`` is the number of rows with a valid target for that class (all rows for avg).
    ``items`` (row ids, e.g. image keys) feed ``boot_key`` for paired model differences.
    ``clusters`` (one id per row, e.g. the report an image was generated from) resamples whole
    clusters instead of rows (``medrl.metrics.bootstrap.boot_indices``)."""
    y, p = _check(y_true, y_prob, classes)
    point = per_class_auroc(y, p, classes, nan_as_negative=nan_as_negative)
    y, valid = _valid(y, nan_as_negative)
    n = len(y)
    idx = boot_indices(n, n_boot=n_boot, seed=seed, clusters=clusters)
    reps = np.empty((n_boot, len(classes)), dtype=np.float64)
    if isinstance(idx, np.ndarray):
        for start in range(0, n_boot, chunk):  # bounded memory: (chunk, N) per class
            rows = idx[start:start + chunk]
            for c in range(len(classes)):
                reps[start:start + chunk, c] = _rank_auroc(y[rows, c], p[rows, c], valid[rows, c])
    else:  # cluster bootstrap with unequal cluster sizes: replicates of varying length
        for b, rows in enumerate(idx):
            for c in range(len(classes)):
                reps[b, c] = _rank_auroc(y[rows, c][None], p[rows, c][None], valid[rows, c][None])[0]
    key = boot_key(seed, n, n_boot, items, clusters)
    out: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(classes):
        out[name] = metric_from_reps(point[name], reps[:, c], n=int(valid[:, c].sum()), ci=ci, keep_boot=keep_boot,
                                     key=key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN replicate rows -> NaN, dropped later
        avg_reps = np.nanmean(reps, axis=1)
    out["avg"] = metric_from_reps(point["avg"], avg_reps, n=n, ci=ci, keep_boot=keep_boot, key=key)
    return out
