"""One short table of the run's headline result: every claim of both papers, its measured
difference with CI and its verdict, read from the two claims tables (rl4med_claims, cxrl_claims).

Deterministic (no dates, no wall times, no MLflow run ids): the same run gives the same file.
The code commit is passed in by the caller (the library runs no git).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from medrl.errors import DataError
from medrl.io import atomic_file, read_table
from medrl.io import write_table as write_csv
from medrl.tables.render import to_markdown

# (track label, claims file relative to data/tables/)
TRACKS = (("ISIC (RL4Med-DDPO)", "isic/rl4med_claims.csv"), ("CXR (CXRL)", "cxr/cxrl_claims.csv"))
# the column a claims table's verdict is read from, most preferred first; a table with one
# "Verdict..." column uses that one
VERDICT_PREFERENCE = ("Verdict (evaluator)", "Verdict (ours)", "Verdict")


def _verdict_column(columns: Sequence[str], path: Path) -> str:
    found = [c for c in columns if c.startswith("Verdict")]
    if not found:
        raise DataError(f"{path}: no column named 'Verdict...' (found {list(columns)}); "
                        "expected a claims table from medrl.tables.rl4med / medrl.tables.cxrl")
    for name in VERDICT_PREFERENCE:
        if name in found:
            return name
    if len(found) > 1:
        raise DataError(f"{path}: several verdict columns {found} and none of {list(VERDICT_PREFERENCE)}; "
                        "cannot tell which one is the claim's verdict")
    return found[0]


def _difference_column(columns: Sequence[str], verdict: str, path: Path) -> str:
    """The '... difference [CI]' column the verdict is taken from: the nearest one to its left."""
    left = list(columns)[: list(columns).index(verdict)]
    for c in reversed(left):
        if "difference" in c.lower() and "[ci]" in c.lower():
            return c
    raise DataError(f"{path}: no '... difference [CI]' column before '{verdict}' (found {list(columns)})")


def read_claims(path: str | Path, track: str) -> pd.DataFrame:
    """One claims table as rows Track | Claim | Difference | Verdict (Difference: 'a - b: value [lo, hi]')."""
    path = Path(path)
    df = read_table(path, required=("Claim",)).astype(object).fillna("")
    cols = [str(c) for c in df.columns]
    verdict = _verdict_column(cols, path)
    diff = _difference_column(cols, verdict, path)
    label = df["Difference"].astype(str) + ": " if "Difference" in cols else ""
    return pd.DataFrame({"Track": track, "Claim": df["Claim"].astype(str),
                         "Difference": label + df[diff].astype(str), "Verdict": df[verdict].astype(str)})


def build_summary(tables_dir: str | Path, out_dir: str | Path, *, commit: str, ci: float | None = None,
                  tracks: Sequence[tuple[str, str]] = TRACKS) -> dict[str, str]:
    """Write ``summary.md`` and ``summary.csv`` to ``out_dir`` from the claims tables under
    ``tables_dir`` (``data/tables``); ``commit``: the code version the run was built from;
    ``ci``: the confidence level of the bracketed intervals (for the header). Returns {format: path}."""
    tables_dir, out_dir = Path(tables_dir), Path(out_dir)
    df = pd.concat([read_claims(tables_dir / rel, track) for track, rel in tracks], ignore_index=True)
    if ci is not None:
        df = df.rename(columns={"Difference": f"Difference [{ci * 100:g} % CI]"})
    full = ", ".join(f"`{(Path('data/tables') / rel).with_suffix('.md').as_posix()}`" for _, rel in tracks)
    notes = ["Difference: a - b as named, with the paired-bootstrap CI; the verdict asks whether the CI lies on "
             "the claimed side of 0 (CXR: judged by the independent evaluator networks).",
             f"Full tables (paper numbers, both judges, MLflow run ids): {full}."]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "summary.csv", "md": out_dir / "summary.md"}
    write_csv(df, paths["csv"])
    with atomic_file(paths["md"]) as f:
        f.write(to_markdown(df, caption=f"Claims of both papers, measured by this run (code commit `{commit}`)",
                            notes=notes))
    return {k: str(v) for k, v in paths.items()}
