"""One comparison over several RL seeds: the paired difference with its CI in every seed, the
mean and spread over seeds, and a verdict that asks every seed to agree.

The per-seed differences come from the track's own paired-bootstrap code (``rl4med`` / ``cxrl``
call ``metrics.bootstrap.diff_from_boot`` on each seed's metrics); this module only lays them out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from medrl.tables.render import NA, Recorder, fmt_num, write_with_values

VERDICT_NOTE = (
    "Verdict over seeds: 'better in every seed' (or 'worse') only if every seed's CI of the difference excludes 0 "
    "on the same side; 'same sign in every seed' if the point differences agree in sign but some CI includes 0; "
    "'seeds disagree' otherwise (a seed whose difference is 0 agrees with no sign); 'no difference in every seed' "
    "if every CI lies within rounding of 0 at the shown precision. Without a stated direction the words are "
    "'higher' / 'lower'. A seed without a paired CI makes the verdict n/a.")


@dataclass(frozen=True)
class SeedRow:
    """One comparison (``a - b``) on one metric, in every seed."""

    comparison: str  # e.g. "SD+RL - SD"
    metric: str  # column header of the metric, e.g. "APR"
    higher_is_better: bool | None  # None: the paper states no direction
    digits: int
    diffs: Mapping[int, Mapping[str, Any] | None]  # seed -> paired difference Metric (None: not pairable)
    run_ids: Mapping[int, str]  # seed -> "<run a> - <run b>"
    no_verdict: str | None = None  # set: a row shown for reference only; its Verdict cell says this instead


def _words(higher_is_better: bool | None) -> tuple[str, str]:
    """(word for a positive difference, word for a negative one)."""
    if higher_is_better is None:
        return "higher", "lower"
    return ("better", "worse") if higher_is_better else ("worse", "better")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def seed_verdict(diffs: Sequence[Mapping[str, Any] | None], higher_is_better: bool | None,
                 digits: int | None = None) -> str:
    """The verdict over seeds of one comparison (see VERDICT_NOTE); ``diffs``: one Metric per seed;
    ``digits``: the shown precision (as ``render.verdict``: CIs within half a shown unit of 0 are
    no difference)."""
    if not diffs or any(d is None or not all(_finite(d.get(k)) for k in ("value", "lo", "hi")) for d in diffs):
        return "n/a (a seed has no paired CI)"
    if digits is not None and all(max(abs(float(d["lo"])), abs(float(d["hi"]))) < 0.5 * 10.0 ** -digits
                                  for d in diffs):
        return "no difference in every seed (CI within rounding of 0)"
    up, down = _words(higher_is_better)
    signs = {int(np.sign(float(d["value"]))) for d in diffs}
    if all(float(d["lo"]) > 0 for d in diffs):
        return f"{up} in every seed"
    if all(float(d["hi"]) < 0 for d in diffs):
        return f"{down} in every seed"
    if signs == {1}:
        return f"same sign in every seed ({up})"
    if signs == {-1}:
        return f"same sign in every seed ({down})"
    return "seeds disagree"


def _spread(values: list[float], digits: int) -> tuple[str, str, str]:
    """(mean, s.d., min..max) of the per-seed point differences, formatted."""
    if not values:
        return NA, NA, NA
    v = np.asarray(values, dtype=np.float64)
    sd = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return fmt_num(float(v.mean()), digits), fmt_num(sd, digits), f"{fmt_num(float(v.min()), digits)} .. " \
                                                                  f"{fmt_num(float(v.max()), digits)}"


def build_seed_table(rows: Sequence[SeedRow], seeds: Sequence[int], out_stem: str | Path, *, caption: str,
                     label: str, notes: Sequence[str] = ()) -> dict[str, str]:
    """Write ``<stem>.{csv,md,tex,values.csv}``: per row the difference [CI] in every seed, the
    mean, s.d. and range of the point differences over seeds, and the verdict."""
    table = Path(out_stem).name
    rec = Recorder(table)
    out = []
    for r in rows:
        row: dict[str, Any] = {"Comparison": r.comparison, "Metric": r.metric,
                               "Better": {True: "higher", False: "lower", None: "(no direction)"}[r.higher_is_better]}
        for s in seeds:
            row[f"seed {s} [CI]"] = rec.ours(r.comparison, f"{r.metric} seed {s}", r.diffs.get(s), model=f"seed {s}",
                                             run_id=r.run_ids.get(s, NA), digits=r.digits, source="diff")
        values = [float(d["value"]) for d in (r.diffs.get(s) for s in seeds) if d is not None and _finite(d.get("value"))]
        row["mean over seeds"], row["s.d. over seeds"], row["range (min .. max)"] = _spread(values, r.digits)
        row["Verdict"] = r.no_verdict if r.no_verdict is not None else seed_verdict(
            [r.diffs.get(s) for s in seeds], r.higher_is_better, r.digits)
        out.append(row)
    all_notes = [f"Seeds: {', '.join(map(str, seeds))} (rl.seeds): one RL run per seed, evaluated on the same "
                 "held-out prompts and sampling seeds; each cell is the paired-bootstrap difference [CI] of that "
                 "seed's run. Mean, s.d. (n-1) and range are over the seeds' point differences.",
                 VERDICT_NOTE, *notes]
    return write_with_values(pd.DataFrame(out), out_stem, rec, caption=caption, label=label, notes=all_notes)
