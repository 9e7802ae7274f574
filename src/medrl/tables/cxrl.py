"""CXRL Tables 1, 2a, 2b, 3 (ours with CIs beside the published numbers) + a claims table."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from medrl.errors import DataError
from medrl.metrics.bootstrap import diff_from_boot
from medrl.metrics.planted import share_closed
from medrl.metrics.rlcf_modes import MODES, PAIRED_MODES
from medrl.tables import paper as P
from medrl.tables.render import (NA, Recorder, fmt_num, fmt_share, need, need_metric, resolve_run_ids, verdict,
                                 write_with_values)
from medrl.tables.seeds import SeedRow, build_seed_table

# Models of Tables 1, 2a and 3 (full schema) and the reward ablations of Table 2b (FID only).
MAIN_MODELS = ("anchor", "full", "no_ace", "no_rlcf", "repeated")
REWARD_MODELS = ("align_only", "diag_only", "consist_only")
REQUIRED_MODELS = ("anchor", "full")
FULL_KEYS = ("r_align", "similarity", "fid", "kid", "msssim")

CXR_SCHEMA_DOC = """
    Metrics-JSON schema (one file per model; written by the CXR metrics stage)::

        {
          "r_align":    Metric,   # mean posture reward of generated images (higher = better)
          "auroc":      {"<class>": Metric for the 11 classes of paper.CXR_CLASSES, "avg": Metric},
          "similarity": Metric,   # mean image-report cosine similarity (dual encoder)
          "fid":        Metric,   # fidelity.fid_kid(...)["fid_metric"] (CXR DenseNet-121 features)
          "kid":        Metric,   # fidelity.fid_kid(...)["kid_metric"]
          "msssim":     Metric,   # msssim.msssim_within_groups(...)[1] (samples of one report)
          "n_images":   int,
          "feature_extractor": str,  # fid_kid(...)["feature_extractor"]
          "eval_r_align", "eval_auroc", "eval_similarity", "eval_fid", "eval_kid": the same metrics
                        # judged by the independent evaluators (medrl.metrics.cxr_eval.JUDGE_PREFIX)
          "judges":     {"reward"|"eval": {"aligner"|"diag"|"dualenc": accuracy on the held-out
                        # real test pairs (cxr_eval.judge_accuracy), "independent": bool}}
        }

    Metric = {"value", "lo", "hi", "n"[, "ci", "method", "boot", "boot_key"]}
    (medrl.metrics.bootstrap). Models ``anchor``, ``full``, ``no_ace``, ``no_rlcf``, ``repeated`` need the
    full schema; ``align_only``, ``diag_only``, ``consist_only`` (Table 2b) need ``fid``,
    ``n_images``, ``feature_extractor`` and ``eval_fid``; ``anchor`` also needs ``judges``.
    ``(ours)`` columns are the reward networks' numbers (the paper's protocol), ``(evaluator)``
    columns the independent evaluators'; claims are judged on the evaluator. ``anchor`` and ``full`` are required; other models
    that are absent leave their rows out (noted). Paired differences (CXRL - other) are shown
    when both Metrics carry replicates with the same ``boot_key`` (same reports, same
    sampling seeds, same bootstrap seed); otherwise they are n/a (noted).
"""


def _validate(metrics: Mapping[str, Any], run_ids: Mapping[str, str], sources: Mapping[str, str]) -> list[str]:
    for m in REQUIRED_MODELS:
        if m not in metrics:
            raise DataError(f"metrics: no entry for model '{m}'; expected metrics JSONs for at least "
                            f"{list(REQUIRED_MODELS)} (got {sorted(metrics)})")
    for model, d in metrics.items():
        if model not in MAIN_MODELS + REWARD_MODELS:
            continue
        where = sources.get(model, f"metrics[{model!r}]")
        if not isinstance(d, Mapping):
            raise DataError(f"{where}: expected a metrics JSON object, got {type(d).__name__}")
        need(d, ["n_images"], where=where, expected="int")
        need(d, ["feature_extractor"], where=where, expected="str")
        for judge in (False, True):
            need_metric(d, ev(["fid"], judge), where=where)
            if model in MAIN_MODELS:
                for k in FULL_KEYS:
                    need_metric(d, ev([k], judge), where=where)
                for c in (*P.CXR_CLASSES, "avg"):
                    need_metric(d, ev(["auroc", c], judge), where=where)
    for judge in ("reward", "eval"):
        for net in ("aligner", "diag", "dualenc"):
            need(metrics["anchor"], ["judges", judge, net], where=sources.get("anchor", "metrics['anchor']"),
                 expected="each judge's accuracy on the held-out test pairs (medrl.metrics.cxr_eval)")
    return sorted(m for m in metrics if m not in MAIN_MODELS + REWARD_MODELS)


# Metrics a network judges (the others, MS-SSIM, use no network); their evaluator keys carry this prefix
JUDGED = ("r_align", "similarity", "auroc", "fid", "kid")
EVAL_PREFIX = "eval_"
EVALUATOR = "(ours, evaluator)"
CLAIM_VERDICT = "Verdict (evaluator)"  # the claims' verdict column: judged on the independent evaluator


def ev(path: Sequence[str], evaluator: bool = True) -> list[str]:
    """The metrics-JSON path of ``path`` as judged by the independent evaluator (``evaluator``)
    or by the reward networks; a metric no network judges has one path."""
    path = list(path)
    return [EVAL_PREFIX + path[0], *path[1:]] if evaluator and path[0] in JUDGED else path


def judge_notes(anchor: Mapping[str, Any]) -> list[str]:
    """What the two judges are, each one's accuracy on the held-out real test pairs, and whether an
    evaluator is not independent (released weights: the reward net itself)."""
    j = anchor["judges"]

    def both(f) -> str:
        vals = []
        for judge in ("reward", "eval"):
            try:
                vals.append(fmt_num(float(f(j[judge])), 3))
            except (KeyError, TypeError, ValueError):
                vals.append(NA)
        return " / ".join(vals)

    n = j["eval"]["diag"].get("n", NA)
    acc = (f"Judge accuracy on the {n} held-out real test pairs (reward net / evaluator): posture psi MAE (mean over "
           f"sx, sy, tx, ty, theta; {j['eval']['aligner'].get('reference', NA)}) "
           f"{both(lambda d: d['aligner']['psi']['psi_mae_mean'])} (identity "
           f"{both(lambda d: d['aligner']['psi']['psi_mae_identity_mean'])}); diagnostic AUROC (macro, against "
           f"{j['eval']['diag'].get('reference', NA)}) {both(lambda d: d['diag']['auroc']['avg'])}; dual encoder "
           f"image->report recall@1 {both(lambda d: d['dualenc']['i2t_recall@1'])}, own-report AUROC "
           f"{both(lambda d: d['dualenc']['i2t_auroc'])}.")
    notes = [
        "Two judges: (ours) = the reward networks (the paper's protocol: the networks RL optimised score its "
        f"samples); {EVALUATOR} = independent evaluators trained on the other half of the train pairs (split by "
        "image-id hash: they never saw a reward net's training image), with another seed and width. Claims are "
        "judged on the evaluator. MS-SSIM uses no network (one judge).",
        acc,
    ]
    shared = [net for net in ("aligner", "diag", "dualenc") if not j["eval"][net].get("independent", False)]
    if shared:
        notes.append(f"Not independent: the {', '.join(shared)} evaluator is the released reward network itself "
                     "(real weights); its evaluator numbers repeat the reward judge's.")
    return notes


def _diff(metrics: Mapping[str, Any], a: str, b: str, path: Sequence[str], problems: list[str]) -> dict | None:
    if a not in metrics or b not in metrics:
        return None
    ma, mb = need(metrics[a], path, where=a), need(metrics[b], path, where=b)
    try:
        return diff_from_boot(ma, mb, where=f"{a} - {b} ({'.'.join(path)})")
    except DataError as e:
        problems.append(str(e))
        return None


def _paper_diff(table: Mapping[str, Mapping[str, float]], a: str, b: str, key: str) -> float | None:
    if a in table and b in table and key in table[a] and key in table[b]:
        return table[a][key] - table[b][key]
    return None


_ORDER = ("anchor", "llm_cxr", "full", "no_ace", "no_rlcf", "repeated")  # rows of Tables 1, 2a and 3


@dataclass
class _Build:
    """What every CXRL table reads: the metrics, run ids, notes shared by all tables, and the
    differences shown as n/a since the last table (``problems``, emptied by ``_unpaired``)."""

    metrics: Mapping[str, Mapping[str, Any]]
    run_ids: Mapping[str, str]
    out_dir: Path
    common: list[str]
    fe: list[str]
    problems: list[str] = field(default_factory=list)

    def rid(self, m: str) -> str:
        return str(self.run_ids[m])

    @property
    def diff_pairs(self) -> list[tuple[str, str]]:
        return [("full", b) for b in ("anchor", "no_ace", "no_rlcf", "repeated") if b in self.metrics]

    def diff(self, a: str, b: str, path: Sequence[str]) -> dict | None:
        return _diff(self.metrics, a, b, path, self.problems)


def build_cxrl_tables(
    metrics: Mapping[str, Mapping[str, Any]],
    run_ids: Mapping[str, str],
    out_dir: str | Path,
    *,
    sources: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, dict[str, str]]:
    """Write cxrl_table1, cxrl_table2a, cxrl_table2b, cxrl_table3 and cxrl_claims to ``out_dir``.

    ``metrics``: model name -> metrics JSON dict (schema below); ``run_ids``: model -> MLflow
    run id of the stage that wrote it (a missing key is an error, an empty id shows as n/a
    with a note); ``sources``: model -> JSON path (for error messages);
    ``notes``: extra notes for every table (e.g. "phantom data, tiny models"). Each table is
    ``<name>.csv/.md/.tex`` + ``<name>.values.csv``; returns {table: {format: path}}.
    """
    sources = dict(sources or {})
    out_dir = Path(out_dir)
    ignored = _validate(metrics, run_ids, sources)
    run_ids, run_notes = resolve_run_ids(run_ids, [m for m in MAIN_MODELS + REWARD_MODELS if m in metrics])
    fe = sorted({str(metrics[m]["feature_extractor"]) for m in metrics if m in MAIN_MODELS + REWARD_MODELS})
    common = _common_notes(metrics, ignored, notes, run_notes)
    b = _Build(metrics, run_ids, out_dir, common, fe)
    written: dict[str, dict[str, str]] = {}
    written["cxrl_table1"] = _table1(b)
    written["cxrl_table2a"] = _table2a(b)
    written["cxrl_table2b"] = _table2b(b)
    written["cxrl_table3"] = _table3(b)
    written["cxrl_claims"] = _claims(metrics, run_ids, out_dir, b.problems, common)
    return written


def _common_notes(metrics: Mapping[str, Any], ignored: list[str], notes: Sequence[str], run_notes: list[str]) -> list[str]:
    """Notes under every CXRL table: how the CIs are computed, sources, models not run or ignored."""
    absent = [m for m in MAIN_MODELS + REWARD_MODELS if m not in metrics]
    ci_level = float(metrics["full"]["fid"].get("ci", 0.95))
    common = [
        f"Ours: value [{ci_level:.0%} bootstrap CI] over generated images, resampling whole reports (the samples of "
        "one report are not independent; FID: basic and KID: percentile bootstrap over real images and generated "
        "reports; MS-SSIM: over reports). Differences are paired bootstraps on the same reports and seeds.",
        P.CXRL_SOURCE_NOTE,
        *judge_notes(metrics["anchor"]),
        *notes,
        *run_notes,
    ]
    if absent:
        common.append(f"Not run, rows omitted: {', '.join(absent)}.")
    if ignored:
        common.append(f"Metrics for models outside the paper tables were ignored: {', '.join(ignored)}.")
    return common


def _table1(b: _Build) -> dict[str, str]:
    """Table 1: r_align, AUROC and CXR-CLIP similarity per model, then the CXRL - other differences."""
    metrics, rid = b.metrics, b.rid
    rec = Recorder("cxrl_table1")
    cols = [("r_align", ["r_align"], "r_align (psi) \u2191"), ("auroc", ["auroc", "avg"], "AUROC \u2191"),
            ("similarity", ["similarity"], "CXR-CLIP similarity \u2191")]
    rows = []
    for m in _ORDER:
        if m != "llm_cxr" and m not in metrics:
            continue
        label = P.CXRL_LABELS[m]
        row: dict[str, Any] = {"Method": label, "Model": m if m != "llm_cxr" else "(external, not run)"}
        for key, path, head in cols:
            d = P.CXRL_TABLE1_DIGITS[key]
            row[f"{head} (ours)"] = NA if m == "llm_cxr" else rec.ours(
                label, head, need_metric(metrics[m], path, where=m), model=m, run_id=rid(m), digits=3)
            row[f"{head} {EVALUATOR}"] = NA if m == "llm_cxr" else rec.ours(
                label, f"{head} {EVALUATOR}", need_metric(metrics[m], ev(path), where=m), model=m, run_id=rid(m),
                digits=3)
            row[f"{head} (paper)"] = rec.paper(label, head, P.CXRL_TABLE1.get(m, {}).get(key), model=m, digits=d)
        row["n images"] = "" if m == "llm_cxr" else str(metrics[m]["n_images"])
        row["MLflow run"] = "" if m == "llm_cxr" else rid(m)
        rows.append(row)
    for a, b_ in b.diff_pairs:
        label = f"CXRL - {P.CXRL_LABELS[b_]}"
        row = {"Method": label, "Model": f"{a} - {b_}"}
        for key, path, head in cols:
            row[f"{head} (ours)"] = rec.ours(label, head, b.diff(a, b_, path), model=f"{a}-{b_}",
                                             run_id=f"{rid(a)} - {rid(b_)}", digits=3, source="diff")
            row[f"{head} {EVALUATOR}"] = rec.ours(label, f"{head} {EVALUATOR}", b.diff(a, b_, ev(path)),
                                                  model=f"{a}-{b_}", run_id=f"{rid(a)} - {rid(b_)}", digits=3,
                                                  source="diff")
            row[f"{head} (paper)"] = rec.paper(label, head, _paper_diff(P.CXRL_TABLE1, a, b_, key), model=f"{a}-{b_}",
                                               digits=P.CXRL_TABLE1_DIGITS[key])
        row["n images"] = ""
        row["MLflow run"] = f"{rid(a)} - {rid(b_)}"
        rows.append(row)
    t1_notes = b.common + [
        "r_align = -(max(|sx-1|,|sy-1|) + |theta|/(2 pi) + sqrt(tx^2+ty^2)) from the posture aligner; closer to 0 is "
        "better. AUROC = macro average over the 11 pathologies (see Table 3). CXR-CLIP similarity = image-report "
        "cosine similarity of the dual encoder (the paper's column header says 'CXR-CLIP Distance' with higher = "
        "better).",
        "Paper differences in the difference rows are computed from the published numbers.",
    ]
    return write_with_values(pd.DataFrame(rows), b.out_dir / "cxrl_table1", rec,
                             caption="CXRL Table 1: CXR-specific quality of generated CXRs", label="tab:cxrl1",
                             notes=t1_notes + _unpaired(b.problems))


def _table2a(b: _Build) -> dict[str, str]:
    """Table 2(a): FID and MS-SSIM (and KID, not in the paper) per model, then the differences."""
    metrics, rid = b.metrics, b.rid
    rec = Recorder("cxrl_table2a")
    cols2 = [("fid", "FID \u2193", 2), ("msssim", "MS-SSIM \u2193", 3)]
    rows = []
    for m in _ORDER:
        if m != "llm_cxr" and m not in metrics:
            continue
        label = P.CXRL_LABELS[m]
        row = {"Model": label, "Key": m if m != "llm_cxr" else "(external, not run)"}
        for key, head, d in cols2:
            row[f"{head} (ours)"] = NA if m == "llm_cxr" else rec.ours(label, head, metrics[m][key], model=m,
                                                                         run_id=rid(m), digits=max(d, 3))
            if key in JUDGED:
                row[f"{head} {EVALUATOR}"] = NA if m == "llm_cxr" else rec.ours(
                    label, f"{head} {EVALUATOR}", metrics[m][EVAL_PREFIX + key], model=m, run_id=rid(m),
                    digits=max(d, 3))
            row[f"{head} (paper)"] = rec.paper(label, head, P.CXRL_TABLE2A.get(m, {}).get(key), model=m, digits=d)
        row["KID (ours, not in paper)"] = NA if m == "llm_cxr" else rec.ours(label, "KID", metrics[m]["kid"], model=m,
                                                                               run_id=rid(m), digits=4)
        row[f"KID {EVALUATOR}"] = NA if m == "llm_cxr" else rec.ours(label, f"KID {EVALUATOR}", metrics[m]["eval_kid"],
                                                                       model=m, run_id=rid(m), digits=4)
        row["n images"] = "" if m == "llm_cxr" else str(metrics[m]["n_images"])
        row["MLflow run"] = "" if m == "llm_cxr" else rid(m)
        rows.append(row)
    for a, b_ in b.diff_pairs:
        label = f"CXRL - {P.CXRL_LABELS[b_]}"
        row = {"Model": label, "Key": f"{a} - {b_}"}
        for key, head, d in cols2:
            row[f"{head} (ours)"] = rec.ours(label, head, b.diff(a, b_, [key]), model=f"{a}-{b_}",
                                             run_id=f"{rid(a)} - {rid(b_)}", digits=max(d, 3), source="diff")
            if key in JUDGED:
                row[f"{head} {EVALUATOR}"] = rec.ours(label, f"{head} {EVALUATOR}", b.diff(a, b_, ev([key])),
                                                      model=f"{a}-{b_}", run_id=f"{rid(a)} - {rid(b_)}",
                                                      digits=max(d, 3), source="diff")
            row[f"{head} (paper)"] = rec.paper(label, head, _paper_diff(P.CXRL_TABLE2A, a, b_, key), model=f"{a}-{b_}",
                                               digits=d)
        row["KID (ours, not in paper)"] = rec.ours(label, "KID", b.diff(a, b_, ["kid"]),
                                                   model=f"{a}-{b_}", run_id=f"{rid(a)} - {rid(b_)}", digits=4,
                                                   source="diff")
        row[f"KID {EVALUATOR}"] = rec.ours(label, f"KID {EVALUATOR}", b.diff(a, b_, ["eval_kid"]),
                                           model=f"{a}-{b_}", run_id=f"{rid(a)} - {rid(b_)}", digits=4,
                                           source="diff")
        row["n images"] = ""
        row["MLflow run"] = f"{rid(a)} - {rid(b_)}"
        rows.append(row)
    t2_notes = b.common + [
        f"FID/KID feature extractor: {'; '.join(b.fe)}. The paper uses a CXR DenseNet-121 (torchxrayvision); absolute "
        "FID values depend on the feature network and sample sizes and are comparable only within a column.",
        "MS-SSIM: mean over pairs of images generated for the same report (lower = more diverse); window/scales "
        "adapted to the image size (medrl.metrics.msssim).",
    ]
    return write_with_values(pd.DataFrame(rows), b.out_dir / "cxrl_table2a", rec,
                             caption="CXRL Table 2(a): image quality (FID, MS-SSIM)", label="tab:cxrl2a",
                             notes=t2_notes + _unpaired(b.problems))


def _table2b(b: _Build) -> dict[str, str]:
    """Table 2(b): FID per reward feedback model and its difference to the anchor."""
    metrics, rid = b.metrics, b.rid
    rec = Recorder("cxrl_table2b")
    rows = []
    for m, (exp, reward, pfid) in P.CXRL_TABLE2B.items():
        if m not in metrics:
            continue
        row = {"Exp. #": exp, "Reward": reward, "Model": m,
               "FID \u2193 (ours)": rec.ours(reward, "FID", metrics[m]["fid"], model=m, run_id=rid(m), digits=3),
               f"FID \u2193 {EVALUATOR}": rec.ours(reward, f"FID {EVALUATOR}", metrics[m]["eval_fid"], model=m,
                                                   run_id=rid(m), digits=3),
               "FID \u2193 (paper)": rec.paper(reward, "FID", pfid, model=m, digits=P.CXRL_TABLE2B_DIGITS)}
        if m != "anchor":
            d = b.diff(m, "anchor", ["fid"])
            row["FID - anchor (ours)"] = rec.ours(reward, "FID - anchor", d, model=f"{m}-anchor",
                                                  run_id=f"{rid(m)} - {rid('anchor')}", digits=3, source="diff")
            row["FID - anchor (paper)"] = rec.paper(reward, "FID - anchor", pfid - P.CXRL_TABLE2B["anchor"][2],
                                                    model=f"{m}-anchor", digits=P.CXRL_TABLE2B_DIGITS)
            row[f"FID - anchor {EVALUATOR}"] = rec.ours(reward, f"FID - anchor {EVALUATOR}",
                                                        b.diff(m, "anchor", ["eval_fid"]), model=f"{m}-anchor",
                                                        run_id=f"{rid(m)} - {rid('anchor')}", digits=3, source="diff")
        else:
            row["FID - anchor (ours)"] = ""
            row["FID - anchor (paper)"] = ""
            row[f"FID - anchor {EVALUATOR}"] = ""
        row["MLflow run"] = rid(m)
        rows.append(row)
    return write_with_values(pd.DataFrame(rows), b.out_dir / "cxrl_table2b", rec,
                             caption="CXRL Table 2(b): FID per reward feedback model", label="tab:cxrl2b",
                             notes=b.common + [f"FID feature extractor: {'; '.join(b.fe)}."] + _unpaired(b.problems))


def _table3(b: _Build) -> dict[str, str]:
    """Table 3: per-pathology AUROC (classes as rows), the CXRL - anchor difference and the run ids."""
    metrics, rid = b.metrics, b.rid
    rec = Recorder("cxrl_table3")
    t3_models = [m for m in _ORDER if m == "llm_cxr" or m in metrics]
    rows = []
    for c in (*P.CXR_CLASSES, "avg"):
        abbrev = P.CXR_ABBREV[c]
        row = {"Class": abbrev, "Pathology": "macro average" if c == "avg" else c}
        for m in t3_models:
            label = P.CXRL_LABELS[m]
            if m != "llm_cxr":
                row[f"{label} (ours)"] = rec.ours(abbrev, label, metrics[m]["auroc"][c], model=m, run_id=rid(m),
                                                  digits=3)
                row[f"{label} {EVALUATOR}"] = rec.ours(abbrev, f"{label} {EVALUATOR}", metrics[m]["eval_auroc"][c],
                                                       model=m, run_id=rid(m), digits=3)
            pv = P.CXRL_TABLE3.get(m, {}).get(c)
            if m in P.CXRL_TABLE3:
                row[f"{label} (paper)"] = rec.paper(abbrev, label, pv, model=m, digits=P.CXRL_TABLE3_DIGITS)
        row.update(_ceiling_cells(b, rec, c, abbrev))
        d = b.diff("full", "anchor", ["auroc", c])
        row["CXRL - anchor (ours)"] = rec.ours(abbrev, "CXRL - anchor", d, model="full-anchor",
                                               run_id=f"{rid('full')} - {rid('anchor')}", digits=3, source="diff")
        row["CXRL - anchor (paper)"] = rec.paper(abbrev, "CXRL - anchor",
                                                 P.CXRL_TABLE3["full"][c] - P.CXRL_TABLE3["anchor"][c],
                                                 model="full-anchor", digits=P.CXRL_TABLE3_DIGITS)
        row[f"CXRL - anchor {EVALUATOR}"] = rec.ours(abbrev, f"CXRL - anchor {EVALUATOR}",
                                                     b.diff("full", "anchor", ["eval_auroc", c]), model="full-anchor",
                                                     run_id=f"{rid('full')} - {rid('anchor')}", digits=3, source="diff")
        rows.append(row)
    rows.append(_table3_run_row(b, t3_models))
    n_valid = {c: metrics["full"]["auroc"][c].get("n") for c in P.CXR_CLASSES}
    t3_notes = b.common + [
        "AUROC of the diagnostic CXR classifier on generated images against the labels of the report they were "
        "generated from; uncertain (-1) labels are ignored per class and unmentioned labels count as negatives (as "
        "the diagnostic model is trained: CheXpert U-Ignore, blank = 0); n/a = only one label value "
        "among valid reports. Avg. = macro mean over classes with a defined AUROC.",
        "Valid reports per class (CXRL): " + ", ".join(f"{P.CXR_ABBREV[c]} {n}" for c, n in n_valid.items()) + ".",
        "The paper has no Table-3 numbers for w/o ACE / w/o RLCF.",
        *_ceiling_notes(metrics["anchor"].get("vae_ceiling")),
    ]
    return write_with_values(pd.DataFrame(rows), b.out_dir / "cxrl_table3", rec,
                             caption="CXRL Table 3: per-pathology AUROC on generated CXRs", label="tab:cxrl3",
                             notes=t3_notes + _unpaired(b.problems))


_REAL = f"Real test images {EVALUATOR}"
_CEILING = f"Real test images through the VAE (ceiling) {EVALUATOR}"
_CLOSED = f"Gap to the ceiling closed by CXRL {EVALUATOR}"


def _ceiling_cells(b: _Build, rec: Recorder, c: str, abbrev: str) -> dict[str, str]:
    """Table 3's ceiling columns for class ``c`` (none without the anchor's ``vae_ceiling``): the
    evaluator's AUROC on real test images, after a VAE round trip, and the share of the anchor's
    gap to that ceiling which CXRL closed."""
    vc = b.metrics["anchor"].get("vae_ceiling")
    if not vc:
        return {}
    anchor = b.metrics["anchor"]["eval_auroc"][c]
    run = b.rid("anchor")
    out = {}
    for col, block in ((_REAL, "real"), (_CEILING, "vae_roundtrip")):
        v = vc["eval"][block]["auroc"].get(c)
        out[col] = rec.ours(abbrev, col, None if v is None or v != v else {"value": float(v)}, model="anchor",
                            run_id=run, digits=3, source="vae_ceiling")
    goal = vc["eval"]["vae_roundtrip"]["auroc"].get(c)
    # a ceiling below the anchor's interval is a class the evaluator cannot read: no gap either
    closed = (share_closed(anchor, b.metrics["full"]["eval_auroc"][c], float(goal))
              if "full" in b.metrics and goal is not None and goal == goal and goal > anchor["lo"] else None)
    out[_CLOSED] = fmt_share(closed)
    return out


def _ceiling_notes(vc: Mapping[str, Any] | None) -> list[str]:
    if not vc:
        return []
    rec = vc["eval"]
    kept = ", ".join(f"{P.CXR_ABBREV[c]} {fmt_num(rec['real']['recall'][c], 2)} -> "
                     f"{fmt_num(rec['vae_roundtrip']['recall'][c], 2)}"
                     for c in P.CXR_CLASSES if rec["real"]["recall"].get(c) is not None)
    return [f"VAE ceiling: the evaluator's diagnostic model on the {vc['n_images']} real held-out images as they "
            "are and after a round trip through the stack's VAE (encode, decode), AUROC against the report labels "
            "read as for generated images; a generator sampling in that latent space cannot exceed the second. Gap "
            "to the ceiling closed = (CXRL - anchor) / (ceiling - anchor), evaluator AUROC ('no gap': the ceiling "
            "lies within or below the anchor's own 95 % interval). The evaluator's recall (p >= 0.5, exact labels) "
            f"of each finding, real -> through the VAE: {kept}."]


def _table3_run_row(b: _Build, t3_models: list[str]) -> dict[str, str]:
    """Table 3's last row: the MLflow run of each column."""
    run_row = {"Class": "MLflow run", "Pathology": ""}
    for m in t3_models:
        label = P.CXRL_LABELS[m]
        if m != "llm_cxr":
            run_row[f"{label} (ours)"] = b.rid(m)
            run_row[f"{label} {EVALUATOR}"] = b.rid(m)
        if m in P.CXRL_TABLE3:
            run_row[f"{label} (paper)"] = ""
    run_row["CXRL - anchor (ours)"] = f"{b.rid('full')} - {b.rid('anchor')}"
    run_row["CXRL - anchor (paper)"] = ""
    run_row[f"CXRL - anchor {EVALUATOR}"] = f"{b.rid('full')} - {b.rid('anchor')}"
    return run_row


_NAMES = {"r_align": "r_align", "auroc": "AUROC (avg)", "similarity": "CXR-CLIP similarity", "fid": "FID",
          "msssim": "MS-SSIM"}
_T1 = (("r_align", ("r_align",)), ("auroc", ("auroc", "avg")), ("similarity", ("similarity",)))
_T2B = {m: {"fid": v[2]} for m, v in P.CXRL_TABLE2B.items()}
_CLAIMS: list[tuple[str, str, str, tuple[str, ...], bool, dict | None, str]] = [
    # (claim, a, b, metric path, higher is better, paper table, paper key); difference = a - b
    *[(f"CXRL beats {P.CXRL_LABELS[b]} on {_NAMES[k]}", "full", b, p, True, P.CXRL_TABLE1, k)
      for b in ("anchor", "no_ace", "no_rlcf") for k, p in _T1],
    *[(f"{P.CXRL_LABELS[a]} beats the anchor on {_NAMES[k]}", a, "anchor", p, True, P.CXRL_TABLE1, k)
      for a in ("no_ace", "no_rlcf") for k, p in _T1],
    *[(f"CXRL beats {P.CXRL_LABELS[b]} on {_NAMES[k]}", "full", b, (k,), False, P.CXRL_TABLE2A, k)
      for b in ("anchor", "no_ace", "no_rlcf") for k in ("fid", "msssim")],
    *[(f"{P.CXRL_TABLE2B[a][1]} alone beats the anchor on FID", a, "anchor", ("fid",), False, _T2B, "fid")
      for a in REWARD_MODELS],
    *[(f"All rewards beat {P.CXRL_TABLE2B[b][1]} alone on FID", "full", b, ("fid",), False, _T2B, "fid")
      for b in REWARD_MODELS],
]


def _claims(metrics: Mapping[str, Any], run_ids: Mapping[str, str], out_dir: Path, problems: list[str],
            common: list[str]) -> dict[str, str]:
    rec = Recorder("cxrl_claims")
    rows = []
    for claim, a, b, path, hib, ptable, pkey in _CLAIMS:
        if a not in metrics or b not in metrics:
            continue
        d = _diff(metrics, a, b, list(path), problems)
        d_eval = _diff(metrics, a, b, ev(path), problems)
        pd_ = _paper_diff(ptable, a, b, pkey) if ptable is not None else None
        digits, runs = 3, f"{run_ids[a]} - {run_ids[b]}"
        rows.append({
            "Claim": claim, "Difference": f"{a} - {b}", "Better": "higher" if hib else "lower",
            "Paper difference": rec.paper(claim, "paper", pd_, model=f"{a}-{b}", digits=3) if pd_ is not None else "",
            "Reward judge difference [CI]": rec.ours(claim, "reward judge", d, model=f"{a}-{b}", run_id=runs,
                                                     digits=digits, source="diff"),
            "Verdict (reward judge)": verdict(d, hib, digits),
            "Evaluator difference [CI]": rec.ours(claim, "evaluator", d_eval, model=f"{a}-{b}", run_id=runs,
                                                  digits=digits, source="diff"),
            CLAIM_VERDICT: verdict(d_eval, hib, digits),
            "MLflow runs": runs,
        })
    notes = common + [f"'{CLAIM_VERDICT}' is the claim's verdict: it is taken on the independent evaluator's "
                      "difference; the reward judge's (the paper's protocol) is shown beside it.",
                      "Verdict: the paired-bootstrap CI of the difference lies on the claimed side of 0 "
                      "(supported), on the other side (contradicted), or includes 0 (inconclusive); a CI within rounding of 0 "
                      "at the shown precision is no difference.",
                      "Paper difference: computed from the published numbers (Tables 1, 2a, 2b)."]
    notes += _unpaired(problems)
    return write_with_values(pd.DataFrame(rows), out_dir / "cxrl_claims", rec,
                  caption="CXRL: direction of each paper claim, measured here", label="tab:cxrl-claims", notes=notes)


def _unpaired(problems: list[str]) -> list[str]:
    """Notes for differences shown as n/a (then forgets them, ready for the next table)."""
    out = [f"Difference n/a: {p}" for p in dict.fromkeys(problems)]
    problems.clear()
    return out


build_cxrl_tables.__doc__ = (build_cxrl_tables.__doc__ or "") + CXR_SCHEMA_DOC


# ----------------------------------------------------------------------------- over RL seeds

# The headline metrics over seeds: (metric path, header, higher is better).
SEED_METRICS: tuple[tuple[tuple[str, ...], str, bool], ...] = (
    *((p, _NAMES[k], True) for k, p in _T1), (("fid",), "FID", False), (("msssim",), "MS-SSIM", False))


def seed_comparisons(variants: Sequence[str]) -> list[tuple[str, str]]:
    """The headline differences a - b among ``variants`` (and the anchor): every variant - anchor,
    then CXRL (full) - every other variant."""
    pairs = [(v, "anchor") for v in variants]
    if "full" in variants:
        pairs += [("full", v) for v in variants if v != "full"]
    return pairs


def build_cxrl_seed_table(
    anchor: Mapping[str, Any],
    per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]],
    run_ids: Mapping[str, str],
    out_dir: str | Path,
    *,
    notes: Sequence[str] = (),
) -> dict[str, str]:
    """``cxrl_seeds``: the headline paired differences (``seed_comparisons``) on r_align, AUROC,
    similarity, FID and MS-SSIM in every RL seed, with mean, spread and the verdict over seeds
    (medrl.tables.seeds).

    ``anchor``: the anchor's metrics JSON (no RL seed); ``per_seed``: seed -> {variant: metrics
    JSON} (schema of ``build_cxrl_tables``); ``run_ids``: "anchor" and "<variant>-s<seed>" ->
    MLflow run id (empty: n/a). A difference that cannot be paired is n/a (noted)."""
    seeds = list(per_seed)
    if not seeds:
        raise DataError("per_seed: no seeds; expected the variants' metrics of at least one RL seed")
    variants = list(per_seed[seeds[0]])
    for s in seeds:
        if list(per_seed[s]) != variants:
            raise DataError(f"per_seed[{s}]: variants {list(per_seed[s])}; expected {variants} as in seed {seeds[0]}")
        for v in variants:
            for path, _, _ in SEED_METRICS:
                for evaluator in (False, True):
                    need_metric(per_seed[s][v], ev(path, evaluator), where=f"{v} seed {s}")
    rid, run_notes = resolve_run_ids(run_ids, ["anchor", *(f"{v}-s{s}" for s in seeds for v in variants)])
    problems: list[str] = []

    def run_of(m: str, s: int) -> str:
        return rid["anchor"] if m == "anchor" else rid[f"{m}-s{s}"]

    rows = [SeedRow(f"{a} - {b}", name, hib, 3,
                    diffs={s: _diff({"anchor": anchor, **per_seed[s]}, a, b, p, problems) for s in seeds},
                    run_ids={s: f"{run_of(a, s)} - {run_of(b, s)}" for s in seeds}, no_verdict=no_verdict)
            for a, b in seed_comparisons(variants) for path, head, hib in SEED_METRICS
            for name, p, no_verdict in _seed_judges(path, head)]
    if "rate" in anchor.get("planted", {}):  # the planted finding where a report states it (tables.cxrl_planted)
        head = f"{anchor['planted']['planted']['finding']} drawn where stated {SEED_EVALUATOR}"
        rows += [SeedRow(f"{v} - anchor", head, True, 3,
                         diffs={s: _diff({"anchor": anchor, **per_seed[s]}, v, "anchor", ["planted", "rate"], problems)
                                for s in seeds},
                         run_ids={s: f"{run_of(v, s)} - {rid['anchor']}" for s in seeds}) for v in variants]
    notes = ["Anchor: one base model (no RL seed), the same in every column; every other model: one CXRL run per "
             "seed. Differences resample whole reports (paired, same reports and sampling seeds).",
             f"Every metric a network judges has two rows: {SEED_EVALUATOR} (independent evaluators: the other half "
             f"of the train pairs, another seed and width) and {SEED_REWARD} (the reward networks, the paper's "
             "protocol). The verdicts are computed on the independent evaluator's differences only; the reward "
             "judge's rows are shown for reference.",
             *(judge_notes(anchor) if "judges" in anchor else []),
             *notes, P.CXRL_SOURCE_NOTE, *run_notes, *_unpaired(problems)]
    return build_seed_table(rows, seeds, Path(out_dir) / "cxrl_seeds",
                            caption="CXRL: headline differences in every RL seed (verdicts on the independent "
                                    "evaluator)", label="tab:cxrl-seeds", notes=notes)


SEED_EVALUATOR, SEED_REWARD = "[evaluator]", "[reward judge]"
SEED_NO_VERDICT = "(reward judge: no verdict; see the evaluator row)"


def _seed_judges(path: Sequence[str], head: str) -> list[tuple[str, list[str], str | None]]:
    """The seeds-table rows of one metric: (name, metrics path, no_verdict) -- the evaluator's row
    (with the verdict), then the reward judge's (for reference); one row for MS-SSIM (no judge)."""
    if path[0] not in JUDGED:
        return [(head, list(path), None)]
    return [(f"{head} {SEED_EVALUATOR}", ev(path), None), (f"{head} {SEED_REWARD}", list(path), SEED_NO_VERDICT)]


def build_rlcf_modes_table(m: Mapping[str, Any], run_id: str, out_dir: str | Path) -> dict[str, str]:
    """``cxrl_rlcf_modes``: RLCF paired (own step noise), paired with shared step noise, and bank
    on the same policy samples (the output of ``medrl.metrics.rlcf_modes.compare_rlcf_modes``):
    comparative reward mean and std with CIs, reward-side cost per sample and per RL epoch."""
    where = "rlcf_modes metrics.json"
    rec = Recorder("cxrl_rlcf_modes")
    rid = run_id or NA
    rows = []
    for mode in MODES:
        rows.append({
            "RLCF mode": mode,
            "Mean comparative reward [CI]": rec.ours(mode, "mean", need_metric(m, [f"mean_{mode}"], where=where),
                                                     model=mode, run_id=rid, digits=3),
            "Std over samples [CI]": rec.ours(mode, "std", need_metric(m, [f"std_{mode}"], where=where),
                                              model=mode, run_id=rid, digits=3),
            "Reward s/sample": f"{float(need(m, ['seconds_per_sample', mode], where=where)):.3f}",
            "Reward s/epoch": f"{float(need(m, ['reward_seconds_per_epoch', mode], where=where)):.1f}",
            "MLflow run": rid,
        })
    for mode in PAIRED_MODES:
        diff = need_metric(m, [f"mean_diff_{mode}_minus_bank"], where=where)
        ratio = need_metric(m, [f"var_ratio_{mode}_over_bank"], where=where)
        rows.append({
            "RLCF mode": f"{mode} - bank",
            "Mean comparative reward [CI]": rec.ours(f"{mode} - bank", "mean", diff, model=f"{mode}-bank",
                                                     run_id=rid, digits=3),
            "Std over samples [CI]": "var ratio " + rec.ours(f"{mode} / bank", "var_ratio", ratio,
                                                             model=f"{mode}/bank", run_id=rid, digits=2),
            "Reward s/sample": f"x{float(need(m, [f'cost_ratio_{mode}_over_bank'], where=where)):.2f}",
            "Reward s/epoch": "",
            "MLflow run": rid,
        })
    corr = {mode: float(m.get(f"corr_policy_anchor_{mode}", float("nan"))) for mode in PAIRED_MODES}
    notes = [
        f"{int(need(m, ['n_samples'], where=where))} samples of the full policy, each scored against its own anchor "
        "sample from the same report and x_T (paired: its own per-step noise, as the trainer does; paired_shared: "
        "the sample's per-step noise too) and against the anchor bank's per-report mean (bank).",
        "Comparative reward = l_diag * r_diag + l_consist * r_consist (r_align is never compared). All modes estimate "
        "the same expectation over anchor noise; a bank of K samples per report adds a fixed per-report error of "
        "its own (its std shrinks as 1/sqrt(K)), which a mode - bank gap on few reports can reflect.",
        f"Correlation of policy and anchor scores: paired {corr['paired']:.2f}, paired_shared "
        f"{corr['paired_shared']:.2f} (a paired anchor lowers the variance only while this is high). "
        "paired_shared's baseline depends on the sample's own step noise, which biases the policy gradient.",
        f"Reward s/epoch: sampling + scoring for {int(need(m, ['samples_per_epoch'], where=where))} samples; the PPO "
        "update after it costs the same in every mode.",
    ]
    return write_with_values(pd.DataFrame(rows), Path(out_dir) / "cxrl_rlcf_modes", rec,
                             caption="CXRL: RLCF paired vs bank mode (cost and reward variance)",
                             label="tab:cxrl-rlcf-modes", notes=notes)
