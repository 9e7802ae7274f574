"""A killed RL stage resumes to the output of an uninterrupted one (issue 17, item 4).

ISIC track on the small params with rl.isic.epochs=4 and a checkpoint every epoch: the
upstream stages run once through workflow/entry.py, the workspace is copied, then `rl_isic`
runs uninterrupted in one copy and, in the other, is SIGKILLed at a random epoch (once the
checkpoint of a randomly drawn epoch 1..EPOCHS-1 exists) and run again. Both output folders must hold the same files with the same
content (rewards.csv compared without its timing columns), and the resumed stage's MLflow run
must hold every epoch's metrics, equal to the uninterrupted run's.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from medrl_testutil import VENV_BIN, engine_env, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

UPSTREAM = ("download_isic", "tokenizer_isic", "prepare_isic", "stack_isic", "latents_isic", "finetune_base_isic",
            "classifier_isic_h6")
EPOCHS = 4
OUT = "data/rl/isic/seed_0"  # the default seed (rl.isic.seed)
# Wall-clock columns of rewards.csv / metrics: the only things allowed to differ.
TIMING = ("epoch_time_s", "trajectories_per_s", "base_comparison_s")
PER_EPOCH = ("reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "kl", "grad_norm", "samples")


def _files(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file of an output folder (rewards.csv without TIMING)."""
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if f.name == "rewards.csv":
            df = pd.read_csv(f).drop(columns=[c for c in TIMING if c in pd.read_csv(f).columns])
            buf = io.StringIO()
            df.to_csv(buf, index=False)
            data = buf.getvalue().encode()
        else:
            data = f.read_bytes()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def _history(ws: Path) -> tuple[str, dict[str, dict[int, float]]]:
    """(status, {metric: {step: value}}) of the newest rl_isic MLflow run of a workspace."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments() if e.name.startswith("medrl-")]
    runs = client.search_runs(exps, filter_string="tags.`medrl.stage` = 'rl_isic'", order_by=["attributes.start_time DESC"])
    r = runs[0]
    return r.info.status, {k: {m.step: m.value for m in client.get_metric_history(r.info.run_id, k)} for k in PER_EPOCH}


def _checkpointed(ckpt_root: Path) -> int:
    """Epochs done according to the latest checkpoint (0 if none yet)."""
    for state in ckpt_root.glob("*/latest/state.json"):
        try:
            return int(json.loads(state.read_text())["meta"]["next_epoch"])
        except (OSError, ValueError, KeyError):  # being replaced right now
            return 0
    return 0


def test_killed_rl_stage_resumes_exactly(workspace_factory, tmp_path):
    ws_a = workspace_factory("rlresume", {"rl": {"isic": {"epochs": EPOCHS}, "common": {"checkpoint_every": 1}}},
                             dvc=False)
    env = engine_env(ws_a)
    py = str(VENV_BIN / "python")
    for stage in UPSTREAM:
        run([py, "workflow/entry.py", stage], ws_a, env, timeout=900)
    ws_b = tmp_path / "killed"
    shutil.copytree(ws_a, ws_b, symlinks=True)

    run([py, "workflow/entry.py", "rl_isic", "--seed", "0"], ws_a, env, timeout=900)

    proc = subprocess.Popen([py, "workflow/entry.py", "rl_isic", "--seed", "0"], cwd=ws_b, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    ckpt_root = ws_b / "data/.ckpt/rl_isic-s0"
    kill_at = random.SystemRandom().randint(1, EPOCHS - 1)  # the exactness must not depend on where
    print(f"killing rl_isic once epoch {kill_at} is checkpointed")
    try:
        while _checkpointed(ckpt_root) < kill_at:
            assert proc.poll() is None, f"rl_isic ended before epoch {kill_at}'s checkpoint:\n{proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no checkpoint after 900 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (ws_b / OUT).exists(), "killed before the end: nothing promoted"
    done = _checkpointed(ckpt_root)
    assert kill_at <= done < EPOCHS, (kill_at, done)

    run([py, "workflow/entry.py", "rl_isic", "--seed", "0"], ws_b, env, timeout=900)

    fa, fb = _files(ws_a / OUT), _files(ws_b / OUT)
    assert sorted(fa) == sorted(fb), (sorted(fa), sorted(fb))
    assert [k for k in fa if k.startswith("samples/")], "the small run writes sample grids"
    assert {k: fa[k] for k in fa if fa[k] != fb[k]} == {}, "files differ after the resume"

    status_a, hist_a = _history(ws_a)
    status_b, hist_b = _history(ws_b)
    assert status_a == status_b == "FINISHED"
    for k in PER_EPOCH:
        assert sorted(hist_b[k]) == list(range(EPOCHS)), (k, sorted(hist_b[k]))
        assert hist_b[k] == hist_a[k], k
