"""RL4Med-DDPO tables: SD vs SD+RL (with the paired difference), APR per prompt, augmentation.

The seed text has no numbers (see ``paper.RL4MED_PAPER_NOTE``): the paper column is empty.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from medrl.errors import DataError
from medrl.metrics.auroc import auroc_with_ci
from medrl.metrics.bootstrap import bootstrap_ci, check_metric, diff_from_boot
from medrl.tables import paper as P
from medrl.tables.render import (NA, Recorder, fmt_num, fmt_pct, fmt_share, need, need_metric, resolve_run_ids,
                                 verdict, write_with_values)
from medrl.tables.seeds import SeedRow, build_seed_table

MODELS = ("sd", "rl")
LABELS = {"sd": "SD", "rl": "SD+RL"}
# (key, header, digits, higher is better or None when the paper states no direction)
MAIN_COLUMNS: tuple[tuple[str, str, int, bool | None], ...] = (
    ("fid", "FID \u2193", 3, False),
    ("kid", "KID \u2193", 4, False),
    ("perceptual", "Perceptual distance", 3, None),
    ("apr", "APR \u2191", 3, True),
    ("reward", "Mean reward \u2191", 3, True),
)

ISIC_SCHEMA_DOC = """
    Metrics-JSON schema for ISIC models (one file per model, ``sd`` and ``rl``)::

        {
          "fid":        Metric,  # fidelity.fid_kid(...)["fid_metric"]  (with boot, boot_key)
          "kid":        Metric,  # fidelity.fid_kid(...)["kid_metric"]
          "perceptual": Metric,  # perceptual.perceptual_distance(...)[1] (its Metric part)
          "perceptual_name": str,            # perceptual_distance(...)[1]["name"]
          "apr":        Metric,  # bootstrap_ci(exact_match_per_image, keep_boot=True, items=image keys)
          "reward":     Metric,  # bootstrap_ci(H=6 reward per image, keep_boot=True, items=image keys)
          "apr_per_prompt": {"<prompt>": Metric},   # bootstrap over that prompt's images
          "n_images":   int,
          "feature_extractor": str           # fid_kid(...)["feature_extractor"]
        }

    The five headline Metrics must carry ``boot``/``boot_key`` (``keep_boot=True``): the
    "RL - SD" row is their paired bootstrap difference, which exists only if both models were
    resampled over the same items (same prompts, same sampling seeds, same file layout) with
    the same bootstrap seed (checked through ``boot_key``). Per-prompt replicates are optional
    (without them the per-prompt difference is n/a).

    Augmentation input (``augment``) — the ``summary.json`` of medrl.metrics.augment, or
    ``augment_metrics_from_per_image(per_image.csv)`` for CIs::

        {"conditions": {"<condition>": {"overall": {"all": G}, "artifact": {"<a>=<0|1>": G},
                                        "subset": {"<subset>": G}}}}
        G = {"n": int, "n_pos": int, "acc": Metric | float | None, "auroc": Metric | float | None}

    Plain floats are shown without CI; "AUROC - real" needs Metrics with paired replicates.
"""


# ----------------------------------------------------------------------------- augmentation CIs


def augment_metrics_from_per_image(
    per_image: pd.DataFrame, *, n_boot: int, ci: float, seed: int,
    artifacts: Sequence[str] = ("hair", "gel_bubble", "ruler", "ink"), threshold: float = 0.5,
) -> dict[str, Any]:
    """Accuracy and AUROC with bootstrap CIs per condition and subgroup from augment's
    ``per_image.csv`` (columns condition, image, label, prob, subset, the artifact flags).

    Every condition is evaluated on the same real test images: rows are sorted by image and a
    group's resampling indices depend only on its size and ``seed``, so the replicates of two
    conditions are paired (``boot_key`` includes the image ids)."""
    need_cols = ["condition", "image", "label", "prob", "subset", *artifacts]
    missing = [c for c in need_cols if c not in per_image.columns]
    if missing:
        raise DataError(f"per_image: missing columns {missing}; expected {need_cols}")
    out: dict[str, Any] = {"conditions": {}}
    for cond, df in per_image.groupby("condition", sort=False):
        df = df.sort_values("image", kind="stable").reset_index(drop=True)
        groups: dict[str, dict[str, pd.DataFrame]] = {"overall": {"all": df}, "artifact": {}, "subset": {}}
        for a in artifacts:
            for v in (1, 0):
                groups["artifact"][f"{a}={v}"] = df[df[a].astype(int) == v]
        for name, g in df.groupby("subset", sort=True):
            groups["subset"][str(name)] = g
        entry: dict[str, Any] = {}
        for kind, gs in groups.items():
            entry[kind] = {}
            for name, g in gs.items():
                y = g["label"].to_numpy(dtype=np.float64)
                p = g["prob"].to_numpy(dtype=np.float64)
                items = g["image"].astype(str).tolist()
                rec: dict[str, Any] = {"n": int(len(g)), "n_pos": int((y == 1).sum())}
                if len(g) == 0:
                    rec.update(acc=None, auroc=None)
                else:
                    correct = ((p > threshold).astype(np.float64) == y).astype(np.float64)
                    rec["acc"] = bootstrap_ci(correct, n_boot=n_boot, ci=ci, seed=seed, keep_boot=True, items=items)
                    rec["auroc"] = auroc_with_ci(y[:, None], p[:, None], ["x"], n_boot=n_boot, ci=ci, seed=seed,
                                                 items=items)["x"]
                entry[kind][name] = rec
        out["conditions"][str(cond)] = entry
    return out


# ----------------------------------------------------------------------------- builder


# Model names accepted for the two ISIC models (the workflow may use the display names).
ALIASES = {"sd": "sd", "SD": "sd", "rl": "rl", "SD+RL": "rl", "sd+rl": "rl", "RL": "rl"}


def _canon(d: Mapping[str, Any], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = ALIASES.get(k, k)
        if key in out:
            raise DataError(f"{what}: both {k!r} and another alias of {key!r} given; expected one entry per model")
        out[key] = v
    return out


def _validate(metrics: Mapping[str, Any], run_ids: Mapping[str, str], sources: Mapping[str, str]) -> None:
    for m in MODELS:
        where = sources.get(m, f"metrics[{m!r}]")
        if m not in metrics:
            raise DataError(f"metrics: no entry for model '{m}'; expected metrics JSONs for {list(MODELS)} "
                            f"(got {sorted(metrics)})")
        d = metrics[m]
        if not isinstance(d, Mapping):
            raise DataError(f"{where}: expected a metrics JSON object, got {type(d).__name__}")
        for key, *_ in MAIN_COLUMNS:
            mt = need_metric(d, [key], where=where)
            if mt.get("boot") is None or mt.get("boot_key") is None:
                raise DataError(f"{where}: '{key}' has no bootstrap replicates ('boot', 'boot_key'); expected "
                                "keep_boot=True so the paired RL - SD difference can be formed")
        need(d, ["perceptual_name"], where=where, expected="str naming the perceptual measure")
        need(d, ["n_images"], where=where, expected="int")
        need(d, ["feature_extractor"], where=where, expected="str")
        per_prompt = need(d, ["apr_per_prompt"], where=where, expected="{prompt: Metric}")
        if not isinstance(per_prompt, Mapping) or not per_prompt:
            raise DataError(f"{where}: 'apr_per_prompt' is empty or not a mapping; expected {{prompt: Metric}}")
        for prompt, mt in per_prompt.items():
            check_metric(mt, where=f"{where}: 'apr_per_prompt.{prompt}'")
    a, b = set(metrics["sd"]["apr_per_prompt"]), set(metrics["rl"]["apr_per_prompt"])
    if a != b:
        raise DataError(f"apr_per_prompt: prompts differ between sd and rl (only sd: {sorted(a - b)[:3]}, only rl: "
                        f"{sorted(b - a)[:3]}); expected the same prompt set")


def build_rl4med_tables(
    metrics: Mapping[str, Mapping[str, Any]],
    augment: Mapping[str, Any] | None,
    run_ids: Mapping[str, str],
    out_dir: str | Path,
    *,
    sources: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, dict[str, str]]:
    """Write rl4med_main, rl4med_apr_per_prompt, rl4med_augment (if ``augment``) and
    rl4med_claims to ``out_dir``; returns {table: {format: path}}.

    ``metrics``: {"sd": JSON, "rl": JSON} (aliases "SD", "SD+RL" accepted); ``run_ids``: MLflow
    run ids for "sd", "rl" and (with ``augment``) "augment" — a missing key is an error, an
    empty id is shown as n/a with a note; ``sources``: model -> JSON path for error messages.
    """
    metrics, run_ids = _canon(metrics, "metrics"), _canon(run_ids, "run_ids")
    sources = _canon(sources or {}, "sources")
    out_dir = Path(out_dir)
    _validate(metrics, run_ids, sources)
    rid, run_notes = resolve_run_ids(run_ids, MODELS + (("augment",) if augment is not None else ()))
    sd, rl = metrics["sd"], metrics["rl"]
    ci_level = float(sd["apr"].get("ci", 0.95))
    perceptual_names = sorted({str(sd["perceptual_name"]), str(rl["perceptual_name"])})
    common = [
        f"Ours: value [{ci_level:.0%} bootstrap CI]. APR/reward: over generated images; perceptual distance: over "
        "prompts; FID: basic and KID: percentile bootstrap over real and generated images. RL - SD: paired "
        "bootstrap on the same prompts and sampling seeds.",
        P.RL4MED_PAPER_NOTE,
        *notes,
        *run_notes,
    ]
    written: dict[str, dict[str, str]] = {}
    diffs: dict[str, dict | None] = {}
    for key, *_ in MAIN_COLUMNS:
        diffs[key] = diff_from_boot(rl[key], sd[key], where=f"rl - sd ({key})")
    written["rl4med_main"] = _main_table(metrics, diffs, rid, out_dir, common, perceptual_names)
    written["rl4med_apr_per_prompt"] = _apr_per_prompt_table(sd, rl, rid, out_dir, common)
    if "planted" in sd and "planted" in rl:
        written["rl4med_planted"] = _planted_table(sd, rl, rid, out_dir, common)
    aug_claims: list[tuple[str, str, dict | None]] = []
    if augment is not None:
        written["rl4med_augment"], aug_claims = _augment_table(augment, rid["augment"], out_dir, common)
    written["rl4med_claims"] = _claims_table(diffs, aug_claims, rid, out_dir, common)
    return written


def _main_table(metrics: Mapping[str, Mapping[str, Any]], diffs: Mapping[str, dict | None], rid: Mapping[str, str],
                out_dir: Path, common: list[str], perceptual_names: list[str]) -> dict[str, str]:
    """rl4med_main: every main column for SD, SD+RL, their paired difference and (if measured)
    the VAE-ceiling reference rows."""
    sd, rl = metrics["sd"], metrics["rl"]
    pair_run = f"{rid['rl']} - {rid['sd']}"
    rec = Recorder("rl4med_main")
    rows = []
    for m in MODELS:
        row: dict[str, Any] = {"Model": LABELS[m]}
        for key, head, digits, _ in MAIN_COLUMNS:
            row[head] = rec.ours(LABELS[m], head, metrics[m][key], model=m, run_id=rid[m], digits=digits)
        row["paper"] = ""
        row["n images"] = str(metrics[m]["n_images"])
        row["MLflow run"] = rid[m]
        rows.append(row)
    row = {"Model": "RL - SD (paired)"}
    for key, head, digits, _ in MAIN_COLUMNS:
        row[head] = rec.ours("RL - SD", head, diffs[key], model="rl-sd", run_id=pair_run, digits=digits,
                             source="diff")
    row.update({"paper": "", "n images": "", "MLflow run": pair_run})
    rows.append(row)
    ceiling_notes = []
    vc = sd.get("vae_ceiling")
    if vc is not None:
        ceiling_notes.append(_vae_ceiling_rows(rec, rows, vc, rid["sd"]))
    fe = sorted({str(sd["feature_extractor"]), str(rl["feature_extractor"])})
    main_notes = common + [
        f"FID/KID feature extractor: {'; '.join(fe)}.",
        f"Perceptual distance between real and generated images of the same prompt: {'; '.join(perceptual_names)}.",
        "APR = share of generated images whose predicted artifact set (H=4 metric classifier, trained on a split "
        "disjoint from the reward classifier's) equals the prompt's exactly. Mean reward = H=6 reward classifier "
        "agreement with the prompt (the RL objective).",
        *ceiling_notes,
    ]
    return write_with_values(pd.DataFrame(rows), out_dir / "rl4med_main", rec,
                             caption="RL4Med-DDPO: SD vs SD+RL on ISIC", label="tab:rl4med-main",
                             notes=main_notes)


def _vae_ceiling_rows(rec: Recorder, rows: list[dict], vc: Mapping[str, Any], sd_run: str) -> str:
    """Append the reference rows (what APR real images reach, before and after the VAE) to ``rows``;
    returns their note."""
    for block, label in (("real", "Real test images (H=4 reference)"),
                         ("vae_roundtrip", "Real test images through the VAE (APR ceiling)")):
        row = {"Model": label, **{head: "" for _, head, _, _ in MAIN_COLUMNS}}
        row["APR \u2191"] = rec.ours(label, "APR \u2191", need_metric(vc, [block, "apr"], where="sd vae_ceiling"),
                                     model=f"sd-{block}", run_id=sd_run, digits=3)
        row.update({"paper": "", "n images": str(vc.get("n_images", "")), "MLflow run": sd_run})
        rows.append(row)
    recall = {b: vc[b].get("fires_when_present", {}) for b in ("real", "vae_roundtrip")}
    return (
        "APR ceiling: the H=4 metric model on real held-out images as they are and after a round trip through "
        "the stack's VAE (encode, decode); a generator sampling in that latent space cannot exceed the second. "
        "H=4 recall per artifact (real -> through the VAE): " + ", ".join(
            f"{h} {fmt_pct(recall['real'].get(h))} -> {fmt_pct(recall['vae_roundtrip'].get(h))}"
            for h in recall["real"]) + ".")


def _apr_per_prompt_table(sd: Mapping[str, Any], rl: Mapping[str, Any], rid: Mapping[str, str], out_dir: Path,
                          common: list[str]) -> dict[str, str]:
    """rl4med_apr_per_prompt: APR of SD and SD+RL per prompt and their paired difference."""
    pair_run = f"{rid['rl']} - {rid['sd']}"
    rec = Recorder("rl4med_apr_per_prompt")
    rows = []
    unpaired = 0
    for prompt in sorted(sd["apr_per_prompt"]):
        a, b = sd["apr_per_prompt"][prompt], rl["apr_per_prompt"][prompt]
        try:
            d = diff_from_boot(b, a, where=f"apr_per_prompt[{prompt!r}]")
        except DataError:
            d, unpaired = None, unpaired + 1
        rows.append({
            "Prompt": prompt,
            "APR SD": rec.ours(prompt, "APR SD", a, model="sd", run_id=rid["sd"], digits=3),
            "APR SD+RL": rec.ours(prompt, "APR SD+RL", b, model="rl", run_id=rid["rl"], digits=3),
            "RL - SD": rec.ours(prompt, "RL - SD", d, model="rl-sd", run_id=pair_run, digits=3, source="diff"),
            "paper": "",
            "n (SD/RL)": f"{a['n']}/{b['n']}",
            "MLflow runs (SD/RL)": f"{rid['sd']}/{rid['rl']}",
        })
    pp_notes = common + ["Per prompt: bootstrap over that prompt's generated images."]
    if unpaired:
        pp_notes.append(f"RL - SD n/a for {unpaired} prompts: no paired per-prompt replicates in the metrics JSONs.")
    return write_with_values(pd.DataFrame(rows), out_dir / "rl4med_apr_per_prompt", rec,
                             caption="RL4Med-DDPO: APR per prompt", label="tab:rl4med-apr",
                             notes=pp_notes)


_PLANTED_ROWS = {
    "rate": "{lesion} prompts asking for {artifact} (planted rate {planted_rate})",
    "false_rate": "{lesion} prompts without {artifact} (planted rate {planted_false_rate})",
    "reference_rate": "{other} prompts asking for {artifact} (truthful captions)",
    "reference_false_rate": "{other} prompts without {artifact} (truthful captions)",
    "apr_rate": "APR, {lesion} prompts asking for {artifact}",
    "reference_apr_rate": "APR, {other} prompts asking for {artifact} (truthful captions)",
}


def _planted_table(sd_all: Mapping[str, Any], rl_all: Mapping[str, Any], rid: Mapping[str, str], out_dir: Path,
                   common: list[str]) -> dict[str, str]:
    """rl4med_planted: how often the planted artifact is drawn, SD vs SD+RL, and the share of the
    planted gap RL closed (metrics.planted), judged by the H=4 evaluator and by the reward model."""
    plant = sd_all["planted"]["planted"]
    words = {"lesion": plant["lesion"], "artifact": plant["artifact"],
             "other": "NV" if plant["lesion"] == "MEL" else "MEL",
             **{k: f"{plant[k]:.2f}" for k in ("planted_rate", "planted_false_rate")}}
    from medrl.metrics.planted import ceiling_rates

    target = ceiling_rates(sd_all.get("vae_ceiling"), plant["artifact"])
    rec = Recorder("rl4med_planted")
    rows: list[dict[str, Any]] = []
    for block, judge in (("planted", "H=4 evaluator"), ("planted_reward_judge", "H=6 reward model")):
        if block in sd_all and block in rl_all:  # the gap is measured on the evaluator only
            rows += _planted_rows(rec, sd_all[block], rl_all[block], judge, words, rid,
                                  target if block == "planted" else None)
    notes = common + [
        f"Planted deficiency: in the base model's fine-tune captions of {plant['lesion']} images, '{plant['artifact']}' "
        f"is stated truthfully with probability {plant['caption_fidelity']:.2f}, else {_untruthful(plant)}: "
        f"the planted rate of {plant['artifact']} where asked is {plant['planted_rate']:.2f}, "
        f"where not asked {plant['planted_false_rate']:.2f} (measured in the data: {plant['measured_rate']:.2f}, "
        f"{plant['measured_false_rate']:.2f}). " + _left_out_note(plant)
        + "Rates: share of generated images in which the judge finds the "
        "artifact; APR rows: share whose whole artifact set, as the H=4 evaluator reads it, is the prompt's. "
        "Claims are read on the H=4 evaluator (disjoint training split and seed, not the reward). "
        + _gap_note(target, plant["artifact"]),
    ]
    return write_with_values(pd.DataFrame(rows), out_dir / "rl4med_planted", rec,
                             caption="RL4Med-DDPO: the planted prompt-following gap, SD vs SD+RL",
                             label="tab:rl4med-planted", notes=notes)


def _untruthful(plant: Mapping[str, Any]) -> str:
    """What an untruthful planted caption says (planted.json's caption_noise; older files resample)."""
    if plant.get("caption_noise", "resample") == "overclaim":
        return "stated although absent"
    return f"drawn at its prevalence {plant['prevalence']:.2f}"


def _left_out_note(plant: Mapping[str, Any]) -> str:
    """The planted under-representation (planted.json's finetune_share), or nothing without one."""
    share = plant.get("finetune_share", 1.0)
    if share >= 1:
        return ""
    return (f"Under-represented: each {plant['lesion']} image showing {plant['artifact']} stays in the fine-tune set "
            f"with probability {share:.2f} ({plant['n_left_out']} of {plant['n_combination_images']} left out), so "
            f"{plant['artifact']} is on {plant['finetune_prevalence']:.2f} of the fine-tune set's {plant['lesion']} "
            f"images against its prevalence {plant['prevalence']:.2f}. ")


def _share(closed: Mapping[str, float | None], key: str) -> str:
    """A share of the gap closed; 'no gap' where the target lies within SD's own interval."""
    return fmt_share(closed[key]) if key in closed else ""


def _gap_note(target: Mapping[str, float] | None, artifact: str) -> str:
    note = ("Gap to the other lesion closed = (SD+RL - SD) / (reference - SD), the reference being SD's rate on the "
            "other lesion's prompts, whose captions are truthful: the gap the planting made ('no gap': the "
            "reference lies within SD's own 95 % interval).")
    if target is None:
        return note
    return note + (f" Gap to ceiling closed = (SD+RL - SD) / (target - SD), the target being what a model that follows "
                   f"every prompt scores here: the H=4 evaluator on real test images after a round trip through the VAE "
                   f"finds {artifact} on {fmt_pct(target['rate'])} of those that have it and on "
                   f"{fmt_pct(target['false_rate'])} of those that do not.")


def _planted_rows(rec: Recorder, sd: Mapping[str, Any], rl: Mapping[str, Any], judge: str, words: Mapping[str, str],
                  rid: Mapping[str, str], target: Mapping[str, float] | None) -> list[dict[str, Any]]:
    from medrl.metrics.planted import gap_closed

    h4 = judge.startswith("H=4")
    closed = gap_closed(sd, rl) if h4 else {}  # the planted gap: to SD's rate on the other lesion
    closed_ceiling = gap_closed(sd, rl, target) if h4 and target is not None else {}
    pair_run = f"{rid['rl']} - {rid['sd']}"
    rows = []
    for key, label in _PLANTED_ROWS.items():
        if key not in sd or key not in rl:
            continue
        name = f"{label.format(**words)}, {judge}"
        rows.append({
            "Prompts": name,
            "SD": rec.ours(name, "SD", sd[key], model="sd", run_id=rid["sd"], digits=3),
            "SD+RL": rec.ours(name, "SD+RL", rl[key], model="rl", run_id=rid["rl"], digits=3),
            "RL - SD": rec.ours(name, "RL - SD", diff_from_boot(rl[key], sd[key], where=f"planted {key}"),
                                model="rl-sd", run_id=pair_run, digits=3, source="diff"),
            f"gap to {words['other']} closed": _share(closed, key),
            "gap to ceiling closed": _share(closed_ceiling, key),
            "n (SD/RL)": f"{sd[key]['n']}/{rl[key]['n']}",
        })
    return rows


def _claims_table(diffs: Mapping[str, dict | None], aug_claims: list[tuple[str, str, dict | None]],
                  rid: Mapping[str, str], out_dir: Path, common: list[str]) -> dict[str, str]:
    """rl4med_claims: the direction of each claim (SD+RL vs SD, synthetic augmentation vs real), measured."""
    pair_run = f"{rid['rl']} - {rid['sd']}"
    rec = Recorder("rl4med_claims")
    rows = []
    for key, head, digits, hib in MAIN_COLUMNS:
        if hib is None:
            continue
        rows.append({"Claim": f"SD+RL beats SD on {head.split(' ')[0] if key != 'reward' else 'mean reward'}",
                     "Difference": "rl - sd", "Better": "higher" if hib else "lower",
                     "Ours difference [CI]": rec.ours(head, "RL - SD", diffs[key], model="rl-sd",
                                                              run_id=pair_run, digits=digits, source="diff"),
                     "Verdict (ours)": verdict(diffs[key], hib, digits), "MLflow runs": pair_run})
    for claim, label, d in aug_claims:
        rows.append({"Claim": claim, "Difference": f"{label} (overall AUROC)",
                     "Better": "higher",
                     "Ours difference [CI]": rec.ours(claim, "diff", d, model="augment",
                                                              run_id=rid["augment"], digits=3, source="diff"),
                     "Verdict (ours)": verdict(d, True, 3), "MLflow runs": rid["augment"]})
    claim_notes = common + [
        "Verdict: the paired-bootstrap CI of the difference lies on the claimed side of 0 (supported), on the other "
        "side (contradicted), or includes 0 (inconclusive). The perceptual distance has no stated direction.",
    ]
    return write_with_values(pd.DataFrame(rows), out_dir / "rl4med_claims", rec,
                             caption="RL4Med-DDPO: direction of each claim, measured here",
                             label="tab:rl4med-claims", notes=claim_notes)


def _auroc_delta(conds: Mapping[str, Any], ref_cond: str, kind: str, name: str, auc: dict | None, where: str,
                 cond: str) -> dict | None:
    """Paired AUROC difference ``cond`` - ``ref_cond`` on one subgroup; None where either lacks replicates."""
    ref = conds.get(ref_cond, {}).get(kind, {}).get(name, {}).get("auroc")
    if not (isinstance(ref, Mapping) and isinstance(auc, Mapping) and auc.get("boot") is not None):
        return None
    try:
        return diff_from_boot(auc, ref, where=f"{where}: {cond} - {ref_cond}")
    except DataError:
        return None


def _as_metric(v: Any, where: str) -> dict[str, Any] | None:
    """Augment cells may be Metrics, plain floats (no CI) or None/NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (int, float)):
        return {"value": float(v), "lo": None, "hi": None, "n": None}
    return check_metric(v, where=where)


def _augment_table(augment: Mapping[str, Any], run: str, out_dir: Path,
                   common: list[str]) -> tuple[dict[str, str], list[tuple[str, str, dict | None]]]:
    where = "augment"
    conds = need(augment, ["conditions"], where=where, expected="{condition: {overall, artifact, subset}}")
    if not isinstance(conds, Mapping) or not conds:
        raise DataError(f"{where}: 'conditions' is empty; expected at least one condition")
    rec = Recorder("rl4med_augment")
    rows = []
    no_ci = False
    claims: list[tuple[str, str, dict | None]] = []
    for cond, entry in conds.items():
        for kind in ("overall", "artifact", "subset"):
            groups = need(entry, [kind], where=f"{where}.conditions.{cond}", expected="{group: {n, acc, auroc}}")
            for name, g in groups.items():
                w = f"{where}.conditions.{cond}.{kind}.{name}"
                n = need(g, ["n"], where=w, expected="int")
                acc = _as_metric(need(g, ["acc"], where=w, expected="Metric or float"), f"{w}.acc")
                auc = _as_metric(need(g, ["auroc"], where=w, expected="Metric or float"), f"{w}.auroc")
                no_ci |= any(m is not None and m.get("lo") is None for m in (acc, auc))
                delta = _auroc_delta(conds, "real", kind, name, auc, w, cond) if cond != "real" else None
                vs_sd = _auroc_delta(conds, "real+sd", kind, name, auc, w, cond) if cond == "real+rl" else None
                if cond != "real" and "real" in conds and kind == "overall":
                    claims.append((f"{cond} beats real-only training on overall AUROC", f"{cond} - real", delta))
                if cond == "real+rl" and "real+sd" in conds and kind == "overall":
                    claims.append(("real+rl beats real+sd on overall AUROC", "real+rl - real+sd", vs_sd))
                label = f"{cond} / {name}"
                rows.append({
                    "Condition": cond, "Subgroup kind": kind, "Subgroup": name,
                    "n test": fmt_num(n, 0) if n is not None else NA,
                    "n pos": fmt_num(g.get("n_pos"), 0) if g.get("n_pos") is not None else "",
                    "Accuracy": rec.ours(label, "Accuracy", acc, model=cond, run_id=run, digits=3),
                    "AUROC": rec.ours(label, "AUROC", auc, model=cond, run_id=run, digits=3),
                    "AUROC - real": ("" if cond == "real" else
                                     rec.ours(label, "AUROC - real", delta, model=f"{cond}-real", run_id=run,
                                              digits=3, source="diff")),
                    "AUROC - real+sd": ("" if cond != "real+rl" else
                                        rec.ours(label, "AUROC - real+sd", vs_sd, model="real+rl-real+sd", run_id=run,
                                                 digits=3, source="diff")),
                    "paper": "", "MLflow run": run,
                })
    notes = common + [
        "MEL-vs-NV classifier trained on real data alone or real + generated images, evaluated on the real test "
        "split overall and per artifact subgroup (artifact present/absent; exact artifact subset).",
        "n/a AUROC: the subgroup has one label value. AUROC - real, AUROC - real+sd (RL's images against SD's, "
        "e.g. on the planted artifact's subgroup): paired bootstrap over the same test images.",
    ]
    if no_ci:
        notes.append("Cells without [CI] come from an augmentation summary with point values only.")
    paths = write_with_values(pd.DataFrame(rows), out_dir / "rl4med_augment", rec,
                   caption="RL4Med-DDPO: synthetic augmentation for artifact subgroups", label="tab:rl4med-augment",
                   notes=notes)
    return paths, claims


# ----------------------------------------------------------------------------- over RL seeds


def build_rl4med_seed_table(
    sd: Mapping[str, Any],
    rl_by_seed: Mapping[int, Mapping[str, Any]],
    run_ids: Mapping[str, str],
    out_dir: str | Path,
    *,
    sources: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, str]:
    """``rl4med_seeds``: SD+RL - SD on every main column (the paired bootstrap of rl4med_main) in
    every RL seed, with mean, spread and the verdict over seeds (medrl.tables.seeds).

    ``sd``: the SD metrics JSON; ``rl_by_seed``: seed -> that seed's SD+RL metrics JSON (both as
    in ``build_rl4med_tables``); ``run_ids``: "sd" and "rl-s<seed>" -> MLflow run id (empty: n/a);
    ``sources``: the same keys -> JSON path, for error messages."""
    sources = dict(sources or {})
    seeds = list(rl_by_seed)
    if not seeds:
        raise DataError("rl_by_seed: no seeds; expected the SD+RL metrics of at least one RL seed")
    keys = {s: f"rl-s{s}" for s in seeds}
    for s in seeds:
        _validate({"sd": sd, "rl": rl_by_seed[s]}, {}, {"sd": sources.get("sd", "sd"), "rl": sources.get(keys[s], keys[s])})
    rid, run_notes = resolve_run_ids(run_ids, ["sd", *keys.values()])
    rows = [SeedRow("SD+RL - SD", head, hib, digits,
                    diffs={s: diff_from_boot(rl_by_seed[s][key], sd[key], where=f"{keys[s]} - sd ({key})")
                           for s in seeds},
                    run_ids={s: f"{rid[keys[s]]} - {rid['sd']}" for s in seeds})
            for key, head, digits, hib in MAIN_COLUMNS]
    planted_rows, planted_notes = _planted_seed_rows(sd, rl_by_seed, keys, rid)
    notes = ["SD: one fine-tuned baseline (no RL seed), the same in every column; SD+RL: one DDPO run per seed.",
             *notes, *planted_notes, P.RL4MED_PAPER_NOTE, *run_notes]
    rows += planted_rows
    return build_seed_table(rows, seeds, Path(out_dir) / "rl4med_seeds",
                            caption="RL4Med-DDPO: SD+RL - SD in every RL seed", label="tab:rl4med-seeds", notes=notes)


def _planted_seed_rows(sd: Mapping[str, Any], rl_by_seed: Mapping[int, Mapping[str, Any]], keys: Mapping[int, str],
                       rid: Mapping[str, str]) -> tuple[list[Any], list[str]]:
    """The planted-gap rows of the seeds table (the asked rate should rise, the false rate fall) and
    a note with the share of the gap each seed closed; nothing without planted metrics."""
    from medrl.metrics.planted import ceiling_rates, gap_closed

    if "planted" not in sd or any("planted" not in m for m in rl_by_seed.values()):
        return [], []
    p, plant = sd["planted"], sd["planted"]["planted"]
    artifact, lesion = plant["artifact"], plant["lesion"]
    groups = [("rate", f"{artifact} rate, {lesion} prompts asking for it", True),
              ("false_rate", f"{artifact} rate, {lesion} prompts not asking for it", False),
              ("apr_rate", f"APR, {lesion} prompts asking for {artifact}", True)]
    rows = [SeedRow("SD+RL - SD", head, hib, 3,
                    diffs={s: diff_from_boot(m["planted"][key], p[key], where=f"{keys[s]} - sd (planted {key})")
                           for s, m in rl_by_seed.items()},
                    run_ids={s: f"{rid[keys[s]]} - {rid['sd']}" for s in rl_by_seed})
            for key, head, hib in groups if key in p and all(key in m["planted"] for m in rl_by_seed.values())]
    target = ceiling_rates(sd.get("vae_ceiling"), artifact)
    goals = [("to the other lesion's rate", None)] + ([("to the VAE ceiling", target)] if target else [])
    notes = []
    for what, goal in goals:
        closed = {s: gap_closed(p, m["planted"], goal) for s, m in rl_by_seed.items()}
        notes.append(f"Planted gap {what} closed by RL (H=4 evaluator, see rl4med_planted): "
                     + "; ".join(f"seed {s}: asked {_share(c, 'rate')}, not asked {_share(c, 'false_rate')}"
                                 + (f", APR where asked {_share(c, 'apr_rate')}" if "apr_rate" in c else "")
                                 for s, c in closed.items()) + ".")
    return rows, notes


build_rl4med_tables.__doc__ = (build_rl4med_tables.__doc__ or "") + ISIC_SCHEMA_DOC
