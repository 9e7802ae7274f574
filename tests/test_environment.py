"""requirements.lock pins what the README's commands install; every stage run records its environment."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from medrl.environment import RESULT_PACKAGES, check_lock, environment_hash, environment_record, read_lock
from medrl.lineage import environments, format_lineage

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"


def test_installed_environment_is_exactly_the_lock():
    mismatches, _extras = check_lock(LOCK)
    assert mismatches == []


def test_lock_pins_every_declared_dependency_with_a_hash():
    pins = read_lock(LOCK)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    for req in declared:
        name = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is declared in pyproject.toml but not locked"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    lines = [ln for ln in LOCK.read_text().splitlines() if ln and not ln.startswith("#")]
    assert all(re.fullmatch(r"\S+==\S+ --hash=sha256:[0-9a-f]{64}", ln) for ln in lines)


def test_check_lock_names_a_version_mismatch(tmp_path):
    text = LOCK.read_text().replace("torch==2.14.1 ", "torch==2.0.0 ")
    (tmp_path / "lock").write_text(text)
    mismatches, _ = check_lock(tmp_path / "lock")
    assert mismatches == ["torch: locked 2.0.0, installed 2.14.1"]
    (tmp_path / "loose").write_text("torch>=2\n")
    with pytest.raises(ValueError, match="not pinned"):
        read_lock(tmp_path / "loose")


def test_environment_record_names_result_packages():
    rec = environment_record("cpu")
    assert {f"pkg.{p}" for p in RESULT_PACKAGES} <= set(rec)
    assert rec["pkg.torch"] == "2.14.1" and rec["device"] == "cpu" and rec["dtype"] == "float32"
    # the thread count changes no number, so it does not change the environment's identity
    assert environment_hash(rec) == environment_hash({**rec, "torch.threads": "7"})
    assert environment_hash(rec) != environment_hash({**rec, "pkg.diffusers": "0.0.1"})


def _entry(stage, depth, env_hash, diffusers):
    return {"depth": depth, "stage": stage, "wildcards": {}, "run_id": f"r-{stage}", "experiment": "medrl-cxr",
            "output": f"data/{stage}", "hash": "ab" * 32, "current": True, "git_commit": "c" * 40, "params": {},
            "inputs": {}, "env": {"pkg.diffusers": diffusers, "python": "3.11.7"}, "env_hash": env_hash}


def test_lineage_flags_a_chain_built_in_two_environments():
    same = [_entry("tables_cxr", 0, "e1", "0.42.1"), _entry("metrics_cxr", 1, "e1", "0.42.1")]
    assert list(environments(same)) == ["e1"]
    text = format_lineage(same)
    assert "environment e1: diffusers=0.42.1 python=3.11.7" in text and "WARNING" not in text
    mixed = same + [_entry("rl_cxr", 2, "e2", "0.30.0")]
    text = format_lineage(mixed)
    assert "WARNING: the runs behind this output ran in 2 different environments" in text
    assert "environment e2: rl_cxr" in text
