"""Write one table as CSV, Markdown and LaTeX (booktabs), atomically, plus cell formatters.

Every builder also writes ``<stem>.values.csv``: one row per number shown (full precision,
CI bounds, n, source = ours/paper/diff, MLflow run id), so a rounded cell can be traced back.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from medrl.errors import DataError
from medrl.io import atomic_file
from medrl.io import write_table as _write_csv

NA = "n/a"

# Characters that are special in LaTeX text mode.
_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}",
    # the few non-ASCII symbols the builders use
    "\u2191": r"$\uparrow$", "\u2193": r"$\downarrow$", "\u2212": "-", "\u00b1": r"$\pm$",
    "\u2264": r"$\leq$", "\u2265": r"$\geq$", "\u2014": "---", "\u2013": "--",
}


def tex_escape(text: Any) -> str:
    """Escape a cell/caption for LaTeX text mode."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def _isnum(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def fmt_num(x: Any, digits: int = 3) -> str:
    """A number with fixed decimals; None/NaN -> 'n/a'."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return NA
    if not _isnum(x):
        raise DataError(f"cannot format {x!r} as a number")
    s = f"{float(x):.{digits}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.000"


def fmt_pct(v: Any) -> str:
    """A share as a whole percentage; None -> 'n/a'."""
    return NA if v is None else f"{100 * float(v):.0f} %"


def fmt_share(share: float | None) -> str:
    """A share of a gap closed (``metrics.planted.share_closed``); None -> 'no gap'."""
    return "no gap" if share is None else fmt_pct(share)


def fmt_ci(m: Mapping[str, Any] | Any, digits: int = 3) -> str:
    """``{"value","lo","hi"}`` -> ``"0.812 [0.790, 0.833]"``; no CI -> just the value.

    Accepts a Metric dict or anything with value/lo/hi attributes; None -> 'n/a'."""
    if m is None:
        return NA
    get = m.get if isinstance(m, Mapping) else (lambda k, d=None: getattr(m, k, d))
    value, lo, hi = get("value"), get("lo"), get("hi")
    v = fmt_num(value, digits)
    if v == NA or lo is None or hi is None or not (_isnum(lo) and _isnum(hi)):
        return v
    return f"{v} [{fmt_num(float(lo), digits)}, {fmt_num(float(hi), digits)}]"


def _md_cell(x: Any) -> str:
    s = "" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)
    return s.replace("|", r"\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame, *, caption: str, notes: Sequence[str]) -> str:
    lines = [f"**{caption}**", ""]
    cols = [str(c) for c in df.columns]
    lines.append("| " + " | ".join(_md_cell(c) for c in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(x) for x in row) + " |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def to_latex(df: pd.DataFrame, *, caption: str, label: str, notes: Sequence[str]) -> str:
    align = "".join("r" if pd.api.types.is_numeric_dtype(df[c]) else "l" for c in df.columns)
    out = [r"\begin{table}[t]", r"\centering", r"\small", f"\\caption{{{tex_escape(caption)}}}",
           f"\\label{{{label}}}", f"\\begin{{tabular}}{{{align}}}", r"\toprule",
           " & ".join(tex_escape(c) for c in df.columns) + r" \\", r"\midrule"]
    for row in df.itertuples(index=False):
        cells = ["" if x is None or (isinstance(x, float) and math.isnan(x)) else tex_escape(x) for x in row]
        if cells and cells[0].startswith("["):
            cells[0] = "{}" + cells[0]  # else the previous row's \\ reads it as an optional argument
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        out.append(r"\par\smallskip")
        out.append(r"\begin{minipage}{\linewidth}\footnotesize")
        out += [tex_escape(n) + r"\par" for n in notes]
        out.append(r"\end{minipage}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def write_table(df: pd.DataFrame, out_stem: str | Path, *, caption: str, label: str,
                notes: Sequence[str] = ()) -> dict[str, str]:
    """Write ``<stem>.csv``, ``<stem>.md`` (notes below the table) and ``<stem>.tex``.

    Each file is written atomically. Returns {"csv", "md", "tex"} -> path."""
    stem = Path(out_stem)
    if df.columns.duplicated().any():
        raise DataError(f"{stem}: duplicate column names {list(df.columns[df.columns.duplicated()])}")
    paths = {"csv": stem.with_name(stem.name + ".csv"), "md": stem.with_name(stem.name + ".md"),
             "tex": stem.with_name(stem.name + ".tex")}
    _write_csv(df, paths["csv"])
    with atomic_file(paths["md"]) as f:
        f.write(to_markdown(df, caption=caption, notes=notes))
    with atomic_file(paths["tex"]) as f:
        f.write(to_latex(df, caption=caption, label=label, notes=notes))
    return {k: str(v) for k, v in paths.items()}


def write_values(records: Sequence[Mapping[str, Any]], out_stem: str | Path) -> str:
    """Full-precision long table ``<stem>.values.csv`` behind the rounded cells."""
    stem = Path(out_stem)
    path = stem.with_name(stem.name + ".values.csv")
    cols = ["table", "row", "column", "source", "model", "value", "lo", "hi", "n", "ci", "method", "run_id"]
    df = pd.DataFrame([{c: r.get(c) for c in cols} for r in records], columns=cols)
    _write_csv(df, path)
    return str(path)


# ----------------------------------------------------------------------------- builder helpers


def need(d: Any, path: Sequence[str], *, where: str, expected: str = "") -> Any:
    """``d[path[0]][path[1]]...`` or a DataError naming ``where`` and the missing dotted key."""
    cur = d
    for i, k in enumerate(path):
        if not isinstance(cur, Mapping) or k not in cur:
            key = ".".join(str(p) for p in path[: i + 1])
            raise DataError(f"{where}: missing key '{key}'" + (f"; expected {expected}" if expected else ""))
        cur = cur[k]
    return cur


def need_metric(d: Any, path: Sequence[str], *, where: str) -> dict[str, Any]:
    """A Metric dict at ``path`` (validated) or a DataError naming file/model and key."""
    from medrl.metrics.bootstrap import check_metric

    m = need(d, path, where=where, expected="a Metric {value, lo, hi, n}")
    return check_metric(m, where=f"{where}: '{'.'.join(path)}'")


def verdict(diff: Mapping[str, Any] | None, higher_is_better: bool, digits: int | None = None) -> str:
    """Direction of a paired difference 'a - b' (a = the model the claim favours).

    With ``digits`` (the precision the table shows), a CI that lies entirely within half a
    shown unit of 0 is "no difference": e.g. two variants that train identically up to
    floating-point noise give a CI like [-1.5e-6, -0.7e-6], which excludes 0 but is no
    direction anybody can read off the table.
    """
    if diff is None or not (_isnum(diff.get("lo")) and _isnum(diff.get("hi"))):
        return "n/a (no paired CI)"
    lo, hi = float(diff["lo"]), float(diff["hi"])
    if not higher_is_better:
        lo, hi = -hi, -lo
    if digits is not None and max(abs(lo), abs(hi)) < 0.5 * 10.0 ** -digits:
        return "no difference (CI within rounding of 0)"
    if lo > 0:
        return "supported (CI excludes 0)"
    if hi < 0:
        return "contradicted (CI excludes 0)"
    return "inconclusive (CI includes 0)"


class Recorder:
    """Formats cells and remembers every number for ``<stem>.values.csv``."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.records: list[dict[str, Any]] = []

    def ours(self, row: str, column: str, m: Mapping[str, Any] | None, *, model: str, run_id: str | None,
             digits: int, source: str = "ours") -> str:
        if m is None:
            return NA
        self.records.append({"table": self.table, "row": row, "column": column, "source": source, "model": model,
                             "value": m.get("value"), "lo": m.get("lo"), "hi": m.get("hi"), "n": m.get("n"),
                             "ci": m.get("ci"), "method": m.get("method"), "run_id": run_id})
        return fmt_ci(m, digits)

    def paper(self, row: str, column: str, value: float | None, *, model: str, digits: int) -> str:
        if value is None:
            return ""
        self.records.append({"table": self.table, "row": row, "column": column, "source": "paper", "model": model,
                             "value": float(value)})
        return fmt_num(value, digits)


def write_with_values(df: pd.DataFrame, stem: str | Path, rec: Recorder, *, caption: str, label: str,
                      notes: Sequence[str]) -> dict[str, str]:
    """``write_table`` + ``write_values`` of the recorder's numbers; {csv, md, tex, values} paths."""
    paths = write_table(df, stem, caption=caption, label=label, notes=list(notes))
    paths["values"] = write_values(rec.records, stem)
    return paths


def resolve_run_ids(run_ids: Mapping[str, Any], models: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Run id per model: a missing key is a DataError; an empty id (no MLflow run found for the
    input) is shown as 'n/a' and reported in a note rather than failing the table."""
    out: dict[str, str] = {}
    missing = []
    for m in models:
        if m not in run_ids:
            raise DataError(f"run_ids: no entry for model '{m}'; expected the MLflow run id of its metrics stage "
                            f"(got keys {sorted(run_ids)})")
        rid = run_ids[m]
        if rid is None or str(rid).strip() == "":
            out[m] = NA
            missing.append(m)
        else:
            out[m] = str(rid)
    notes = [f"No MLflow run id was found for: {', '.join(missing)} (shown as n/a)."] if missing else []
    return out, notes
