"""Secrets never leak (issue 17, item 2): every failure path a stage can hit with a password in
play (a tracking URI with user:password and the server down, a password in a base_url param, a
credentialed download over plain http, a PhysioNet project without SHA256SUMS.txt) fails with a
clear error, and the password is in none of stdout/stderr, MLflow params/tags, or the files the
run left in the workspace."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from httpserver import serve_directory
from medrl.redact import format_exception, redact, secrets_from_env
from medrl_testutil import VENV_BIN, engine_env, free_port, mlflow_stage_runs, run
from test_ingest_mimic import JPG, PASSWORD, USER, _serve_tree

URI_SECRET = "uri-Pw-5e3a91"  # inside MLFLOW_TRACKING_URI
PN_SECRET = PASSWORD  # PHYSIONET_PASSWORD
URL_SECRET = "url-Pw-7b20cc"  # inside a base_url param


def _stage(ws: Path, stage: str, **env: str):
    return run([str(VENV_BIN / "python"), "workflow/entry.py", stage], ws, engine_env(ws, **env), timeout=600,
               check=False)


def _assert_nowhere(ws: Path, proc, *secrets: str, skip: tuple[str, ...] = ("params.yaml",)) -> None:
    text = proc.stdout + proc.stderr
    for s in secrets:
        assert s not in text, f"secret printed:\n{text[-4000:]}"
    for p in ws.rglob("*"):
        if p.is_file() and p.name not in skip and ".git" not in p.relative_to(ws).parts:
            data = p.read_bytes()
            for s in secrets:
                assert s.encode() not in data, f"secret written to {p}"


def _assert_not_in_mlflow(ws: Path, *secrets: str) -> None:
    db = ws / "mlflow.db"
    if not db.exists():
        return
    for r in mlflow_stage_runs(f"sqlite:///{db}"):
        blob = json.dumps([r.data.params, r.data.tags, r.info.run_name])
        for s in secrets:
            assert s not in blob, f"secret in MLflow run {r.info.run_id}"


# ----------------------------------------------------------------------------- unit


def test_redact_masks_userinfo_and_env_secrets(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:{URI_SECRET}@mlflow.example:5000")
    monkeypatch.setenv("PHYSIONET_PASSWORD", PN_SECRET)
    assert set(secrets_from_env()) >= {URI_SECRET, PN_SECRET}
    msg = (f"API request to http://bob:{URI_SECRET}@mlflow.example:5000/api failed; "
           f"see https://x:{URL_SECRET}@h/p and token {PN_SECRET} (ftp://u@h)")
    out = redact(msg)
    assert URI_SECRET not in out and URL_SECRET not in out and PN_SECRET not in out
    assert "http://***@mlflow.example:5000/api" in out and "https://***@h/p" in out and "ftp://***@h" in out
    assert redact("https://physionet.org/files/x") == "https://physionet.org/files/x"
    try:
        try:
            raise ConnectionError(f"to http://bob:{URI_SECRET}@mlflow.example:5000")
        except ConnectionError as inner:
            raise RuntimeError(f"wrapped {PN_SECRET}") from inner
    except RuntimeError as e:
        tb = format_exception(e)
    assert "ConnectionError" in tb and "RuntimeError" in tb
    assert URI_SECRET not in tb and PN_SECRET not in tb


def test_credentials_only_over_https_or_loopback(tmp_path):
    from medrl.data.download import RedactedBasicAuth, fetch, is_loopback_host
    from medrl.errors import DataError

    assert all(map(is_loopback_host, ["127.0.0.1", "127.8.0.3", "localhost", "::1", "[::1]"]))
    assert not any(map(is_loopback_host, ["physionet.org", "10.0.0.1", "", None]))
    for url in ("http://physionet.invalid/files/x.csv", "ftp://physionet.invalid/x.csv"):
        with pytest.raises(DataError, match="refusing to send credentials") as err:
            fetch(url, tmp_path / "x.csv", known_hash=None, auth=RedactedBasicAuth(USER, PN_SECRET), progressbar=False)
        assert url in str(err.value) and PN_SECRET not in str(err.value)
    assert not (tmp_path / "x.csv").exists()


def test_file_not_listed_in_sha256sums_fails_closed(tmp_path, monkeypatch):
    from medrl.data.mimic import acquire_mimic
    from medrl.errors import DataError

    monkeypatch.setenv("PHYSIONET_USERNAME", USER)
    monkeypatch.setenv("PHYSIONET_PASSWORD", PN_SECRET)
    srv_root = _serve_tree(tmp_path)
    sums = srv_root / JPG / "SHA256SUMS.txt"
    sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if "split" not in line))
    with serve_directory(srv_root, auth=(USER, PN_SECRET)) as srv:
        with pytest.raises(DataError, match=r"mimic-cxr-2\.0\.0-split\.csv\.gz: not listed in .*verify_checksums"):
            acquire_mimic(tmp_path / "out", root=None, download=True, base_url=srv.url, cache_dir=str(tmp_path / "c"),
                          progressbar=False)
        assert not srv.hits("split.csv.gz")
        acquire_mimic(tmp_path / "out", root=None, download=True, base_url=srv.url, cache_dir=str(tmp_path / "c"),
                      progressbar=False, verify_checksums=False)
    assert (tmp_path / "out" / "metadata.csv").is_file()


# ----------------------------------------------------------------------------- stages


@pytest.mark.timeout(600)
def test_tracking_uri_password_not_printed_when_server_down(workspace_factory):
    ws = workspace_factory("secret-uri", dvc=False)
    proc = _stage(ws, "download_isic",
                  MLFLOW_TRACKING_URI=f"http://medrl:{URI_SECRET}@127.0.0.1:{free_port()}",  # nothing listens
                  MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10",
                  PHYSIONET_USERNAME=USER, PHYSIONET_PASSWORD=PN_SECRET)
    assert proc.returncode != 0
    assert "MlflowException" in proc.stderr and "http://***@127.0.0.1" in proc.stderr, proc.stderr[-3000:]
    _assert_nowhere(ws, proc, URI_SECRET, PN_SECRET)


@pytest.mark.timeout(600)
def test_password_in_base_url_is_rejected_not_logged(workspace_factory):
    # source stays phantom: the param was accepted and logged to MLflow with the stage's params
    ws = workspace_factory("secret-url", {"cxr": {"real": {"base_url": f"https://u:{URL_SECRET}@physionet.org/files"}}},
                           dvc=False)
    proc = _stage(ws, "download_cxr")
    assert proc.returncode != 0
    assert "cxr.real.base_url" in proc.stderr and "credentials" in proc.stderr, proc.stderr[-3000:]
    _assert_nowhere(ws, proc, URL_SECRET)
    _assert_not_in_mlflow(ws, URL_SECRET)
    check = run([str(VENV_BIN / "medrl"), "params-check", "params.yaml", "--no-paths"], ws, check=False)
    assert check.returncode == 2 and "cxr.real.base_url" in check.stderr
    assert URL_SECRET not in check.stdout + check.stderr


def _real_cxr(base_url: str, **real) -> dict:
    return {"cxr": {"source": "real", "real": {"download": True, "base_url": base_url, "cache_dir": "data/raw/mimic",
                                               **real}}}


@pytest.mark.timeout(600)
def test_credentialed_download_over_plain_http_is_refused(workspace_factory):
    ws = workspace_factory("secret-http", _real_cxr("http://physionet.invalid/files"), dvc=False)
    proc = _stage(ws, "download_cxr", PHYSIONET_USERNAME=USER, PHYSIONET_PASSWORD=PN_SECRET)
    assert proc.returncode != 0
    assert "refusing to send credentials to http://physionet.invalid/files" in proc.stderr, proc.stderr[-3000:]
    assert "https://" in proc.stderr
    _assert_nowhere(ws, proc, PN_SECRET)
    _assert_not_in_mlflow(ws, PN_SECRET)
    assert not (ws / "data/datasets/cxr").exists()


@pytest.mark.timeout(600)
def test_missing_sha256sums_fails_closed(workspace_factory, tmp_path):
    srv_root = _serve_tree(tmp_path)
    (srv_root / JPG / "SHA256SUMS.txt").unlink()
    with serve_directory(srv_root, auth=(USER, PN_SECRET)) as srv:
        ws = workspace_factory("secret-sums", _real_cxr(srv.url), dvc=False)
        proc = _stage(ws, "download_cxr", PHYSIONET_USERNAME=USER, PHYSIONET_PASSWORD=PN_SECRET)
        assert proc.returncode != 0
        assert "SHA256SUMS.txt: not found" in proc.stderr and "verify_checksums" in proc.stderr, proc.stderr[-3000:]
        assert not any(h.path.endswith((".csv.gz", ".jpg", ".zip")) for h in srv.log)  # nothing fetched unverified
        _assert_nowhere(ws, proc, PN_SECRET)
        _assert_not_in_mlflow(ws, PN_SECRET)
        runs = mlflow_stage_runs(f"sqlite:///{ws / 'mlflow.db'}")
        assert [r.info.status for r in runs] == ["FAILED"]
        assert runs[0].data.params["cxr.real.verify_checksums"] == "True"
        assert not (ws / "data/datasets/cxr").exists()

        # the explicit opt-out downloads unverified
        shutil.rmtree(ws / "data", ignore_errors=True)
        from medrl_testutil import set_param

        set_param(ws / "params.yaml", "cxr.real.verify_checksums", False)
        proc = _stage(ws, "download_cxr", PHYSIONET_USERNAME=USER, PHYSIONET_PASSWORD=PN_SECRET)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "not checksum-verified" in proc.stderr
        _assert_nowhere(ws, proc, PN_SECRET)
        _assert_not_in_mlflow(ws, PN_SECRET)


@pytest.mark.timeout(600)
def test_medrl_command_does_not_print_the_tracking_password(workspace_factory):
    """`medrl lineage` against a tracking server that is down: the failure is reported, redacted."""
    ws = workspace_factory("secret-cli", dvc=False)
    env = engine_env(ws, MLFLOW_TRACKING_URI=f"http://medrl:{URI_SECRET}@127.0.0.1:{free_port()}",
                     MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    proc = run([str(VENV_BIN / "medrl"), "lineage", "data/tables/cxr", "--workspace", str(ws)], ws, env,
               timeout=300, check=False)
    assert proc.returncode != 0
    assert "http://***@127.0.0.1" in proc.stderr, proc.stderr[-3000:]
    assert URI_SECRET not in proc.stdout + proc.stderr
