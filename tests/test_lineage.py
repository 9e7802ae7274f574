"""MLflow lineage of real stage runs, against the default sqlite store and a real `mlflow server`.

The CXR data stages (download_cxr -> tokenizer_cxr -> prepare_cxr) run through
workflow/entry.py in a small workspace with fake credentials in the environment; then:
every run is in MLflow with input/output content hashes that match the files, `medrl lineage`
walks from a file inside data/prepared/cxr back to the phantom generator's params, and the
credentials appear nowhere in MLflow (params, tags, artifacts, nor the store's raw bytes).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from medrl_testutil import REPO, VENV_BIN, engine_env, mlflow_stage_runs, run
from test_hashes import independent_hash  # hashlib over the bytes, not medrl.io.hash_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STAGES = ("download_cxr", "tokenizer_cxr", "prepare_cxr")
SECRET = "pn-Sup3rSecret-7c1e9b"  # fake PhysioNet password: must never reach MLflow
URI_SECRET = "uri-Secret-94d2"  # fake password inside the tracking URI
MEDRL = str(VENV_BIN / "medrl")


class Tracked:
    def __init__(self, ws: Path, uri: str, env: dict[str, str], store_files: list[Path]):
        self.ws, self.uri, self.env, self.store_files = ws, uri, env, store_files


@pytest.fixture(scope="module", params=["sqlite", "server"])
def tracked(request, workspace_factory, tmp_path_factory) -> Tracked:
    ws = workspace_factory(f"lineage-{request.param}", dvc=False)
    env = engine_env(ws, PHYSIONET_USERNAME="medrl-test-user", PHYSIONET_PASSWORD=SECRET)
    if request.param == "server":
        server = request.getfixturevalue("mlflow_server")
        # credentials in the URI (basic auth, ignored by a server without auth) must not be logged
        env["MLFLOW_TRACKING_URI"] = server.uri.replace("http://", f"http://medrl:{URI_SECRET}@")
        query_uri, store_files = server.uri, [server.root]
    else:
        query_uri, store_files = f"sqlite:///{ws / 'mlflow.db'}", [ws / "mlflow.db", ws / "mlartifacts"]
    for stage in STAGES:
        run([str(VENV_BIN / "python"), "workflow/entry.py", stage], ws, env, timeout=600)
    if request.param == "sqlite":
        assert (ws / "mlflow.db").is_file(), "default store is <workspace>/mlflow.db"
    return Tracked(ws, query_uri, env, store_files)


def _runs(t: Tracked) -> dict[str, object]:
    runs = [r for r in mlflow_stage_runs(t.uri) if r.data.tags.get("medrl.stage") in STAGES]
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags["medrl.stage"], []).append(r)
    assert {s: len(v) for s, v in by_stage.items()} == {s: 1 for s in STAGES}
    return {s: v[0] for s, v in by_stage.items()}


def _expected_params_hash(ws: Path, stage: str) -> str:
    """sha256 (first 16 hex) of the stage's declared params as sorted JSON, from params.yaml."""
    import hashlib
    import sys

    from medrl.config import load_params

    sys.path.insert(0, str(REPO / "workflow"))
    from graph import STAGES

    dumped = load_params(ws / "params.yaml").model_dump()
    values = {}
    for key in STAGES[stage].params:
        node = dumped
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_every_stage_run_has_hashes(tracked):
    runs = _runs(tracked)
    params = yaml.safe_load((tracked.ws / "params.yaml").read_text())
    for stage, r in runs.items():
        t = r.data.tags
        assert r.info.status == "FINISHED"
        assert t["medrl.track"] == "cxr" and t["medrl.wildcards"] == "{}"
        assert t["medrl.git_commit"]
        assert t["medrl.params_hash"] == _expected_params_hash(tracked.ws, stage), stage
        outputs = json.loads(t["medrl.outputs"])
        assert outputs, stage
        for path, digest in outputs.items():
            assert digest == independent_hash(tracked.ws / path), f"{stage}: recorded hash of {path} is not the file's"
        for path, digest in json.loads(t["medrl.inputs"]).items():
            assert digest == independent_hash(tracked.ws / path)
        assert "stage_seconds" in r.data.metrics
    # the chain is linked by content: prepare_cxr consumed exactly what the upstream runs wrote
    prep_in = json.loads(runs["prepare_cxr"].data.tags["medrl.inputs"])
    dl_out = json.loads(runs["download_cxr"].data.tags["medrl.outputs"])
    assert prep_in["data/datasets/cxr"] == dl_out["data/datasets/cxr"]
    assert (prep_in["data/models/cxr/tokenizer"]
            == json.loads(runs["tokenizer_cxr"].data.tags["medrl.outputs"])["data/models/cxr/tokenizer"])
    # declared params, flattened with dots, equal params.yaml
    dl = runs["download_cxr"].data.params
    assert dl["cxr.source"] == "phantom"
    for k, v in params["cxr"]["phantom"].items():
        assert dl[f"cxr.phantom.{k}"] == str(v)
    assert runs["prepare_cxr"].data.params["cxr.prepare.n_train"] == str(params["cxr"]["prepare"]["n_train"])


def test_lineage_cli_walks_back_to_phantom_params(tracked):
    target = next(p for p in sorted((tracked.ws / "data/prepared/cxr").rglob("*")) if p.is_file())
    rel = target.relative_to(tracked.ws).as_posix()
    text = run([MEDRL, "lineage", rel], tracked.ws, tracked.env, timeout=300)
    out = text.stdout
    for stage in STAGES:
        assert f"produced by stage {stage}" in out, out
    assert "STALE" not in out
    seed = yaml.safe_load((tracked.ws / "params.yaml").read_text())["cxr"]["phantom"]["seed"]
    assert f"param cxr.phantom.seed = {seed}" in out, out

    chain = json.loads(run([MEDRL, "lineage", rel, "--json"], tracked.ws, tracked.env, timeout=300).stdout)
    assert chain[0]["stage"] == "prepare_cxr" and chain[0]["output"] == "data/prepared/cxr" and chain[0]["depth"] == 0
    assert all(e["current"] for e in chain)
    depth1 = {e["stage"] for e in chain if e["depth"] == 1}
    assert depth1 == {"download_cxr", "tokenizer_cxr"}
    sources = [e for e in chain if e["stage"] == "download_cxr"]
    assert sources and all(e["params"]["cxr.phantom.seed"] == str(seed) for e in sources)
    assert all(e["inputs"] == {} for e in sources)  # the generator is where the chain ends

    # run from elsewhere with --workspace: same answer
    other = run([MEDRL, "lineage", str(target), "--workspace", str(tracked.ws), "--json"], tracked.ws.parent,
                tracked.env, timeout=300)
    assert [e["run_id"] for e in json.loads(other.stdout)] == [e["run_id"] for e in chain]


def test_lineage_flags_changed_files_and_unknown_paths(tracked, tmp_path):
    target = tracked.ws / "data/prepared/cxr/pairs.csv"
    backup = tmp_path / "pairs.csv"
    shutil.copy2(target, backup)
    try:
        with target.open("a") as f:
            f.write("\n")
        out = run([MEDRL, "lineage", "data/prepared/cxr/pairs.csv"], tracked.ws, tracked.env, timeout=300).stdout
        first = out.splitlines()[0]
        assert "STALE" in first, out
    finally:
        shutil.copy2(backup, target)
    unknown = run([MEDRL, "lineage", "data/nothing/here.csv"], tracked.ws, tracked.env, timeout=300, check=False)
    assert unknown.returncode == 1
    assert "no recorded producer" in unknown.stdout and "no finished stage run" in unknown.stderr
    assert URI_SECRET not in unknown.stderr + unknown.stdout


def test_credentials_never_reach_mlflow(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked.uri)
    seen: list[str] = []
    for exp in client.search_experiments():
        seen += [exp.name, exp.artifact_location, json.dumps(exp.tags)]
    for r in mlflow_stage_runs(tracked.uri):
        seen += [json.dumps(r.data.params), json.dumps(r.data.tags), r.info.artifact_uri or ""]
        dest = tmp_path / r.info.run_id
        dest.mkdir()
        local = Path(client.download_artifacts(r.info.run_id, "", str(dest)))
        files = [p for p in local.rglob("*") if p.is_file()]
        if r.data.tags["medrl.stage"] == "prepare_cxr":
            assert any(p.name == "pairs.csv" for p in files), files  # small outputs are logged as artifacts
        seen += [p.read_bytes().decode("utf-8", "replace") for p in files]
    blob = "\n".join(seen)
    assert "medrl-cxr" in blob  # the scan saw real content
    for secret in (SECRET, URI_SECRET):
        assert secret not in blob
    # and the raw bytes of the store itself (sqlite file, artifact directory)
    for root in tracked.store_files:
        for p in ([root] if root.is_file() else [q for q in root.rglob("*") if q.is_file()]):
            data = p.read_bytes()
            assert SECRET.encode() not in data and URI_SECRET.encode() not in data, p


def test_terminated_stage_is_killed_in_mlflow_and_promotes_nothing(workspace_factory):
    """SIGTERM (what Snakemake, DVC and scancel send) mid-stage: the run is closed as KILLED,
    not left RUNNING, and the temp output never replaces the final path."""
    import signal
    import subprocess
    import time

    import mlflow

    from medrl_testutil import VENV_BIN, engine_env

    ws = workspace_factory("term", {"isic": {"phantom": {"n_images": 100000}}}, dvc=False)
    env = engine_env(ws, MLFLOW_TRACKING_URI=f"sqlite:///{ws / 'mlflow.db'}")
    proc = subprocess.Popen([str(VENV_BIN / "python"), "workflow/entry.py", "download_isic"], cwd=ws, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = mlflow.tracking.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp_ids = lambda: [e.experiment_id for e in client.search_experiments()]  # noqa: E731
    deadline = time.time() + 300
    while not client.search_runs(exp_ids(), filter_string="attributes.status = 'RUNNING'"):  # the stage is under way
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    runs = client.search_runs(exp_ids(), filter_string="tags.`medrl.stage` = 'download_isic'")
    assert [r.info.status for r in runs] == ["KILLED"]
    assert not (ws / "data/datasets/isic").exists()
