"""Bootstrap confidence intervals and the ``Metric`` record every metrics JSON uses.

A *Metric* is a plain dict (JSON-ready)::

    {"value": float, "lo": float, "hi": float, "n": int, "ci": float,
     # optional, for paired differences between models (see ``diff_from_boot``):
     "boot": [float, ...], "boot_key": str}

``value`` is the statistic on the full sample, ``[lo, hi]`` the bootstrap interval at level
``ci``, ``n`` the number of resampled units (images, prompts, rows...).

Pairing. The resampling indices depend only on ``(seed, n, n_boot)``: two models evaluated
on the same aligned items (same prompts, same sampling seeds, same order) with the same
bootstrap seed get the *same* index matrix, so their stored replicates are paired and
``boot_a - boot_b`` is the paired-bootstrap distribution of the difference. ``boot_key``
hashes ``(seed, n, n_boot, items)`` so a difference is only formed between replicates that
really were drawn with the same indices over the same items.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from medrl.errors import DataError

Method = Literal["percentile", "basic"]
METRIC_KEYS = ("value", "lo", "hi", "n")
# Fewer valid replicates than this share (e.g. AUROC undefined in most resamples) -> no CI.
MIN_VALID_FRACTION = 0.5


@dataclass
class Metric:
    """Typed view of the Metric dict; ``to_dict()`` is what goes into JSON."""

    value: float
    lo: float
    hi: float
    n: int
    ci: float = 0.95
    method: str = "percentile"
    boot: list[float] | None = field(default=None, repr=False)
    boot_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "metric") -> "Metric":
        check_metric(d, where=where)
        return cls(
            value=float(d["value"]), lo=float(d["lo"]), hi=float(d["hi"]), n=int(d["n"]),
            ci=float(d.get("ci", 0.95)), method=str(d.get("method", "percentile")),
            boot=list(d["boot"]) if d.get("boot") is not None else None,
            boot_key=d.get("boot_key"),
        )


def check_metric(d: Any, *, where: str = "metric") -> dict[str, Any]:
    """Raise DataError unless ``d`` is a Metric dict; returns it unchanged."""
    if not isinstance(d, Mapping):
        raise DataError(f"{where}: expected a Metric dict {{value, lo, hi, n}}, got {type(d).__name__}")
    missing = [k for k in METRIC_KEYS if k not in d]
    if missing:
        raise DataError(f"{where}: Metric is missing keys {missing}; expected {list(METRIC_KEYS)}")
    for k in ("value", "lo", "hi"):
        v = d[k]
        if v is not None and not isinstance(v, (int, float)):
            raise DataError(f"{where}.{k}: expected a number, got {v!r}")
    return dict(d)


def boot_key(seed: int, n: int | Sequence[int], n_boot: int, items: Sequence[Any] | None = None,
             clusters: Sequence[Any] | None = None) -> str:
    """Identity of a resampling scheme (see module docstring); a cluster bootstrap (``clusters``)
    never shares a key with a row bootstrap."""
    parts: list[Any] = [int(seed), list(n) if isinstance(n, (list, tuple)) else int(n), int(n_boot),
                        [str(i) for i in items] if items is not None else None]
    if clusters is not None:
        parts.append(["clusters", [str(c) for c in clusters]])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def cluster_codes(clusters: Sequence[Any], n: int) -> tuple[np.ndarray, int]:
    """Row -> cluster number (0..K-1, in sorted order of the cluster ids), and K."""
    labels = np.asarray([str(c) for c in clusters])
    if len(labels) != n:
        raise DataError(f"bootstrap: {len(labels)} cluster ids for {n} values; expected one per row")
    _, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64), int(codes.max()) + 1


def _cluster_draws(k: int, *, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=(n_boot, k), dtype=np.int64)


def boot_indices(n: int, *, n_boot: int, seed: int, clusters: Sequence[Any] | None = None) -> Any:
    """The (n_boot, n) resampling index matrix; a pure function of (n, n_boot, seed[, clusters]).

    With ``clusters`` (one id per row; e.g. the report each image was generated from) whole
    clusters are resampled (cluster bootstrap): K clusters drawn with replacement, each bringing
    all its rows. With equal cluster sizes that is again an (n_boot, n) matrix; with unequal
    sizes a list of n_boot row-index arrays of varying length."""
    if n < 1:
        raise DataError(f"bootstrap: need at least one item, got n={n}")
    if clusters is None:
        rng = np.random.default_rng(seed)
        return rng.integers(0, n, size=(n_boot, n), dtype=np.int64)
    codes, k = cluster_codes(clusters, n)
    draws = _cluster_draws(k, n_boot=n_boot, seed=seed)
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=k)
    if np.all(sizes == sizes[0]):
        members = order.reshape(k, int(sizes[0]))
        return members[draws].reshape(n_boot, n)
    members_list = np.split(order, np.cumsum(sizes)[:-1])
    return [np.concatenate([members_list[c] for c in row]) for row in draws]


def boot_counts(n: int, *, n_boot: int, seed: int, clusters: Sequence[Any] | None = None) -> np.ndarray:
    """Same resamples as ``boot_indices`` but as (n_boot, n) multiplicity counts."""
    if clusters is not None:
        codes, k = cluster_codes(clusters, n)
        draws = _cluster_draws(k, n_boot=n_boot, seed=seed)
        c = np.zeros((n_boot, k), dtype=np.float64)
        np.add.at(c, (np.repeat(np.arange(n_boot), k), draws.ravel()), 1.0)
        return c[:, codes]
    idx = boot_indices(n, n_boot=n_boot, seed=seed)
    counts = np.zeros((n_boot, n), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), idx.ravel()), 1.0)
    return counts


def interval(value: float, reps: np.ndarray, *, ci: float, method: Method = "percentile") -> tuple[float, float]:
    """Percentile (or basic = reverse-percentile) interval from replicates; NaN reps ignored."""
    reps = np.asarray(reps, dtype=np.float64)
    ok = reps[np.isfinite(reps)]
    if ok.size < max(2, MIN_VALID_FRACTION * reps.size):
        return float("nan"), float("nan")
    a = (1.0 - ci) / 2.0
    q_lo, q_hi = np.quantile(ok, [a, 1.0 - a])
    if method == "percentile":
        return float(q_lo), float(q_hi)
    if method == "basic":
        return float(2 * value - q_hi), float(2 * value - q_lo)
    raise ValueError(f"unknown bootstrap method {method!r}; expected 'percentile' or 'basic'")


def _as_arrays(values: Any) -> tuple[np.ndarray, ...]:
    arrays = tuple(np.asarray(v) for v in values) if isinstance(values, tuple) else (np.asarray(values),)
    n = len(arrays[0]) if arrays[0].ndim else 0
    for i, a in enumerate(arrays):
        if a.ndim == 0 or len(a) != n:
            raise DataError(f"bootstrap: array {i} has shape {a.shape}; expected aligned arrays with first dim {n}")
    return arrays


def bootstrap_ci(
    values: np.ndarray | Sequence[float] | tuple[np.ndarray, ...],
    stat: Callable[..., float] = np.mean,
    *,
    n_boot: int,
    ci: float,
    seed: int,
    method: Method = "percentile",
    keep_boot: bool = False,
    items: Sequence[Any] | None = None,
    clusters: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Bootstrap over items (rows) -> Metric dict ``{value, lo, hi, n, ci[, boot, boot_key]}``.

    ``values`` is an (N,...) array or a tuple of aligned arrays; rows are resampled together
    and ``stat(*arrays)`` is evaluated on each resample (e.g. ``stat=roc_auc(y, p)``).
    ``stat=np.mean`` on a single 1-D array is vectorised. Replicates where ``stat`` is not
    finite (e.g. AUROC with one class) are dropped; with fewer than half valid, lo/hi are NaN.
    ``items`` (item ids in row order) only feed ``boot_key`` so paired differences can check
    alignment. ``method="basic"`` gives the reverse-percentile interval (used for biased
    statistics such as FID). ``clusters`` (one id per row) resamples whole clusters instead of
    rows (see ``boot_indices``): for rows that are not independent, e.g. several images
    generated from one report.
    """
    arrays = _as_arrays(values)
    n = len(arrays[0])
    if n == 0:
        raise DataError("bootstrap: no values; expected at least one item")
    if items is not None and len(items) != n:
        raise DataError(f"bootstrap: {len(items)} item ids for {n} values; expected one id per row")
    value = float(stat(*arrays))
    if stat is np.mean and len(arrays) == 1 and arrays[0].ndim == 1:
        x = arrays[0].astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise DataError("bootstrap: values contain NaN/inf; expected finite numbers")
        if clusters is None:
            reps = x[boot_indices(n, n_boot=n_boot, seed=seed)].mean(axis=1)
        else:
            counts = boot_counts(n, n_boot=n_boot, seed=seed, clusters=clusters)
            reps = (counts @ x) / counts.sum(axis=1)
    else:
        idx = boot_indices(n, n_boot=n_boot, seed=seed, clusters=clusters)
        reps = np.empty(n_boot, dtype=np.float64)
        for b in range(n_boot):
            rows = idx[b]
            try:
                reps[b] = float(stat(*(a[rows] for a in arrays)))
            except ValueError:  # e.g. sklearn refusing a one-class resample
                reps[b] = np.nan
    return metric_from_reps(value, reps, n=n, ci=ci, method=method, keep_boot=keep_boot,
                            key=boot_key(seed, n, n_boot, items, clusters))


def metric_from_reps(
    value: float, reps: np.ndarray, *, n: int, ci: float, method: Method = "percentile",
    keep_boot: bool = False, key: str | None = None,
) -> dict[str, Any]:
    """Build the Metric dict from a point value and its bootstrap replicates."""
    lo, hi = interval(value, reps, ci=ci, method=method)
    out: dict[str, Any] = {"value": float(value), "lo": lo, "hi": hi, "n": int(n), "ci": float(ci), "method": method}
    if keep_boot:
        out["boot"] = [float(r) if math.isfinite(r) else None for r in np.asarray(reps, dtype=np.float64)]
        out["boot_key"] = key
    return out


def paired_diff_ci(
    a: np.ndarray | Sequence[float],
    b: np.ndarray | Sequence[float],
    *,
    n_boot: int,
    ci: float,
    seed: int,
    keep_boot: bool = False,
    items: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Mean(a) - mean(b) for two models scored on the same items, with a paired bootstrap CI.

    Item i of ``a`` and of ``b`` must be the same prompt/seed; rows are resampled together."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise DataError(f"paired_diff_ci: shapes {a.shape} and {b.shape}; expected two aligned 1-D arrays")
    return bootstrap_ci(a - b, np.mean, n_boot=n_boot, ci=ci, seed=seed, keep_boot=keep_boot, items=items)


def _replicates(m: Mapping[str, Any], *, where: str, name: str) -> np.ndarray:
    check_metric(m, where=f"{where} ({name})")
    if m.get("boot") is None or m.get("boot_key") is None:
        raise DataError(f"{where}: {name} has no bootstrap replicates ('boot', 'boot_key'); expected metrics "
                        "written with keep_boot=True")
    return np.array([np.nan if v is None else v for v in m["boot"]], dtype=np.float64)


def linear_combination(terms: Sequence[tuple[float, Mapping[str, Any]]], *, where: str = "combination",
                       method: Method | None = None, keep_boot: bool = False,
                       names: Sequence[str] | None = None) -> dict[str, Any]:
    """sum_i w_i * metric_i for Metrics of one model set resampled with the same indices.

    The replicates combine term by term, so the interval is the paired bootstrap of the
    combination (for means, exactly the bootstrap of the per-item weighted sum). The interval
    method defaults to the first term's."""
    if not terms:
        raise DataError(f"{where}: no terms; expected at least one (weight, Metric)")
    names = list(names) if names is not None else [f"term {i}" for i in range(len(terms))]
    reps = [_replicates(m, where=where, name=n) for n, (_, m) in zip(names, terms)]
    keys = {m["boot_key"] for _, m in terms}
    if len(keys) != 1:
        raise DataError(f"{where}: bootstrap keys differ ({sorted(keys)}): the terms were not resampled over the "
                        "same items with the same seed, so they cannot be combined pairwise")
    if len({r.size for r in reps}) != 1:
        raise DataError(f"{where}: replicate counts {[r.size for r in reps]}; expected equal counts")
    value = float(sum(float(w) * float(m["value"]) for w, m in terms))
    total = sum(float(w) * r for (w, _), r in zip(terms, reps))
    first = terms[0][1]
    return metric_from_reps(value, total, n=int(first["n"]), ci=float(first.get("ci", 0.95)),
                            method=method or first.get("method", "percentile"), keep_boot=keep_boot,
                            key=first["boot_key"])


def diff_from_boot(a: Mapping[str, Any], b: Mapping[str, Any], *, where: str = "difference",
                   method: Method | None = None) -> dict[str, Any]:
    """Paired difference a - b of two Metrics from their stored, equally-indexed replicates.

    The interval method defaults to the operands' own (``a["method"]``)."""
    return linear_combination([(1.0, a), (-1.0, b)], where=where, method=method,
                              names=("first operand", "second operand"))
