"""The user-facing documents keep their promises: short README, summary-first RESULTS, one
comment per params.yaml key, no machine paths or experiment history outside the notebook."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
USER_DOCS = [REPO / "README.md", REPO / "params.yaml", REPO / "docs/RESULTS.md", REPO / "docs/ARCHITECTURE.md",
             REPO / "docs/SLURM.md"]


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 120


def test_results_open_with_the_current_default():
    head = "\n".join((REPO / "docs/RESULTS.md").read_text().splitlines()[:15]).lower()
    assert "default" in head and "notebook.md" in (REPO / "docs/RESULTS.md").read_text().lower()


def test_no_machine_paths_or_experiment_letters_in_user_documents():
    for doc in USER_DOCS:
        text = doc.read_text()
        assert not re.search(r"/tmp/|/work/|/root/|/home/", text), doc.name
        assert not re.search(r"\b(experiment|RESULTS|run) [A-L]\b", text), doc.name


def test_every_params_key_has_one_short_comment():
    lines = (REPO / "params.yaml").read_text().splitlines()
    keys = [ln for ln in lines if re.match(r"^\s*[A-Za-z_][\w]*:", ln)]
    assert len(keys) > 100
    missing = [ln.strip() for ln in keys if "#" not in ln]
    assert missing == [], missing
    # no comment-only lines between keys (history, rationale): only the file's header
    body = lines[next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#")):]
    assert [ln for ln in body if ln.strip().startswith("#")] == []
    assert yaml.safe_load((REPO / "params.yaml").read_text())  # still valid YAML
