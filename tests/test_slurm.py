"""Cheap stages of the small configuration through `snakemake --profile slurm` on a real
SLURM cluster (the one-node cluster of .ci/slurm/start.sh, or any cluster you are on).

Enabled when MEDRL_TEST_SLURM=1 (then a missing cluster is a failure, not a skip), or when
MEDRL_TEST_SLURM is unset and `sinfo`/`scontrol ping` answer; MEDRL_TEST_SLURM=0 skips.
Each SLURM job costs ~15-60 s of submission and status polling, so only three jobs run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from medrl_testutil import VENV_BIN, engine_env, mlflow_stage_runs, run

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

# download_isic and download_cxr run side by side, tokenizer_isic after download_isic
TARGETS = ("data/models/isic/tokenizer", "data/datasets/cxr")
STAGES = {"download_isic", "tokenizer_isic", "download_cxr"}


def _cluster_up() -> tuple[bool, str]:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False, "no SLURM client commands (sinfo/sbatch) on PATH"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        info = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"SLURM not answering: {e}"
    if "UP" not in ping.stdout or info.returncode != 0:
        return False, f"slurmctld not reachable: {ping.stdout.strip() or ping.stderr.strip()}"
    states = set(info.stdout.split())
    if not states & {"idle", "mixed", "allocated", "completing"}:
        return False, f"no usable node (states: {sorted(states) or 'none'})"
    return True, "ok"


def _enabled() -> None:
    flag = os.environ.get("MEDRL_TEST_SLURM")
    up, why = _cluster_up()
    if flag == "0":
        pytest.skip("SLURM test disabled (MEDRL_TEST_SLURM=0)")
    if flag == "1" and not up:
        pytest.fail(f"MEDRL_TEST_SLURM=1 but the cluster is not usable: {why} (start it: bash .ci/slurm/start.sh)")
    if not up:
        pytest.skip(f"no SLURM cluster ({why}); start one with `bash .ci/slurm/start.sh` or set MEDRL_TEST_SLURM=1")


def _cancel_jobs_in(ws: Path) -> None:
    """scancel only the jobs whose working directory is this test's workspace."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True, timeout=30).stdout
    rows = [line.split() for line in out.splitlines()]
    ids = [r[0] for r in rows if len(r) == 2 and r[1].startswith(str(ws))]
    if ids:
        subprocess.run(["scancel", *ids], timeout=30, check=False)


def test_cheap_stages_through_slurm_profile(workspace_factory, tmp_path):
    _enabled()
    ws = workspace_factory("slurm", dvc=False)
    # install the workspace's profiles into a private config dir, then use the profile BY NAME
    xdg = tmp_path / "xdg"
    env = engine_env(ws, XDG_CONFIG_HOME=str(xdg))
    run(["bash", "workflow/profiles/install.sh"], ws, env)
    assert (xdg / "snakemake" / "slurm" / "config.yaml").is_file()
    env.update({
        "MEDRL_GPUS_PER_JOB": "0",  # CPU-only cluster: GPU rules must ask for no GPU
        "MEDRL_SLURM_CPUS": "1",
        "MEDRL_SLURM_MEM_MB": "1500",
        "MEDRL_SLURM_RUNTIME": "20",
    })
    cmd = [str(VENV_BIN / "snakemake"), "--profile", "slurm", "--jobs", "2",
           "--slurm-init-seconds-before-status-checks", "5", "--slurm-keep-successful-logs", "--retries", "0",
           *TARGETS]
    try:
        proc = run(cmd, ws, env, timeout=780)
    finally:
        _cancel_jobs_in(ws)
    log = proc.stdout + proc.stderr
    assert "Using profile slurm" in log
    assert "3 of 3 steps (100%) done" in log, log[-3000:]
    for t in ("data/datasets/isic", "data/datasets/cxr", "data/models/isic/tokenizer"):
        assert (ws / t).is_dir() and any((ws / t).iterdir()), t
    # each rule ran as a SLURM job: its log (.snakemake/slurm_logs/rule_<name>/<jobid>.log)
    # holds the stage's own completion line, written on the compute node
    logdir = ws / ".snakemake" / "slurm_logs"
    logs = {p.parent.name.removeprefix("rule_"): p.read_text() for p in logdir.rglob("*.log")}
    assert set(logs) == STAGES, sorted(logs)
    for stage, text in logs.items():
        assert f"[medrl] {stage} done" in text, text[-2000:]
    runs = mlflow_stage_runs(f"sqlite:///{ws / 'mlflow.db'}")
    assert sorted(r.data.tags["medrl.stage"] for r in runs if r.info.status == "FINISHED") == sorted(STAGES)
    # and the profile is honest about resources: dry-run of a GPU rule with the default env asks for one GPU
    dry = run([str(VENV_BIN / "snakemake"), "--profile", "slurm", "-n", "-p", "data/models/isic/clf_h6"], ws,
              {**env, "MEDRL_GPUS_PER_JOB": "1"}, timeout=120)
    assert "gpu=1" in dry.stdout + dry.stderr
