"""Issue 17 item 9: a change under ``rl.cxr.variants.X`` reruns only variant X and what depends
on it (its samples, its metrics, the CXR tables), under both engines, without running a stage:
every output is faked and marked up to date with ``snakemake --touch`` (which also records
dvc.lock), then the plans are read with ``snakemake -n`` and ``dvc status``."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from medrl_testutil import REPO, VENV_BIN, dvc_status, engine_env, make_workspace, run, set_param, snakemake_planned

sys.path.insert(0, str(REPO / "workflow"))
from graph import STAGES  # noqa: E402

pytestmark = pytest.mark.timeout(900)


def test_variant_param_change_reruns_only_that_variant(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    variants = list(yaml.safe_load((ws / "params.yaml").read_text())["rl"]["cxr"]["variants"])
    assert len(variants) >= 2
    for s in STAGES.values():
        for v in (variants if s.foreach else [None]):
            for out in s.outs.values():
                p = ws / (out.format(variant=v) if v else out)
                p.mkdir(parents=True, exist_ok=True)
                (p / "fake.txt").write_text(f"{s.name} {v}\n")
    run([str(VENV_BIN / "snakemake"), "--cores", "1", "--touch", "all"], ws, env=engine_env(ws), timeout=600)
    assert snakemake_planned(ws, ["all"], "--rerun-triggers", "params", "mtime", "input") == {}
    assert dvc_status(ws) == {}

    x = variants[1]
    set_param(ws / "params.yaml", f"rl.cxr.variants.{x}.l_align", 0.5)
    planned = snakemake_planned(ws, ["all"], "--rerun-triggers", "params", "mtime", "input")
    assert set(planned) == {f"rl_cxr@{x}", f"generate_cxr@{x}", f"metrics_cxr@{x}", "tables_cxr"}, planned
    # DVC: the stages whose own params changed (downstream follows once their outputs change)
    assert set(dvc_status(ws)) == {f"rl_cxr@{x}", f"metrics_cxr@{x}", "tables_cxr"}
