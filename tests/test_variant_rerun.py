"""Issue 17 item 9: a change under ``rl.cxr.variants.X`` reruns only variant X and what depends
on it (its samples, its metrics, the CXR tables), under both engines; issue 21: in every seed of X
(``all_seeds``), and a change of ``rl.seeds`` plans only the new seed's jobs. No stage runs:
every output is faked and marked up to date with ``snakemake --touch`` (which also records
dvc.lock), then the plans are read with ``snakemake -n`` and ``dvc status``."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from medrl_testutil import REPO, VENV_BIN, dvc_status, engine_env, make_workspace, run, set_param, snakemake_planned

sys.path.insert(0, str(REPO / "workflow"))
from graph import STAGES, fill, jobs_of  # noqa: E402

pytestmark = pytest.mark.timeout(900)


def test_variant_param_change_reruns_only_that_variant(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    variants, seeds = list(raw["rl"]["cxr"]["variants"]), raw["rl"]["seeds"]
    assert len(variants) >= 2 and raw["rl"]["cxr"]["seed_variants"][1] == variants[1] and seeds == [0, 1, 2]
    for s in STAGES.values():
        for wc in jobs_of(s, raw):
            for out in s.outs.values():
                p = ws / fill(out, wc)
                p.mkdir(parents=True, exist_ok=True)
                (p / "fake.txt").write_text(f"{s.name} {wc}\n")
    triggers = ("--rerun-triggers", "params", "mtime", "input")
    run([str(VENV_BIN / "snakemake"), "--cores", "1", "--touch", "all_seeds"], ws, env=engine_env(ws), timeout=600)
    assert snakemake_planned(ws, ["all_seeds"], *triggers) == {}
    assert dvc_status(ws) == {}

    x = variants[1]  # a headline variant: run in every seed
    set_param(ws / "params.yaml", f"rl.cxr.variants.{x}.l_align", 0.5)
    planned = snakemake_planned(ws, ["all"], *triggers)
    assert set(planned) == {f"rl_cxr@{x}-s0", f"generate_cxr@{x}-s0", f"metrics_cxr@{x}-s0", "tables_cxr",
                            "summary"}, planned
    planned = snakemake_planned(ws, ["all_seeds"], *triggers)
    assert set(planned) == {f"{st}@{x}-s{k}" for st in ("rl_cxr", "generate_cxr", "metrics_cxr") for k in seeds} | {
        "tables_cxr", "tables_cxr_seeds", "summary"}, planned
    # DVC: the stages whose own params changed (downstream follows once their outputs change)
    assert set(dvc_status(ws)) == {f"{st}@{x}-s{k}" for st in ("rl_cxr", "metrics_cxr") for k in seeds} | {"tables_cxr"}


def test_new_seed_plans_only_its_jobs(tmp_path):
    """Adding a seed to rl.seeds plans that seed's RL runs, samples and metrics and the tables over
    seeds; the default run (`all`) and the other seeds stay up to date."""
    ws = make_workspace(tmp_path / "ws", dvc=False)
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    for s in STAGES.values():
        for wc in jobs_of(s, raw):
            for out in s.outs.values():
                (ws / fill(out, wc)).mkdir(parents=True, exist_ok=True)
                (ws / fill(out, wc) / "fake.txt").write_text("x\n")
    triggers = ("--rerun-triggers", "params", "mtime", "input")
    run([str(VENV_BIN / "snakemake"), "--cores", "1", "--touch", "all_seeds"], ws, env=engine_env(ws), timeout=600)
    set_param(ws / "params.yaml", "rl.seeds", [0, 1, 2, 7])
    assert snakemake_planned(ws, ["all"], *triggers) == {}
    planned = snakemake_planned(ws, ["all_seeds"], *triggers)
    new = {f"{st}@s7" for st in ("rl_isic", "generate_rl_isic", "metrics_isic_rl")} | {
        f"{st}@{v}-s7" for st in ("rl_cxr", "generate_cxr", "metrics_cxr") for v in raw["rl"]["cxr"]["seed_variants"]}
    assert set(planned) == new | {"tables_isic_seeds", "tables_cxr_seeds"}, planned
