"""Lineage before promotion (issue 17, item 3): workflow/entry.py records a stage's output hashes
in MLflow before it renames the temp outputs into place, retries a locked sqlite store, and
never leaves a run RUNNING.

The stage (download_isic on the small params, seconds) runs in-process through
``entry.run_stage`` so a lock or a failure can be injected at the lineage write.
"""
from __future__ import annotations

import importlib.util
import json
import sqlite3
import threading
import time

import pytest

from medrl.io import hash_path
from medrl_testutil import REPO

pytestmark = pytest.mark.timeout(600)

STAGE, OUT = "download_isic", "data/datasets/isic"
LOCKED = "(sqlite3.OperationalError) database is locked"


def _entry():
    spec = importlib.util.spec_from_file_location("medrl_entry_under_test", REPO / "workflow" / "entry.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(ws):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments() if e.name.startswith("medrl-")]
    return client.search_runs(exps, filter_string=f"tags.`medrl.stage` = '{STAGE}'")


@pytest.fixture
def ws(workspace_factory, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the workspace's own mlflow.db
    return workspace_factory("lockws", dvc=False)


def test_transient_lock_on_lineage_write_is_retried(ws, monkeypatch):
    """The store is "locked" for the first two writes of medrl.outputs: retried, the stage
    succeeds and its output is promoted with its hash recorded."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MEDRL_MLFLOW_RETRY_S", "30")
    original = MlflowClient.set_tag
    failures = []

    def flaky(self, run_id, key, value, *a, **k):
        if key == "medrl.outputs" and len(failures) < 2:
            failures.append(key)
            raise MlflowException(LOCKED)
        return original(self, run_id, key, value, *a, **k)

    monkeypatch.setattr(MlflowClient, "set_tag", flaky)
    _entry().run_stage(STAGE, workspace=ws)
    assert len(failures) == 2
    assert (ws / OUT).is_dir()
    (run,) = _runs(ws)
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.tags["medrl.outputs"]) == {OUT: hash_path(ws / OUT)}


def test_lineage_write_failure_promotes_nothing_and_closes_the_run(ws, monkeypatch):
    """Another connection holds the sqlite store EXCLUSIVE past sqlite's busy timeout (20 s) and
    the retry budget (1 s) while the outputs are recorded: the stage fails, nothing is renamed
    into place, and the run ends FAILED (its close retries until the lock is gone), not RUNNING."""
    from medrl.lineage import StageRun

    monkeypatch.setenv("MEDRL_MLFLOW_RETRY_S", "1")
    held, done = threading.Event(), threading.Event()

    def hold_lock(seconds: float) -> None:
        con = sqlite3.connect(ws / "mlflow.db", isolation_level=None, timeout=60)
        try:
            con.execute("BEGIN EXCLUSIVE")
            held.set()
            time.sleep(seconds)
            con.execute("COMMIT")
        finally:
            con.close()
            done.set()

    original = StageRun.record_outputs

    def locked_record(self, *a, **k):
        threading.Thread(target=hold_lock, args=(24.0,), daemon=True).start()
        assert held.wait(30)
        return original(self, *a, **k)

    monkeypatch.setattr(StageRun, "record_outputs", locked_record)
    with pytest.raises(Exception, match="locked"):
        _entry().run_stage(STAGE, workspace=ws)
    assert done.wait(60)
    assert not (ws / OUT).exists(), "output promoted although its lineage was never recorded"
    (run,) = _runs(ws)
    assert run.info.status == "FAILED"
    assert "medrl.outputs" not in run.data.tags
