"""One workspace state for both engines.

- **Params as files.** Each stage execution's declared params are written to
  ``data/.params/<stage>[@<job>].json`` (job ``full-s0``: variant full, seed 0; only when
  their content changes) by the Snakefile when it is parsed and by ``entry.py`` before the stage runs. The Snakemake rule takes that
  file as an input, so Snakemake reruns a stage when its params change through its ordinary
  input/mtime trigger, and a workspace built by ``dvc repro`` (whose stage runs wrote the same
  files before their outputs) is up to date for Snakemake too. DVC reads params.yaml itself.
- **Snakemake -> DVC.** When a Snakemake run ends (``onsuccess`` / ``onerror`` in the
  Snakefile, i.e. once, on the submitting node), ``record_in_dvc`` asks Snakemake which
  outputs are up to date (``snakemake --summary``) and ``dvc commit``s exactly those stages, so
  ``dvc.lock`` holds what ``dvc repro`` would have recorded and ``dvc status`` is true.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from graph import STAGES, Stage, fill, job_key, jobs_of

PARAMS_DIR = "data/.params"


def job_name(stage: str, wildcards: dict[str, str] | None = None) -> str:
    """DVC's name for one stage execution (``rl_cxr@full-s0``); Snakemake's rule + wildcards."""
    return f"{stage}@{job_key(wildcards)}" if wildcards else stage


def params_file(stage: str, wildcards: dict[str, str] | None = None) -> str:
    return f"{PARAMS_DIR}/{job_name(stage, wildcards)}.json"


def declared_params(stage: Stage, params, wildcards: dict[str, str]) -> dict:
    """The params a stage declares, by key; a wildcard's own section is keyed ``...selected...``
    so every variant's run lists its settings under the same names (MLflow compare view)."""
    from medrl.config import select

    keys = [k.format(**wildcards) if wildcards else k for k in stage.params]
    return {k.replace("{variant}", "selected"): v for k, v in zip(stage.params, select(params, keys).values())}


def write_params_file(workspace: Path, stage: Stage, params, wildcards: dict[str, str]) -> Path:
    """Write the stage's declared params to its params file unless it already holds them
    (an unchanged file keeps its mtime, so nothing downstream looks updated)."""
    path = Path(workspace) / params_file(stage.name, wildcards)
    text = json.dumps(declared_params(stage, params, wildcards), indent=1, sort_keys=True, default=str) + "\n"
    if path.is_file() and path.read_text() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_all_params_files(workspace: Path, params) -> None:
    for s in STAGES.values():
        for wc in jobs_of(s, params):
            write_params_file(workspace, s, params, wc)


# ----------------------------------------------------------------------------- Snakemake -> DVC


def stage_outputs(params) -> dict[str, list[str]]:
    """{DVC stage name: its output paths} for every stage execution of the graph."""
    out = {}
    for s in STAGES.values():
        for wc in jobs_of(s, params):
            out[job_name(s.name, wc)] = [fill(t, wc) for t in s.outs.values()]
    return out


def snakemake_up_to_date(workspace: Path, snakemake: str) -> set[str]:
    """Outputs Snakemake itself sees as complete and current (``--summary`` status ok, no update
    planned) among those of ``all_seeds`` (every stage). ``--nolock``: the Snakemake run that
    calls this still holds the workspace lock."""
    proc = subprocess.run([snakemake, "--summary", "--nolock", "--cores", "1", "all_seeds"], cwd=workspace,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake --summary failed:\n{proc.stderr[-3000:]}")
    rows = csv.DictReader(io.StringIO(proc.stdout[proc.stdout.find("output_file"):]), delimiter="\t")
    return {r["output_file"].rstrip("/") for r in rows if r.get("status") == "ok" and r.get("plan") == "no update"}


def record_in_dvc(workspace: Path, params, snakemake: str = "snakemake", dvc: str = "dvc") -> list[str]:
    """``dvc commit`` the stages whose every output Snakemake sees as up to date, in graph order,
    so that ``dvc status`` / ``dvc repro`` agree with what Snakemake built. Returns their names."""
    workspace = Path(workspace)
    if not (workspace / ".dvc").is_dir():
        return []
    current = snakemake_up_to_date(workspace, snakemake)
    done = [name for name, outs in stage_outputs(params).items() if all(o.rstrip("/") in current for o in outs)]
    if done:
        proc = subprocess.run([dvc, "commit", "--force", "--quiet", *done], cwd=workspace, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"dvc commit failed:\n{proc.stderr[-3000:]}")
    return done


def record_in_dvc_hook(workspace: Path, params) -> None:
    """The Snakefile's onsuccess/onerror body: record, and say so, without failing the run."""
    bindir = Path(sys.executable).parent
    try:
        done = record_in_dvc(workspace, params, snakemake=str(bindir / "snakemake"), dvc=str(bindir / "dvc"))
    except Exception as e:  # the run's own result stands; the user can rerun `snakemake` to record
        print(f"[medrl] could not record the finished stages in dvc.lock: {e}", file=sys.stderr)
        return
    if done:
        print(f"[medrl] dvc.lock records {len(done)} up-to-date stage(s) built by Snakemake", file=sys.stderr)

