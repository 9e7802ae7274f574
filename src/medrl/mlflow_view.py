"""Screenshot of the MLflow UI's run-comparison view for the runs of one stage (e.g. the
CXRL ablations, stage ``rl_cxr`` or ``metrics_cxr``): a real ``mlflow server`` on 127.0.0.1
over the workspace's tracking store, rendered by headless Chromium.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from medrl.errors import DataError
from medrl.lineage import EXPERIMENT_PREFIX, tracking_uri

_CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--hide-scrollbars"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise DataError("no Chromium found on PATH; install Debian's `chromium` package")


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    runs = urllib.parse.quote(json.dumps(run_ids))
    exps = urllib.parse.quote(json.dumps([experiment_id]))
    return f"{base}/#/compare-runs?runs={runs}&experiments={exps}"


def screenshot_compare(workspace: Path, track: str, stage: str, out_png: Path, *, width: int = 1600,
                       height: int = 1400, wait_ms: int = 20000, dom_out: Path | None = None) -> list[str]:
    """Render the compare view of every finished run of ``stage`` in ``medrl-<track>``.

    ``dom_out``: also write the rendered page's DOM (Chromium ``--dump-dom`` of the same view),
    so what the screenshot shows (run names, metric names) can be checked as text."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(workspace)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"{EXPERIMENT_PREFIX}{track}")
    if exp is None:
        raise DataError(f"no MLflow experiment {EXPERIMENT_PREFIX}{track} in the tracking store; run the pipeline first")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`medrl.stage` = '{stage}' and attributes.status = 'FINISHED'")
    if not runs:
        raise DataError(f"no finished runs of stage {stage!r} in {exp.name}")
    run_ids = [r.info.run_id for r in runs]
    out_png = Path(out_png).resolve()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if uri.startswith(("http://", "https://")):  # already a server: render its own UI
        with tempfile.TemporaryDirectory() as tmp:
            _chromium_shot(uri.rstrip("/"), exp.experiment_id, run_ids, out_png, tmp, width, height, wait_ms, dom_out)
        return run_ids
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", uri, "--workers", "1"]
        server = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "MLFLOW_TRACKING_URI": ""})
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise DataError("mlflow server did not become healthy on 127.0.0.1")
                time.sleep(1)
            _chromium_shot(base, exp.experiment_id, run_ids, out_png, tmp, width, height, wait_ms, dom_out)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    return run_ids


def _chromium_shot(base: str, experiment_id: str, run_ids: list[str], out_png: Path, tmp: str, width: int,
                   height: int, wait_ms: int, dom_out: Path | None = None) -> None:
    out_png.unlink(missing_ok=True)
    args = [find_chromium(), *_CHROMIUM_FLAGS, f"--user-data-dir={tmp}/chrome", f"--window-size={width},{height}",
            f"--virtual-time-budget={wait_ms}"]
    url = compare_url(base, experiment_id, run_ids)
    subprocess.run([*args, f"--screenshot={out_png}", url], check=True, timeout=180, capture_output=True)
    if not out_png.is_file():
        raise DataError(f"{out_png}: Chromium wrote no screenshot")
    if dom_out is not None:
        dom = subprocess.run([*args, "--dump-dom", url], check=True, timeout=180, capture_output=True, text=True)
        Path(dom_out).parent.mkdir(parents=True, exist_ok=True)
        Path(dom_out).write_text(dom.stdout)
