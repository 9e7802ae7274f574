"""The MLflow compare-view screenshot: a real `mlflow server` on 127.0.0.1 over the workspace's
sqlite store, rendered by headless Chromium (Debian's `chromium`, installed by .ci/run)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")),
                                 reason="no Chromium on PATH (.ci/run installs Debian's chromium)")]


def test_compare_view_screenshot_of_ablation_runs(tmp_path, monkeypatch):
    import mlflow
    from PIL import Image

    from medrl.mlflow_view import screenshot_compare

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.set_experiment("medrl-cxr")
    for i, v in enumerate(["full", "no_ace", "no_rlcf"]):
        with mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"rl_cxr[{v}]",
                              tags={"medrl.stage": "rl_cxr", "medrl.wildcards": v}):
            for step in range(3):
                mlflow.log_metric("reward_mean", 0.1 * i + 0.05 * step, step=step)
    with mlflow.start_run(experiment_id=exp.experiment_id, tags={"medrl.stage": "other"}):
        mlflow.log_metric("x", 1.0)
    out = tmp_path / "shots" / "compare.png"
    dom_path = tmp_path / "shots" / "compare.html"
    run_ids = screenshot_compare(tmp_path, "cxr", "rl_cxr", out, width=1200, height=900, dom_out=dom_path)
    assert len(run_ids) == 3  # only that stage's runs are compared
    img = np.asarray(Image.open(out).convert("L"), dtype=np.float32)
    assert img.shape == (900, 1200)
    # a rendered page (text, tables, chart), not a blank or single-colour frame
    assert img.std() > 10 and (img < 128).mean() > 0.005
    # ... and it is the compare view of these runs, not an error page: the same view's rendered DOM
    # shows the three run names and the logged metric (neither is in the URL or in an error page)
    dom = dom_path.read_text()
    for name in ("rl_cxr[full]", "rl_cxr[no_ace]", "rl_cxr[no_rlcf]", "reward_mean"):
        assert name in dom, f"{name!r} not in the rendered compare view ({len(dom)} chars of DOM)"
    with pytest.raises(Exception, match="no finished runs"):
        screenshot_compare(tmp_path, "cxr", "metrics_cxr", out)
