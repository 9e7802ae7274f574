"""Table builders: CSV/MD/TEX with our numbers (from the metrics JSON) beside the paper's."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medrl.errors import DataError
from medrl.metrics.bootstrap import bootstrap_ci, diff_from_boot
from medrl.tables import paper as P
from medrl.tables.cxrl import build_cxrl_tables
from medrl.tables.render import fmt_ci, tex_escape, write_table
from medrl.tables.rl4med import augment_metrics_from_per_image, build_rl4med_tables

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
N_BOOT = 100


def _metric(rng: np.random.Generator, mean: float, sd: float, n: int = 40, seed: int = 0) -> dict:
    """A real bootstrap Metric over n items (same seed/items across models -> pairable)."""
    x = rng.normal(mean, sd, size=n)
    return bootstrap_ci(x, n_boot=N_BOOT, ci=0.95, seed=seed, keep_boot=True, items=[f"r{i}" for i in range(n)])


def _judged(rng: np.random.Generator, shift: float, prefix: str = "") -> dict:
    """The metrics a network judges (reward nets: no prefix; independent evaluators: eval_)."""
    return {
        prefix + "r_align": _metric(rng, -0.3 + shift, 0.05),
        prefix + "auroc": {**{c: _metric(rng, 0.6 + shift, 0.05) for c in P.CXR_CLASSES},
                           "avg": _metric(rng, 0.6 + shift, 0.02)},
        prefix + "similarity": _metric(rng, 0.3 + shift, 0.05),
        prefix + "fid": _metric(rng, 20 - 10 * shift, 1.0),
        prefix + "kid": _metric(rng, 0.02, 0.001),
    }


def _cxr_json(rng: np.random.Generator, shift: float, eval_shift: float | None = None) -> dict:
    """One model's metrics; the evaluator sees ``eval_shift`` (default: the same shift)."""
    return {
        **_judged(rng, shift),
        **_judged(rng, shift if eval_shift is None else eval_shift, "eval_"),
        "msssim": _metric(rng, 0.2, 0.01),
        "n_images": 40,
        "feature_extractor": "DenseNet-121 (phantom-trained) penultimate features",
    }


def _judges(independent: bool = True) -> dict:
    """The anchor's judge accuracies (medrl.metrics.cxr_eval.judge_accuracy) for both judges."""
    def acc(mae: float, auroc: float, recall: float) -> dict:
        return {"aligner": {"psi": {"psi_mae_mean": mae, "psi_mae_identity_mean": 0.08, "n": 8},
                            "reference": "exact posture psi"},
                "diag": {"reference": "exact labels (gt_*)", "n": 8, "auroc": {"avg": auroc}},
                "dualenc": {"n": 8, "i2t_recall@1": recall, "i2t_auroc": 0.7}}
    reward, ev = acc(0.011, 0.91, 0.5), acc(0.022, 0.87, 0.375)
    for net in ev:
        ev[net]["independent"] = independent or net == "aligner"
        reward[net]["independent"] = False
    return {"reward": reward, "eval": ev}


@pytest.fixture()
def cxr_metrics():
    rng = np.random.default_rng(0)
    shifts = {"anchor": 0.0, "full": 0.1, "no_ace": 0.03, "no_rlcf": 0.05, "repeated": 0.04}
    metrics = {m: _cxr_json(rng, s) for m, s in shifts.items()}
    metrics["anchor"]["judges"] = _judges()
    for m in ("align_only", "diag_only", "consist_only"):
        metrics[m] = {"fid": _metric(rng, 18, 1.0), "eval_fid": _metric(rng, 19, 1.0), "n_images": 40,
                      "feature_extractor": "DenseNet-121"}
    run_ids = {m: f"run{i:02d}abc" for i, m in enumerate(metrics)}
    return metrics, run_ids


def _cells(csv: Path) -> str:
    return csv.read_text()


def test_cxrl_tables_carry_our_numbers_and_the_papers(cxr_metrics, tmp_path):
    metrics, run_ids = cxr_metrics
    out = build_cxrl_tables(metrics, run_ids, tmp_path, notes=["phantom data, tiny models"])
    assert set(out) == {"cxrl_table1", "cxrl_table2a", "cxrl_table2b", "cxrl_table3", "cxrl_claims"}
    for paths in out.values():
        for fmt in ("csv", "md", "tex", "values"):
            assert Path(paths[fmt]).is_file()
    t1 = pd.read_csv(out["cxrl_table1"]["csv"], dtype=str, keep_default_na=False)
    full = t1[t1["Model"] == "full"].iloc[0]
    assert full["r_align (psi) \u2191 (ours)"] == fmt_ci(metrics["full"]["r_align"], 3)
    assert full["AUROC \u2191 (ours)"] == fmt_ci(metrics["full"]["auroc"]["avg"], 3)
    assert full["r_align (psi) \u2191 (paper)"] == "-0.246" and full["AUROC \u2191 (paper)"] == "0.81"
    assert full["CXR-CLIP similarity \u2191 (paper)"] == "0.343" and full["MLflow run"] == run_ids["full"]
    llm = t1[t1["Method"].str.startswith("LLM-CXR")].iloc[0]
    assert llm["r_align (psi) \u2191 (ours)"] == "n/a" and llm["r_align (psi) \u2191 (paper)"] == "-0.327"
    diff = t1[t1["Model"] == "full - anchor"].iloc[0]
    expect = diff_from_boot(metrics["full"]["r_align"], metrics["anchor"]["r_align"])
    assert diff["r_align (psi) \u2191 (ours)"] == fmt_ci(expect, 3)
    assert diff["r_align (psi) \u2191 (paper)"] == "0.117"  # -0.246 - (-0.363)

    t2a = _cells(Path(out["cxrl_table2a"]["csv"]))
    for s in ("2.58", "4.01", "1.51", "1.79", "1.58", "0.197", "0.275", "0.147", "0.192", "0.188",
              fmt_ci(metrics["no_ace"]["fid"], 3), fmt_ci(metrics["anchor"]["kid"], 4)):
        assert s in t2a, s
    t2b = pd.read_csv(out["cxrl_table2b"]["csv"], dtype=str, keep_default_na=False)
    assert list(t2b["FID \u2193 (paper)"]) == ["2.58", "1.89", "1.64", "1.92", "1.51"]
    assert t2b.loc[t2b.Model == "diag_only", "FID \u2193 (ours)"].iloc[0] == fmt_ci(metrics["diag_only"]["fid"], 3)

    t3 = pd.read_csv(out["cxrl_table3"]["csv"], dtype=str, keep_default_na=False)
    assert list(t3["Class"][:12]) == [P.CXR_ABBREV[c] for c in (*P.CXR_CLASSES, "avg")]
    assert list(t3["CXRL (Ours) (paper)"][:12]) == ["0.87", "0.94", "0.88", "0.89", "0.77", "0.60", "0.63", "0.79",
                                                     "0.94", "0.70", "0.86", "0.81"]
    assert list(t3["RoentGen [3] (anchor) (paper)"][:12]) == ["0.78", "0.90", "0.79", "0.71", "0.46", "0.39", "0.46",
                                                               "0.57", "0.90", "0.48", "0.71", "0.65"]
    assert t3["w/o ACE (ours)"].iloc[3] == fmt_ci(metrics["no_ace"]["auroc"]["Edema"], 3)
    assert t3["Class"].iloc[-1] == "MLflow run" and t3["CXRL (Ours) (ours)"].iloc[-1] == run_ids["full"]

    # full-precision values behind the cells
    vals = pd.read_csv(out["cxrl_table1"]["values"])
    v = vals[(vals.model == "full") & (vals.column.str.startswith("AUROC"))].iloc[0]
    assert v["value"] == pytest.approx(metrics["full"]["auroc"]["avg"]["value"])
    assert v["run_id"] == run_ids["full"]

    md = Path(out["cxrl_table1"]["md"]).read_text()
    assert "phantom data, tiny models" in md and "| -0.246 |" in md.replace("| -0.246 [", "x")
    tex = Path(out["cxrl_table1"]["tex"]).read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"r\_align" in tex and r"$\uparrow$" in tex
    assert "\\label{tab:cxrl1}" in tex

    claims = pd.read_csv(out["cxrl_claims"]["csv"], dtype=str, keep_default_na=False)
    row = claims[claims.Claim == "CXRL beats RoentGen [3] (anchor) on AUROC (avg)"].iloc[0]
    # the data are shifted so that full beats anchor by ~0.1 AUROC (paired CI far from 0): exactly "supported"
    assert row["Verdict (evaluator)"].split(" ")[0] == "supported", row["Verdict (evaluator)"]
    assert row["Paper difference"] == "0.160"
    # Table 3 states the AUROC's label convention (unmentioned = negative, as the diag model is trained)
    t3_md = Path(out["cxrl_table3"]["md"]).read_text()
    assert "unmentioned labels count as negatives" in t3_md and "uncertain (-1) labels are ignored" in t3_md


def test_cxrl_missing_key_or_model_or_run_id_is_a_data_error(cxr_metrics, tmp_path):
    metrics, run_ids = cxr_metrics
    bad = copy.deepcopy(metrics)
    del bad["no_rlcf"]["auroc"]["Edema"]
    with pytest.raises(DataError, match=r"metrics/no_rlcf.json: missing key 'auroc.Edema'"):
        build_cxrl_tables(bad, run_ids, tmp_path, sources={"no_rlcf": "metrics/no_rlcf.json"})
    bad = copy.deepcopy(metrics)
    bad["full"]["fid"] = {"value": 1.0}
    with pytest.raises(DataError, match=r"metrics\['full'\].*'fid'.*missing keys"):
        build_cxrl_tables(bad, run_ids, tmp_path)
    bad = {k: v for k, v in metrics.items() if k != "anchor"}
    with pytest.raises(DataError, match="'anchor'"):
        build_cxrl_tables(bad, run_ids, tmp_path)
    with pytest.raises(DataError, match="run_ids: no entry for model 'diag_only'"):
        build_cxrl_tables(metrics, {k: v for k, v in run_ids.items() if k != "diag_only"}, tmp_path)
    # an empty id (no MLflow run found for that input) does not fail the table: n/a + note
    out = build_cxrl_tables(metrics, {**run_ids, "diag_only": ""}, tmp_path)
    t2b = pd.read_csv(out["cxrl_table2b"]["csv"], dtype=str, keep_default_na=False)
    assert t2b.loc[t2b.Model == "diag_only", "MLflow run"].iloc[0] == "n/a"
    assert "No MLflow run id was found for: diag_only" in Path(out["cxrl_table2b"]["md"]).read_text()


def test_cxrl_optional_models_and_unpaired_differences(cxr_metrics, tmp_path):
    metrics, run_ids = cxr_metrics
    m = {k: v for k, v in metrics.items() if k not in ("no_ace", "align_only")}
    m["full"] = copy.deepcopy(m["full"])
    m["full"]["fid"]["boot_key"] = "different"
    out = build_cxrl_tables(m, run_ids, tmp_path)
    md = Path(out["cxrl_table2a"]["md"]).read_text()
    assert "Not run, rows omitted: no_ace, align_only" in md
    assert "Difference n/a" in md and "bootstrap keys differ" in md
    t2a = pd.read_csv(out["cxrl_table2a"]["csv"], dtype=str, keep_default_na=False)
    assert t2a.loc[t2a.Key == "full - anchor", "FID \u2193 (ours)"].iloc[0] == "n/a"
    assert "no_ace" not in set(t2a.Key)


def test_cxrl_repeated_reports_setting_has_its_own_rows(cxr_metrics, tmp_path):
    """The repeated-reports setting (issue 21 item 4): its own row and its difference to CXRL."""
    metrics, run_ids = cxr_metrics
    out = build_cxrl_tables(metrics, run_ids, tmp_path)
    t1 = pd.read_csv(out["cxrl_table1"]["csv"], dtype=str, keep_default_na=False)
    assert {"repeated", "full - repeated"} <= set(t1.Model)
    assert "reports repeated per batch" in t1.loc[t1.Model == "repeated", "Method"].iloc[0]


# ----------------------------------------------------------------------------- RL4Med


def _isic_json(rng: np.random.Generator, prompts: list[str], boost: float) -> dict:
    n = 32 * 4
    keys = [f"{i // 4:02d}/{i % 4}.png" for i in range(n)]
    exact = (rng.uniform(size=n) < 0.4 + boost).astype(float)
    reward = rng.uniform(0.4, 0.9, size=n) + boost
    m = lambda x: bootstrap_ci(x, n_boot=N_BOOT, ci=0.95, seed=0, keep_boot=True, items=keys)  # noqa: E731
    per_prompt = {p: bootstrap_ci(exact[4 * i:4 * i + 4], n_boot=N_BOOT, ci=0.95, seed=0, keep_boot=True,
                                  items=keys[4 * i:4 * i + 4]) for i, p in enumerate(prompts)}
    return {"fid": m(rng.normal(30 - 20 * boost, 2, size=n)), "kid": m(rng.normal(0.01, 0.002, size=n)),
            "perceptual": m(rng.normal(0.3, 0.05, size=n)),
            "perceptual_name": "LPIPS-construction on EfficientNet-B0 (phantom-trained) features, uniform weights",
            "apr": m(exact), "reward": m(reward), "apr_per_prompt": per_prompt, "n_images": n,
            "feature_extractor": "EfficientNet-B0 H=4 (phantom-trained) penultimate"}


@pytest.fixture()
def isic_inputs():
    rng = np.random.default_rng(1)
    prompts = [f"a dermoscopic image with melanoma and {i} artifacts" for i in range(32)]
    metrics = {"sd": _isic_json(rng, prompts, 0.0), "rl": _isic_json(rng, prompts, 0.3)}
    images = [f"img{i:03d}" for i in range(60)]
    rows = []
    for cond, skill in (("real", 0.5), ("real+sd", 0.6), ("real+rl", 0.8)):
        r = np.random.default_rng(7)  # same labels/artifacts for every condition (same test set)
        label = r.integers(0, 2, size=60)
        arts = r.integers(0, 2, size=(60, 4))
        noise = np.random.default_rng(hash(cond) % 2**32).uniform(size=60)
        prob = np.clip(skill * label + (1 - skill) * noise, 0, 1)
        for i in range(60):
            subset = "+".join(a for a, f in zip(("hair", "gel_bubble", "ruler", "ink"), arts[i]) if f) or "none"
            rows.append({"condition": cond, "image": images[i], "hair": arts[i, 0], "gel_bubble": arts[i, 1],
                         "ruler": arts[i, 2], "ink": arts[i, 3], "subset": subset, "label": label[i], "prob": prob[i]})
    augment = augment_metrics_from_per_image(pd.DataFrame(rows), n_boot=N_BOOT, ci=0.95, seed=0)
    run_ids = {"sd": "sdrun1", "rl": "rlrun2", "augment": "augrun3"}
    return metrics, augment, run_ids, prompts


def test_rl4med_tables(isic_inputs, tmp_path):
    metrics, augment, run_ids, prompts = isic_inputs
    out = build_rl4med_tables(metrics, augment, run_ids, tmp_path)
    assert set(out) == {"rl4med_main", "rl4med_apr_per_prompt", "rl4med_augment", "rl4med_claims"}
    main = pd.read_csv(out["rl4med_main"]["csv"], dtype=str, keep_default_na=False)
    assert list(main["Model"]) == ["SD", "SD+RL", "RL - SD (paired)"]
    assert main["APR \u2191"].iloc[1] == fmt_ci(metrics["rl"]["apr"], 3)
    assert main["KID \u2193"].iloc[0] == fmt_ci(metrics["sd"]["kid"], 4)
    d = diff_from_boot(metrics["rl"]["fid"], metrics["sd"]["fid"])
    assert main["FID \u2193"].iloc[2] == fmt_ci(d, 3)
    assert d["value"] == pytest.approx(metrics["rl"]["fid"]["value"] - metrics["sd"]["fid"]["value"])
    assert (main["paper"] == "").all() and list(main["MLflow run"][:2]) == ["sdrun1", "rlrun2"]
    md = Path(out["rl4med_main"]["md"]).read_text()
    assert "carries no numeric results" in md and "uniform weights" in md

    pp = pd.read_csv(out["rl4med_apr_per_prompt"]["csv"], dtype=str, keep_default_na=False)
    assert len(pp) == 32 and set(pp["Prompt"]) == set(prompts)
    first = sorted(prompts)[0]
    assert pp.loc[pp.Prompt == first, "APR SD+RL"].iloc[0] == fmt_ci(metrics["rl"]["apr_per_prompt"][first], 3)

    aug = pd.read_csv(out["rl4med_augment"]["csv"], dtype=str, keep_default_na=False)
    overall = aug[(aug.Condition == "real+rl") & (aug.Subgroup == "all")].iloc[0]
    assert overall["AUROC"] == fmt_ci(augment["conditions"]["real+rl"]["overall"]["all"]["auroc"], 3)
    assert overall["AUROC - real"] != "n/a" and overall["n test"] == "60"
    assert set(aug["Subgroup kind"]) == {"overall", "artifact", "subset"}

    claims = pd.read_csv(out["rl4med_claims"]["csv"], dtype=str, keep_default_na=False)
    apr_claim = claims[claims.Claim == "SD+RL beats SD on APR"].iloc[0]
    assert apr_claim["Verdict (ours)"].startswith("supported")  # boost of +0.3 on 128 images
    assert any(c.startswith("real+rl beats real-only") for c in claims.Claim)
    # RL's synthetic images against SD's, paired on the same test images
    vs_sd = claims[claims.Claim == "real+rl beats real+sd on overall AUROC"].iloc[0]
    assert vs_sd["Difference"] == "real+rl - real+sd (overall AUROC)" and "[" in vs_sd["Ours difference [CI]"]
    assert overall["AUROC - real+sd"] not in ("", "n/a")
    assert set(aug.loc[aug.Condition != "real+rl", "AUROC - real+sd"]) == {""}
    tex = Path(out["rl4med_apr_per_prompt"]["tex"]).read_text()
    assert tex.count(r"\\") >= 33


def test_rl4med_vae_ceiling_rows(isic_inputs, tmp_path):
    metrics, augment, run_ids, _ = isic_inputs
    ci = lambda v: {"value": v, "lo": v - 0.05, "hi": v + 0.05, "n": 256, "ci": 0.95}  # noqa: E731
    metrics["sd"]["vae_ceiling"] = {
        "n_images": 256, "heads": ["hair", "ruler"],
        "real": {"apr": ci(0.32), "fires_when_present": {"hair": 0.98, "ruler": 0.89}},
        "vae_roundtrip": {"apr": ci(0.10), "fires_when_present": {"hair": 0.0, "ruler": None}}}
    out = build_rl4med_tables(metrics, augment, run_ids, tmp_path)
    main = pd.read_csv(out["rl4med_main"]["csv"], dtype=str, keep_default_na=False)
    assert list(main["Model"])[3:] == ["Real test images (H=4 reference)", "Real test images through the VAE (APR ceiling)"]
    assert main["APR \u2191"].iloc[4] == fmt_ci(ci(0.10), 3) and main["FID \u2193"].iloc[4] == ""
    assert list(main["MLflow run"][3:]) == ["sdrun1", "sdrun1"]
    md = Path(out["rl4med_main"]["md"]).read_text()
    assert "hair 98 % -> 0 %, ruler 89 % -> n/a" in md


def test_rl4med_validation(isic_inputs, tmp_path):
    metrics, augment, run_ids, _ = isic_inputs
    bad = copy.deepcopy(metrics)
    del bad["rl"]["perceptual_name"]
    with pytest.raises(DataError, match=r"rl.json: missing key 'perceptual_name'"):
        build_rl4med_tables(bad, augment, run_ids, tmp_path, sources={"rl": "rl.json"})
    bad = copy.deepcopy(metrics)
    del bad["sd"]["apr"]["boot"]
    with pytest.raises(DataError, match="'apr' has no bootstrap replicates"):
        build_rl4med_tables(bad, augment, run_ids, tmp_path)
    bad = copy.deepcopy(metrics)
    bad["sd"]["apr_per_prompt"].pop(next(iter(bad["sd"]["apr_per_prompt"])))
    with pytest.raises(DataError, match="prompts differ"):
        build_rl4med_tables(bad, augment, run_ids, tmp_path)
    with pytest.raises(DataError, match="'augment'"):
        build_rl4med_tables(metrics, augment, {"sd": "a", "rl": "b"}, tmp_path)
    # the workflow's display names are accepted as aliases
    out = build_rl4med_tables({"SD": metrics["sd"], "SD+RL": metrics["rl"]}, None, {"SD": "a", "SD+RL": "b"}, tmp_path)
    assert "rl4med_augment" not in out
    with pytest.raises(DataError, match="alias"):
        build_rl4med_tables({"SD": metrics["sd"], "sd": metrics["sd"], "rl": metrics["rl"]}, None, run_ids, tmp_path)
    # augment.py's own summary.json (point values, NaN written as null) is accepted without CIs
    summary = {"conditions": {"real": {"overall": {"all": {"n": 60.0, "n_pos": 30.0, "acc": 0.7, "auroc": None}},
                                       "artifact": {}, "subset": {}}}}
    out = build_rl4med_tables(metrics, summary, run_ids, tmp_path)
    aug = pd.read_csv(out["rl4med_augment"]["csv"], dtype=str, keep_default_na=False)
    assert aug["Accuracy"].iloc[0] == "0.700" and aug["AUROC"].iloc[0] == "n/a"
    assert "point values only" in Path(out["rl4med_augment"]["md"]).read_text()


# ----------------------------------------------------------------------------- rendering, paper numbers


def test_render_formats_and_escapes(tmp_path):
    assert fmt_ci({"value": 0.8123, "lo": 0.79, "hi": 0.8331}) == "0.812 [0.790, 0.833]"
    assert fmt_ci({"value": 1.0, "lo": None, "hi": None}) == "1.000"
    assert fmt_ci({"value": float("nan"), "lo": 0.1, "hi": 0.2}) == "n/a"
    assert tex_escape("a_b & 50% #1 {x} ~ ^") == r"a\_b \& 50\% \#1 \{x\} \textasciitilde{} \textasciicircum{}"
    df = pd.DataFrame({"name": ["x_1", "y|2"], "v": [1.5, 2.0]})
    paths = write_table(df, tmp_path / "t", caption="Cap & more", label="tab:t", notes=["note 1"])
    assert pd.read_csv(paths["csv"]).equals(df)
    md = Path(paths["md"]).read_text()
    assert "y\\|2" in md and md.rstrip().endswith("- note 1")
    tex = Path(paths["tex"]).read_text()
    assert r"\caption{Cap \& more}" in tex and r"x\_1 & 1.5 \\" in tex and "{lr}" in tex
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files


def test_cxr_classes_match_the_pipeline():
    from medrl.data.reports import PATHOLOGIES

    assert list(P.CXR_CLASSES) == list(PATHOLOGIES)


@pytest.mark.skipif(not (SEEDS / "004_0d4a1c28a312c6e4.txt").is_file(), reason="seed text not available")
def test_paper_numbers_match_the_seed_text():
    text = re.sub(r"[ \u00a0]+", " ", (SEEDS / "004_0d4a1c28a312c6e4.txt").read_text())  # the text has NBSPs

    lines = text.splitlines()
    t1 = lines[next(i for i, ln in enumerate(lines) if ln.startswith("Table 1:")):]
    t1_rows = {k: [float(x) for x in re.findall(r"-?\d*\.\d+", next(ln for ln in t1 if ln.startswith(p))[len(p):])]
               for k, p in (("anchor", "RoentGen [3]"), ("llm_cxr", "LLM-CXR [19]"), ("full", "CXRL (Ours)"),
                            ("no_ace", "w/o ACE"), ("no_rlcf", "w/o RLCF"))}
    for k, v in t1_rows.items():
        assert v == [P.CXRL_TABLE1[k]["r_align"], P.CXRL_TABLE1[k]["auroc"], P.CXRL_TABLE1[k]["similarity"]], k
    t2 = lines[next(i for i, ln in enumerate(lines) if ln.startswith("(a) Quality Assessment")):]
    for k, p in (("anchor", "RoentGen [3]"), ("llm_cxr", "LLM-CXR [19]"), ("full", "CXRL (Ours)"),
                 ("no_ace", "w/o ACE"), ("no_rlcf", "w/o RLCF")):
        v = [float(x) for x in re.findall(r"\d*\.\d+", next(ln for ln in t2 if ln.startswith(p))[len(p):])]
        assert v == [P.CXRL_TABLE2A[k]["fid"], P.CXRL_TABLE2A[k]["msssim"]], k
    t2b = lines[next(i for i, ln in enumerate(lines) if ln.startswith("(b) Ablation")):][:8]
    fids = [float(re.findall(r"\d+\.\d+\s*$", ln)[0]) for ln in t2b if re.search(r"\d+\.\d+\s*$", ln)]
    assert fids == [v[2] for v in P.CXRL_TABLE2B.values()]
    t3 = lines[next(i for i, ln in enumerate(lines) if ln.startswith("Table 3:")):]
    for k, p in (("anchor", "RoentGen "), ("llm_cxr", "LLM-CXR "), ("full", "CXRL ")):
        v = [float(x) for x in re.findall(r"\.\d+", next(ln for ln in t3 if ln.startswith(p))[len(p):])]
        assert v == [P.CXRL_TABLE3[k][c] for c in (*P.CXR_CLASSES, "avg")], k


def test_rlcf_modes_table(tmp_path):
    from medrl.tables.cxrl import build_rlcf_modes_table

    rng = np.random.default_rng(0)
    m = {"n_samples": 40, "samples_per_epoch": 64, "corr_policy_anchor_paired": 0.4,
         "corr_policy_anchor_paired_shared": 0.9,
         "seconds_per_sample": {"paired": 0.2, "paired_shared": 0.21, "bank": 0.1},
         "reward_seconds_per_epoch": {"paired": 12.8, "paired_shared": 13.4, "bank": 6.4}}
    for mode, (mean, std) in {"paired": (0.1, 0.45), "paired_shared": (0.1, 0.2), "bank": (0.1, 0.5)}.items():
        m[f"mean_{mode}"], m[f"std_{mode}"] = _metric(rng, mean, 0.2), _metric(rng, std, 0.01)
    for mode, ratio in {"paired": 0.81, "paired_shared": 0.16}.items():
        m[f"mean_diff_{mode}_minus_bank"] = _metric(rng, 0.0, 0.4)
        m[f"var_ratio_{mode}_over_bank"] = _metric(rng, ratio, 0.01)
        m[f"cost_ratio_{mode}_over_bank"] = m["seconds_per_sample"][mode] / 0.1
    paths = build_rlcf_modes_table(m, "abc123", tmp_path)
    df = pd.read_csv(paths["csv"])
    assert list(df["RLCF mode"]) == ["paired", "paired_shared", "bank", "paired - bank", "paired_shared - bank"]
    assert df.loc[0, "Reward s/epoch"] == 12.8 and df.loc[3, "Reward s/sample"] == "x2.00"
    assert df.loc[4, "Reward s/sample"] == "x2.10"
    assert df.loc[2, "Mean comparative reward [CI]"] == fmt_ci(m["mean_bank"])
    assert df.loc[4, "Std over samples [CI]"] == "var ratio " + fmt_ci(m["var_ratio_paired_shared_over_bank"], 2)
    md = Path(paths["md"]).read_text()
    assert "Correlation of policy and anchor scores: paired 0.40, paired_shared 0.90" in md
    values = pd.read_csv(paths["values"])
    assert (values["run_id"] == "abc123").all() and len(values) == 10
    del m["std_bank"]
    with pytest.raises(DataError, match="std_bank"):
        build_rlcf_modes_table(m, "abc123", tmp_path)
    m["std_bank"] = m["std_paired"]
    del m["seconds_per_sample"]["paired_shared"]
    with pytest.raises(DataError, match="seconds_per_sample.paired_shared"):
        build_rlcf_modes_table(m, "abc123", tmp_path)


def test_verdict_directions_and_identical_samples():
    from medrl.tables.render import verdict

    assert verdict({"lo": 0.1, "hi": 0.3}, True).startswith("supported")
    assert verdict({"lo": 0.1, "hi": 0.3}, False).startswith("contradicted")
    assert verdict({"lo": -0.1, "hi": 0.3}, True).startswith("inconclusive")
    # a CI within rounding of 0 at the shown precision is no direction, whichever side it is on
    assert verdict({"lo": -1.5e-6, "hi": -0.7e-6}, True, digits=3) == "no difference (CI within rounding of 0)"
    assert verdict({"lo": 1e-4, "hi": 3e-4}, False, digits=3) == "no difference (CI within rounding of 0)"
    assert verdict({"lo": -1.5e-6, "hi": -0.7e-6}, True).startswith("contradicted")  # no precision given
    assert verdict({"lo": 0.0004, "hi": 0.0006}, True, digits=3).startswith("supported")  # rounds to 0.001
    assert verdict(None, True).startswith("n/a")


# ============================================================================= over RL seeds


def _d(value: float, lo: float, hi: float) -> dict:
    return {"value": value, "lo": lo, "hi": hi, "n": 40, "ci": 0.95}


@pytest.mark.parametrize("diffs, hib, expected", [
    ([_d(0.2, 0.1, 0.3), _d(0.1, 0.02, 0.2), _d(0.3, 0.2, 0.4)], True, "better in every seed"),
    ([_d(0.2, 0.1, 0.3), _d(0.1, 0.02, 0.2), _d(0.3, 0.2, 0.4)], False, "worse in every seed"),
    ([_d(-2.0, -3.0, -1.0), _d(-1.0, -1.5, -0.5), _d(-0.5, -0.9, -0.1)], False, "better in every seed"),
    ([_d(0.2, 0.1, 0.3), _d(0.1, 0.02, 0.2), _d(0.3, 0.2, 0.4)], None, "higher in every seed"),
    # every point difference positive, one CI includes 0
    ([_d(0.2, 0.1, 0.3), _d(0.05, -0.02, 0.1), _d(0.3, 0.2, 0.4)], True, "same sign in every seed (better)"),
    ([_d(-0.2, -0.3, 0.1), _d(-0.1, -0.2, -0.01)], True, "same sign in every seed (worse)"),
    # one seed flips sign: even with every CI excluding 0, the seeds disagree
    ([_d(0.2, 0.1, 0.3), _d(-0.1, -0.2, -0.02), _d(0.3, 0.2, 0.4)], True, "seeds disagree"),
    ([_d(0.2, 0.1, 0.3), _d(-0.01, -0.1, 0.08), _d(0.3, 0.2, 0.4)], False, "seeds disagree"),
    ([_d(0.0, -0.1, 0.1), _d(0.1, 0.05, 0.2)], True, "seeds disagree"),  # a zero difference agrees with no sign
    ([_d(0.2, 0.1, 0.3), None], True, "n/a (a seed has no paired CI)"),
    ([_d(0.2, 0.1, 0.3), _d(0.1, float("nan"), float("nan"))], True, "n/a (a seed has no paired CI)"),
])
def test_seed_verdict(diffs, hib, expected):
    from medrl.tables.seeds import seed_verdict

    assert seed_verdict(diffs, hib) == expected
    assert seed_verdict(diffs, hib, digits=3) == expected  # none of these lies within rounding of 0


def test_seed_verdict_no_difference_within_rounding():
    from medrl.tables.seeds import seed_verdict

    tiny = [_d(1e-6, -1e-5, 2e-5), _d(0.0, 0.0, 0.0), _d(-2e-6, -3e-6, -1e-6)]
    assert seed_verdict(tiny, True, digits=3) == "no difference in every seed (CI within rounding of 0)"
    assert seed_verdict(tiny, True) == "seeds disagree"  # without a precision: signs only
    assert seed_verdict([*tiny[:2], _d(0.01, 0.002, 0.02)], True, digits=3) == "seeds disagree"


def test_seed_table_layout(tmp_path):
    from medrl.tables.seeds import SeedRow, build_seed_table

    diffs = {0: _d(0.2, 0.1, 0.3), 1: _d(-0.1, -0.2, -0.02), 2: _d(0.5, 0.2, 0.7)}
    rows = [SeedRow("SD+RL - SD", "APR \u2191", True, 3, diffs, {s: f"a{s} - b" for s in diffs})]
    out = build_seed_table(rows, [0, 1, 2], tmp_path / "t", caption="c", label="tab:t")
    t = pd.read_csv(out["csv"], dtype=str, keep_default_na=False).iloc[0]
    assert t["seed 0 [CI]"] == "0.200 [0.100, 0.300]" and t["seed 1 [CI]"] == "-0.100 [-0.200, -0.020]"
    assert t["mean over seeds"] == "0.200" and t["s.d. over seeds"] == f"{np.std([0.2, -0.1, 0.5], ddof=1):.3f}"
    assert t["range (min .. max)"] == "-0.100 .. 0.500" and t["Verdict"] == "seeds disagree"
    values = pd.read_csv(out["values"])
    assert list(values["run_id"]) == ["a0 - b", "a1 - b", "a2 - b"] and set(values["source"]) == {"diff"}
    assert "seeds disagree" in Path(out["md"]).read_text()


def test_rl4med_seed_table(isic_inputs, tmp_path):
    from medrl.tables.rl4med import build_rl4med_seed_table

    metrics, _, _, prompts = isic_inputs
    rng = np.random.default_rng(5)
    rl = {0: metrics["rl"], 1: _isic_json(rng, prompts, 0.25), 2: _isic_json(rng, prompts, 0.35)}
    run_ids = {"sd": "sdrun", "rl-s0": "r0", "rl-s1": "r1", "rl-s2": ""}
    out = build_rl4med_seed_table(metrics["sd"], rl, run_ids, tmp_path)
    t = pd.read_csv(out["csv"], dtype=str, keep_default_na=False).set_index("Metric")
    for s in (0, 1, 2):  # each seed's cell is rl4med_main's paired RL - SD difference for that seed
        assert t.loc["APR \u2191", f"seed {s} [CI]"] == fmt_ci(diff_from_boot(rl[s]["apr"], metrics["sd"]["apr"]), 3)
    apr = [diff_from_boot(rl[s]["apr"], metrics["sd"]["apr"])["value"] for s in (0, 1, 2)]
    assert t.loc["APR \u2191", "mean over seeds"] == f"{np.mean(apr):.3f}"
    assert t.loc["Mean reward \u2191", "Verdict"] == "better in every seed"  # +0.25..0.35 on U(0.4, 0.9)
    assert t.loc["FID \u2193", "Verdict"] == "better in every seed"  # FID drops by 20 x boost
    assert t.loc["Perceptual distance", "Better"] == "(no direction)"
    assert "No MLflow run id was found for: rl-s2" in Path(out["md"]).read_text()
    with pytest.raises(DataError, match="rl-s1.*apr"):
        build_rl4med_seed_table(metrics["sd"], {**rl, 1: {k: v for k, v in rl[1].items() if k != "apr"}}, run_ids,
                                tmp_path, sources={"rl-s1": "rl-s1 metrics.json"})


def test_rl4med_seed_table_rows_of_the_planted_gap(isic_inputs, tmp_path):
    """With planted metrics, the seeds table adds the asked / not-asked rates and the gap each seed closed."""
    from test_planted import BOOT, PLANT, per_image, with_exact

    from medrl.metrics.planted import planted_apr, planted_rates
    from medrl.tables.rl4med import build_rl4med_seed_table

    def planted(rate: float, false_rate: float, apr_rate: float, seed: int) -> dict:
        images = with_exact(per_image(rate, false_rate, seed), apr_rate, seed)
        return {**planted_rates(images, PLANT, BOOT), **planted_apr(images, PLANT, BOOT)}

    metrics, _, _, _ = isic_inputs
    sd = {**metrics["sd"], "planted": planted(0.4, 0.45, 0.1, 0)}
    rl = {s: {**metrics["rl"], "planted": planted(0.8 - 0.1 * s, 0.15, 0.5, s)} for s in (0, 1, 2)}
    out = build_rl4med_seed_table(sd, rl, {"sd": "a", "rl-s0": "b", "rl-s1": "c", "rl-s2": "d"}, tmp_path)
    t = pd.read_csv(out["csv"], dtype=str, keep_default_na=False).set_index("Metric")
    assert t.loc["ruler rate, MEL prompts asking for it", "Verdict"] == "better in every seed"
    assert t.loc["ruler rate, MEL prompts not asking for it", "Verdict"] == "better in every seed"  # it fell
    assert t.loc["APR, MEL prompts asking for ruler", "Verdict"] == "better in every seed"
    assert "Planted gap to the other lesion's rate closed by RL" in Path(out["md"]).read_text()
    assert "APR where asked" in Path(out["md"]).read_text()


def test_cxrl_seed_table(cxr_metrics, tmp_path):
    from medrl.tables.cxrl import build_cxrl_seed_table, seed_comparisons

    metrics, _ = cxr_metrics
    rng = np.random.default_rng(9)
    shifts = {1: {"full": 0.12, "no_ace": 0.04, "no_rlcf": 0.06}, 2: {"full": 0.09, "no_ace": -0.05, "no_rlcf": 0.05}}
    per_seed = {0: {v: metrics[v] for v in ("full", "no_ace", "no_rlcf")},
                **{s: {v: _cxr_json(rng, x) for v, x in sh.items()} for s, sh in shifts.items()}}
    run_ids = {"anchor": "anc", **{f"{v}-s{s}": f"{v}{s}" for s in per_seed for v in per_seed[s]}}
    out = build_cxrl_seed_table(metrics["anchor"], per_seed, run_ids, tmp_path)
    t = pd.read_csv(out["csv"], dtype=str, keep_default_na=False)
    assert seed_comparisons(["full", "no_ace", "no_rlcf"]) == [
        ("full", "anchor"), ("no_ace", "anchor"), ("no_rlcf", "anchor"), ("full", "no_ace"), ("full", "no_rlcf")]
    assert list(dict.fromkeys(t["Comparison"])) == [f"{a} - {b}" for a, b in seed_comparisons(["full", "no_ace", "no_rlcf"])]
    judged = ("r_align", "AUROC (avg)", "CXR-CLIP similarity", "FID")
    assert set(t["Metric"]) == {*(f"{h} [{j}]" for h in judged for j in ("evaluator", "reward judge")), "MS-SSIM"}
    row = t[(t["Comparison"] == "full - anchor") & (t["Metric"] == "r_align [evaluator]")].iloc[0]
    assert row["seed 2 [CI]"] == fmt_ci(diff_from_boot(per_seed[2]["full"]["eval_r_align"],
                                                       metrics["anchor"]["eval_r_align"]), 3)
    assert row["Verdict"] == "better in every seed"
    # no_ace's shift is +0.03, +0.04, -0.05: its r_align against the anchor flips in seed 2
    assert t[(t["Comparison"] == "no_ace - anchor") & (t["Metric"] == "r_align [evaluator]")].iloc[0]["Verdict"] \
        == "seeds disagree"
    reward_rows = t[t["Metric"].str.endswith("[reward judge]")]
    assert set(reward_rows["Verdict"]) == {"(reward judge: no verdict; see the evaluator row)"}
    assert "verdicts are computed on the independent evaluator" in Path(out["md"]).read_text()
    values = pd.read_csv(out["values"])
    assert "full2 - anc" in set(values["run_id"])


# ----------------------------------------------------------------------------- CXR: two judges (issue 21)


def test_cxrl_tables_show_both_judges_and_their_accuracy(cxr_metrics, tmp_path):
    metrics, run_ids = cxr_metrics
    out = build_cxrl_tables(metrics, run_ids, tmp_path)
    t1 = pd.read_csv(out["cxrl_table1"]["csv"], dtype=str, keep_default_na=False)
    full = t1[t1["Model"] == "full"].iloc[0]
    assert full["r_align (psi) \u2191 (ours, evaluator)"] == fmt_ci(metrics["full"]["eval_r_align"], 3)
    assert full["AUROC \u2191 (ours, evaluator)"] == fmt_ci(metrics["full"]["eval_auroc"]["avg"], 3)
    diff = t1[t1["Model"] == "full - anchor"].iloc[0]
    assert diff["CXR-CLIP similarity \u2191 (ours, evaluator)"] == fmt_ci(
        diff_from_boot(metrics["full"]["eval_similarity"], metrics["anchor"]["eval_similarity"]), 3)
    t2a = pd.read_csv(out["cxrl_table2a"]["csv"], dtype=str, keep_default_na=False)
    assert t2a.loc[t2a.Key == "no_ace", "FID \u2193 (ours, evaluator)"].iloc[0] == fmt_ci(metrics["no_ace"]["eval_fid"], 3)
    t2b = pd.read_csv(out["cxrl_table2b"]["csv"], dtype=str, keep_default_na=False)
    assert t2b.loc[t2b.Model == "diag_only", "FID \u2193 (ours, evaluator)"].iloc[0] == fmt_ci(
        metrics["diag_only"]["eval_fid"], 3)
    t3 = pd.read_csv(out["cxrl_table3"]["csv"], dtype=str, keep_default_na=False)
    assert t3["CXRL (Ours) (ours, evaluator)"].iloc[3] == fmt_ci(metrics["full"]["eval_auroc"]["Edema"], 3)
    md = Path(out["cxrl_table1"]["md"]).read_text()
    assert "Claims are judged on the evaluator" in md and "never saw a reward net's training image" in md
    # each judge's accuracy on the held-out test pairs: reward / evaluator
    assert "0.011 / 0.022" in md and "0.910 / 0.870" in md and "0.500 / 0.375" in md
    assert "Not independent" not in md


def test_cxrl_tables_say_when_an_evaluator_is_the_released_reward_net(cxr_metrics, tmp_path):
    metrics, run_ids = cxr_metrics
    metrics["anchor"]["judges"] = _judges(independent=False)  # classifiers.diag.weights / dualenc.checkpoint set
    out = build_cxrl_tables(metrics, run_ids, tmp_path)
    md = Path(out["cxrl_claims"]["md"]).read_text()
    assert "Not independent: the diag, dualenc evaluator is the released reward network itself" in md


def test_cxrl_claims_are_judged_by_the_evaluator(cxr_metrics, tmp_path):
    """The reward judge sees CXRL far ahead of the anchor; the independent evaluator sees it far
    behind: the claim's verdict must follow the evaluator."""
    metrics, run_ids = cxr_metrics
    rng = np.random.default_rng(5)
    metrics["full"] = _cxr_json(rng, 0.1, eval_shift=-0.1)
    out = build_cxrl_tables(metrics, run_ids, tmp_path)
    claims = pd.read_csv(out["cxrl_claims"]["csv"], dtype=str, keep_default_na=False)
    row = claims[claims.Claim == "CXRL beats RoentGen [3] (anchor) on r_align"].iloc[0]
    assert row["Verdict (reward judge)"].startswith("supported")
    assert row["Verdict (evaluator)"].startswith("contradicted"), row["Verdict (evaluator)"]


def test_cxrl_seed_verdict_is_the_evaluators(cxr_metrics, tmp_path):
    from medrl.tables.cxrl import build_cxrl_seed_table

    metrics, _ = cxr_metrics
    rng = np.random.default_rng(4)
    per_seed = {s: {"full": _cxr_json(rng, 0.1, eval_shift=-0.1)} for s in (0, 1)}
    run_ids = {"anchor": "anc", **{f"full-s{s}": f"f{s}" for s in per_seed}}
    t = pd.read_csv(build_cxrl_seed_table(metrics["anchor"], per_seed, run_ids, tmp_path)["csv"], dtype=str,
                    keep_default_na=False)
    sel = t[t["Comparison"] == "full - anchor"].set_index("Metric")["Verdict"]
    assert sel["r_align [evaluator]"] == "worse in every seed"
    assert sel["r_align [reward judge]"].startswith("(reward judge: no verdict")


def test_cxrl_tables_need_the_evaluator_metrics(cxr_metrics, tmp_path):
    from medrl.tables.cxrl import build_cxrl_seed_table

    metrics, run_ids = cxr_metrics
    for model, key in (("full", "eval_r_align"), ("no_rlcf", "eval_auroc"), ("diag_only", "eval_fid"),
                       ("anchor", "judges")):
        bad = copy.deepcopy(metrics)
        del bad[model][key]
        with pytest.raises(DataError, match=key):
            build_cxrl_tables(bad, run_ids, tmp_path)
    bad = copy.deepcopy(metrics["full"])
    del bad["eval_similarity"]
    with pytest.raises(DataError, match="eval_similarity"):
        build_cxrl_seed_table(metrics["anchor"], {0: {"full": bad}}, {"anchor": "a", "full-s0": "f"}, tmp_path)


# ----------------------------------------------------------------------------- summary of both tracks

def _claims_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def test_summary_lists_both_tracks_claims_with_the_claims_verdict(tmp_path):
    from medrl.tables.summary import build_summary

    _claims_csv(tmp_path / "isic/rl4med_claims.csv", [
        {"Claim": "SD+RL beats SD on APR", "Difference": "rl - sd", "Better": "lower",
         "Ours difference [CI]": "-0.100 [-0.150, -0.050]", "Verdict (ours)": "supported (CI excludes 0)",
         "MLflow runs": "run1 - run2"},
        {"Claim": "SD+RL beats SD on FID", "Difference": "rl - sd", "Better": "lower",
         "Ours difference [CI]": "1.0 [-0.5, 2.5]", "Verdict (ours)": "inconclusive (CI includes 0)",
         "MLflow runs": "run1 - run2"}])
    # CXR: the reward judge's verdict comes first, the claim's verdict is the evaluator's
    _claims_csv(tmp_path / "cxr/cxrl_claims.csv", [
        {"Claim": "CXRL beats the anchor on r_align", "Difference": "full - anchor", "Better": "higher",
         "Paper difference": "", "Reward judge difference [CI]": "0.300 [0.200, 0.400]",
         "Verdict (reward judge)": "supported (CI excludes 0)", "Evaluator difference [CI]": "-0.200 [-0.300, -0.100]",
         "Verdict (evaluator)": "contradicted (CI excludes 0)", "MLflow runs": "run3 - run4"}])
    out = build_summary(tmp_path, tmp_path / "summary", commit="0123abcd", ci=0.95)
    df = pd.read_csv(out["csv"], dtype=str, keep_default_na=False)
    assert list(df.columns) == ["Track", "Claim", "Difference [95 % CI]", "Verdict"]
    assert list(df["Track"]) == ["ISIC (RL4Med-DDPO)"] * 2 + ["CXR (CXRL)"]
    assert list(df["Verdict"]) == ["supported (CI excludes 0)", "inconclusive (CI includes 0)",
                                   "contradicted (CI excludes 0)"]
    assert df["Difference [95 % CI]"].iloc[2] == "full - anchor: -0.200 [-0.300, -0.100]"
    md = Path(out["md"]).read_text()
    lines = md.splitlines()
    assert "0123abcd" in lines[0] and "| Track | Claim | Difference [95 % CI] | Verdict |" in lines
    assert "data/tables/isic/rl4med_claims.md" in md and "data/tables/cxr/cxrl_claims.md" in md
    assert "run1" not in md and "run3" not in md  # no MLflow run ids: two builds give the same file
    again = build_summary(tmp_path, tmp_path / "again", commit="0123abcd", ci=0.95)
    for k in ("md", "csv"):
        assert Path(again[k]).read_bytes() == Path(out[k]).read_bytes()


def test_summary_needs_a_verdict_column(tmp_path):
    from medrl.tables.summary import build_summary

    _claims_csv(tmp_path / "isic/rl4med_claims.csv", [{"Claim": "c", "Ours difference [CI]": "1 [0, 2]",
                                                      "Verdict (ours)": "supported (CI excludes 0)"}])
    _claims_csv(tmp_path / "cxr/cxrl_claims.csv", [{"Claim": "c", "Evaluator difference [CI]": "1 [0, 2]"}])
    with pytest.raises(DataError, match=r"cxrl_claims\.csv: no column named 'Verdict"):
        build_summary(tmp_path, tmp_path / "summary", commit="x")
    (tmp_path / "cxr/cxrl_claims.csv").unlink()
    with pytest.raises(DataError, match=r"cxrl_claims\.csv: file not found"):
        build_summary(tmp_path, tmp_path / "summary", commit="x")


def test_summary_reads_the_claims_tables_the_builders_write(isic_inputs, cxr_metrics, tmp_path):
    from medrl.tables.cxrl import CLAIM_VERDICT
    from medrl.tables.summary import build_summary

    metrics, augment, run_ids, _ = isic_inputs
    isic = build_rl4med_tables(metrics, augment, run_ids, tmp_path / "isic")["rl4med_claims"]["csv"]
    cxr_m, cxr_ids = cxr_metrics
    cxr = build_cxrl_tables(cxr_m, cxr_ids, tmp_path / "cxr")["cxrl_claims"]["csv"]
    out = build_summary(tmp_path, tmp_path / "summary", commit="abc")
    df = pd.read_csv(out["csv"], dtype=str, keep_default_na=False)
    claims = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in (isic, cxr)]
    assert list(df["Claim"]) == list(claims[0]["Claim"]) + list(claims[1]["Claim"])
    assert list(df["Verdict"]) == list(claims[0]["Verdict (ours)"]) + list(claims[1][CLAIM_VERDICT])
    assert list(df["Difference"]) == [f"{d}: {v}" for c, col in ((claims[0], "Ours difference [CI]"),
                                                                 (claims[1], "Evaluator difference [CI]"))
                                      for d, v in zip(c["Difference"], c[col])]


def test_cxrl_table3_shows_the_vae_ceiling_and_the_share_of_its_gap_closed(cxr_metrics, tmp_path):
    """Issue 21 item 2 (CXR): per finding, the evaluator's AUROC on real test images and after a
    VAE round trip, and (CXRL - anchor) / (ceiling - anchor); 'no gap' where the ceiling lies
    within the anchor's own interval."""
    metrics, run_ids = cxr_metrics
    anchor, full = metrics["anchor"]["eval_auroc"], metrics["full"]["eval_auroc"]
    edema, effusion = "Edema", "Effusion"
    ceiling = {c: 0.95 for c in P.CXR_CLASSES}
    ceiling[effusion] = (anchor[effusion]["lo"] + anchor[effusion]["hi"]) / 2  # within the anchor's CI
    ceiling["Fracture"] = anchor["Fracture"]["lo"] - 0.05  # below: a class the evaluator cannot read
    ceiling["avg"] = 0.93
    block = lambda auroc: {"auroc": auroc, "recall": {c: 0.5 for c in P.CXR_CLASSES},  # noqa: E731
                           "false_rate": {c: 0.1 for c in P.CXR_CLASSES}}
    metrics["anchor"]["vae_ceiling"] = {"n_images": 8, "eval": {"real": block({c: 0.97 for c in ceiling}),
                                                                "vae_roundtrip": block(ceiling)}}
    t3 = pd.read_csv(build_cxrl_tables(metrics, run_ids, tmp_path)["cxrl_table3"]["csv"], dtype=str,
                     keep_default_na=False).set_index("Pathology")
    closed = "Gap to the ceiling closed by CXRL (ours, evaluator)"
    share = (full[edema]["value"] - anchor[edema]["value"]) / (0.95 - anchor[edema]["value"])
    assert t3.loc[edema, closed] == f"{100 * share:.0f} %"
    assert t3.loc[effusion, closed] == "no gap" and t3.loc["Fracture", closed] == "no gap"
    assert t3.loc[edema, "Real test images through the VAE (ceiling) (ours, evaluator)"] == "0.950"
    assert t3.loc["macro average", "Real test images (ours, evaluator)"] == "0.970"
    # without a measured ceiling the columns are absent, not blank
    del metrics["anchor"]["vae_ceiling"]
    t3 = pd.read_csv(build_cxrl_tables(metrics, run_ids, tmp_path)["cxrl_table3"]["csv"], dtype=str)
    assert closed not in t3.columns


def test_cxrl_planted_table_shows_each_variants_share_of_the_planted_gap(cxr_metrics, tmp_path):
    """Issue 21 item 1 (CXR): how often the planted finding is drawn where a report states it and
    where not, each variant minus the anchor (paired), and (variant - anchor) / (ceiling - anchor),
    the ceiling being the evaluator's recall through the VAE; absent without a plant."""
    from medrl.tables.cxrl_planted import build_cxrl_planted_table

    metrics, run_ids = cxr_metrics
    main = {m: metrics[m] for m in ("anchor", "full", "no_rlcf")}
    assert build_cxrl_planted_table(main, run_ids, tmp_path, labels=P.CXRL_LABELS) is None
    rng = np.random.default_rng(4)
    plant = {"finding": "Effusion", "overclaim": 0.2, "finetune_share": 0.15, "n_overclaimed": 154,
             "n_stated_true": 161, "n_kept": 22, "planted_rate": 0.125}
    for m, up in (("anchor", 0.0), ("full", 0.2), ("no_rlcf", -0.1)):
        for block in ("planted", "planted_reward_judge"):
            main[m][block] = {"planted": plant, "rate": _metric(rng, 0.4 + up, 0.3),
                              "false_rate": _metric(rng, 0.1, 0.2)}
    vae = {"recall": {"Effusion": 0.95}, "false_rate": {"Effusion": 0.05}}
    main["anchor"]["vae_ceiling"] = {"n_images": 8, "eval": {"real": vae, "vae_roundtrip": vae}}
    out = build_cxrl_planted_table(main, run_ids, tmp_path, labels=P.CXRL_LABELS, notes=["split: test"])
    t = pd.read_csv(out["csv"], dtype=str, keep_default_na=False).set_index("Model")
    full, anchor = main["full"]["planted"]["rate"], main["anchor"]["planted"]["rate"]
    assert t.loc["CXRL (Ours)", "- anchor, report stated (evaluator)"] == fmt_ci(diff_from_boot(full, anchor), 3)
    share = (full["value"] - anchor["value"]) / (0.95 - anchor["value"])
    assert t.loc["CXRL (Ours)", "gap to ceiling closed (evaluator)"] == f"{100 * share:.0f} %"
    assert t.loc["RoentGen [3] (anchor)", "gap to ceiling closed (evaluator)"] == ""
    assert t.loc["RoentGen [3] (anchor)", "finding drawn, report stated (reward judge)"] == fmt_ci(
        main["anchor"]["planted_reward_judge"]["rate"], 3)
    md = Path(out["md"]).read_text()
    assert "22 stay in the anchor's fine-tune set" in md and "fires on 95 % of those with Effusion" in md
    del main["no_rlcf"]["planted"]
    with pytest.raises(DataError, match="no_rlcf: metrics have no 'planted' block"):
        build_cxrl_planted_table(main, run_ids, tmp_path, labels=P.CXRL_LABELS)
    # the seeds table gets a row per variant for the planted rate where stated, with its verdict
    from medrl.tables.cxrl import build_cxrl_seed_table

    per_seed = {0: {"full": main["full"]}}
    t = pd.read_csv(build_cxrl_seed_table(main["anchor"], per_seed, {"anchor": "a", "full-s0": "f"}, tmp_path)["csv"],
                    dtype=str, keep_default_na=False)
    row = t[t["Metric"] == "Effusion drawn where stated [evaluator]"]
    assert list(row["Comparison"]) == ["full - anchor"]
    assert row.iloc[0]["seed 0 [CI]"] == fmt_ci(diff_from_boot(full, anchor), 3)
