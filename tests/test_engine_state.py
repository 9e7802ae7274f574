"""Snakemake and DVC share one workspace state (workflow/state.py).

Whichever engine built the cheap data stages of the small config, the other sees them as up to
date; after a one-parameter change both plan the same stages; a failed Snakemake run records
only what completed; a DVC remote carries the outputs.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from medrl_testutil import (CHEAP_STAGES, CHEAP_TARGETS, VENV_BIN, dvc_status, run, set_param, snakemake_planned)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DVC = str(VENV_BIN / "dvc")
SNAKEMAKE = str(VENV_BIN / "snakemake")
CXR_DOWNSTREAM = {"download_cxr", "tokenizer_cxr", "prepare_cxr"}


def _dvc_planned(ws: Path) -> set[str]:
    """Stages `dvc repro` would run now: the changed ones and (as their outputs change) everything below."""
    out = run([DVC, "repro", "--dry", "--force-downstream", *CHEAP_STAGES], ws, timeout=300).stdout
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def _smk(ws: Path, *extra: str):
    return run([SNAKEMAKE, "--cores", "2", *CHEAP_TARGETS, *extra], ws, timeout=600)


def _locked(ws: Path) -> set[str]:
    return set(yaml.safe_load((ws / "dvc.lock").read_text())["stages"]) if (ws / "dvc.lock").exists() else set()


def test_snakemake_build_then_dvc(workspace_factory):
    ws = workspace_factory("smk-then-dvc")
    proc = _smk(ws)
    assert "dvc.lock records 6 up-to-date stage(s)" in proc.stderr
    assert _locked(ws) == set(CHEAP_STAGES)
    assert dvc_status(ws, list(CHEAP_STAGES)) == {}
    assert _dvc_planned(ws) == set()

    set_param(ws / "params.yaml", "cxr.phantom.seed", 11)
    smk_plan = set(snakemake_planned(ws, list(CHEAP_TARGETS)))
    assert _dvc_planned(ws) == smk_plan == CXR_DOWNSTREAM
    ran = run([DVC, "repro", *CHEAP_STAGES], ws, timeout=600).stdout
    assert {line.split("'")[1] for line in ran.splitlines() if line.startswith("Running stage '")} == CXR_DOWNSTREAM
    assert snakemake_planned(ws, list(CHEAP_TARGETS)) == {}
    assert dvc_status(ws, list(CHEAP_STAGES)) == {}


def test_dvc_build_then_snakemake(workspace_factory):
    ws = workspace_factory("dvc-then-smk")
    run([DVC, "repro", *CHEAP_STAGES], ws, timeout=600)
    assert snakemake_planned(ws, list(CHEAP_TARGETS)) == {}

    set_param(ws / "params.yaml", "cxr.phantom.seed", 11)
    assert set(snakemake_planned(ws, list(CHEAP_TARGETS))) == _dvc_planned(ws) == CXR_DOWNSTREAM
    _smk(ws)
    assert snakemake_planned(ws, list(CHEAP_TARGETS)) == {}
    assert dvc_status(ws, list(CHEAP_STAGES)) == {}
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert lock["download_cxr"]["params"]["params.yaml"]["cxr.phantom"]["seed"] == 11


def test_failed_snakemake_run_records_only_completed_stages(workspace_factory):
    ws = workspace_factory("smk-partial", {"cxr": {"prepare": {"n_train": 100000}}})  # prepare_cxr fails
    proc = run([SNAKEMAKE, "--cores", "2", "--keep-going", *CHEAP_TARGETS], ws, timeout=600, check=False)
    assert proc.returncode != 0 and "n_train=100000" in proc.stderr + proc.stdout
    assert _locked(ws) == set(CHEAP_STAGES) - {"prepare_cxr"}
    assert dvc_status(ws, [s for s in CHEAP_STAGES if s != "prepare_cxr"]) == {}
    assert set(dvc_status(ws, ["prepare_cxr"])) == {"prepare_cxr"}


def test_dvc_remote_shares_finished_stages(workspace_factory, tmp_path):
    """A colleague pushes what Snakemake built; a fresh workspace pulls it and has nothing to rerun."""
    ws = workspace_factory("remote")
    _smk(ws)
    remote = str(tmp_path / "remote")
    run([DVC, "remote", "add", "-d", "shared", remote], ws)
    run([DVC, "push"], ws, timeout=300)

    other = workspace_factory("pulled")
    shutil.copy2(ws / "dvc.lock", other / "dvc.lock")
    run([DVC, "remote", "add", "-d", "shared", remote], other)
    run([DVC, "pull", *CHEAP_STAGES], other, timeout=300)
    assert dvc_status(other, list(CHEAP_STAGES)) == {}
    for rel in CHEAP_TARGETS:
        # the same files (Snakemake's .snakemake_timestamp marker is in .dvcignore: not shared)
        assert sorted(p.name for p in (other / rel).iterdir()) == sorted(
            p.name for p in (ws / rel).iterdir() if p.name != ".snakemake_timestamp"), rel
    # pulled files carry checkout-time mtimes: with dvc status clean, Snakemake takes them as they are
    run([SNAKEMAKE, "--cores", "1", "--touch", *CHEAP_TARGETS], other, timeout=300)
    assert snakemake_planned(other, list(CHEAP_TARGETS)) == {}
    assert dvc_status(other, list(CHEAP_STAGES)) == {}
