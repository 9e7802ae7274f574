"""Issue 17 item 7: CXR evaluation defects, through ``evaluate_cxr_samples`` itself with the
models stubbed (each image's scores are functions of its mean intensity).

(a) CXR FID always uses the CXR DenseNet features, even with ``metrics.inception_weights`` set;
(b) CIs resample reports (clusters), not images: duplicated images of one report give exactly
    the CI of one image per report;
(c) AUROC reads unmentioned labels as negatives, as the diagnostic model is trained.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from medrl.data.reports import PATHOLOGIES
from medrl.metrics.auroc import per_class_auroc

K = 12  # reports
DIAG = nn.Identity()


def _png(path: Path, v: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), int(round(v * 255)), np.uint8), "L").save(path)


def _intensity(x: torch.Tensor) -> torch.Tensor:
    return x.float().mean(dim=tuple(range(1, x.ndim)))


@pytest.fixture
def stubs(monkeypatch):
    import medrl.metrics.fidelity as fd
    import medrl.metrics.msssim as ms
    import medrl.models.dual_encoder as de
    import medrl.models.posture as po
    import medrl.models.xrv_diag as xd
    import medrl.rewards.align as al

    calls = []

    def fake_fid_kid(real, fake, **kw):
        calls.append(kw)
        m = {"value": 1.0, "lo": 0.5, "hi": 1.5, "n": len(fake)}
        return {"fid_metric": m, "kid_metric": m, "feature_extractor": getattr(kw["extractor"], "name", "?")}

    monkeypatch.setattr(po, "load_aligner", lambda d, device="cpu": None)
    monkeypatch.setattr(po, "predict_psi", lambda a, x: _intensity(x)[:, None].repeat(1, 5))
    monkeypatch.setattr(al, "align_reward", lambda psi: psi[:, 0])
    monkeypatch.setattr(xd, "load_diag", lambda d, device="cpu": DIAG)
    monkeypatch.setattr(xd, "predict_probs", lambda m, x: _intensity(x)[:, None].repeat(1, len(PATHOLOGIES)))
    monkeypatch.setattr(de, "load_dual_encoder", lambda d, device="cpu": None)
    monkeypatch.setattr(de, "embed_images", lambda m, x: _intensity(x)[:, None])
    monkeypatch.setattr(de, "embed_texts", lambda m, t: torch.ones(len(t), 1))
    monkeypatch.setattr(fd, "fid_kid", fake_fid_kid)
    monkeypatch.setattr(ms, "msssim_within_groups",
                        lambda groups, **kw: (pd.DataFrame(), {"value": 1.0, "lo": 1.0, "hi": 1.0, "n": len(groups)}))
    return calls


# class 0: positives score high, unmentioned (NaN) mid, negatives low -> with NaN ignored AUROC = 1,
# with NaN as negative the positives only beat part of the NaN reports
LABEL0 = [0, 0, 0, np.nan, np.nan, 1, np.nan, 1, np.nan, 1, -1, 1]


def _evaluate(root: Path, per_report: int, *, metrics_extra: dict | None = None) -> dict:
    from medrl.io import read_json
    from medrl.metrics.cxr_eval import evaluate_cxr_samples

    rows, manifest = [], []
    for k in range(K):
        v = 0.1 + 0.8 * k / (K - 1)
        rid = f"r{k:02d}"
        _png(root / "real" / f"{rid}.png", v)
        labels = {c: (LABEL0[k] if i == 0 else np.nan) for i, c in enumerate(PATHOLOGIES)}
        rows.append({"image": rid, "split": "test", "impression": f"report {k}", "path": str(root / "real" / f"{rid}.png"),
                     **labels})
        for j in range(per_report):  # the images of one report are perfectly correlated
            p = root / "samples" / rid / f"{j:04d}.png"
            _png(p, v)
            manifest.append({"prompt_id": rid, "prompt": f"report {k}", "seed": j, "model": "m", "path": str(p)})
    (root / "prepared").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "prepared" / "pairs.csv", index=False)
    pd.DataFrame(manifest).to_csv(root / "samples" / "manifest.csv", index=False)
    metrics = {"bootstrap": 300, "ci": 0.9, "seed": 3, "kid_subset_size": 2, "inception_weights": None,
               **(metrics_extra or {})}
    evaluate_cxr_samples(root / "samples", root / "prepared", root, root, root, root / "out", metrics=metrics)
    return read_json(root / "out" / "metrics.json")


def test_cxr_fid_uses_densenet_features_even_with_inception_weights(stubs, tmp_path):
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"not used")
    _evaluate(tmp_path / "a", 2, metrics_extra={"inception_weights": str(weights)})
    (kw,) = stubs
    assert getattr(kw["extractor"], "module", None) is DIAG, f"CXR FID extractor: {kw['extractor']!r}"
    assert "DenseNet" in kw["extractor"].name
    assert kw.get("weights_path") is None


def test_cxr_cis_resample_reports_not_images(stubs, tmp_path):
    dup = _evaluate(tmp_path / "dup", 2)
    one = _evaluate(tmp_path / "one", 1)
    assert dup["n_images"] == 2 * K and one["n_images"] == K
    for key in ("r_align", "similarity", "positive_rate"):
        assert dup[key]["value"] == pytest.approx(one[key]["value"])
        # with images resampled independently, the duplicated set's CI would be ~1/sqrt(2) as wide
        assert (dup[key]["lo"], dup[key]["hi"]) == pytest.approx((one[key]["lo"], one[key]["hi"]), abs=1e-12), key
    assert (dup["auroc"]["avg"]["lo"], dup["auroc"]["avg"]["hi"]) == pytest.approx(
        (one["auroc"]["avg"]["lo"], one["auroc"]["avg"]["hi"]), abs=1e-12)


def test_cluster_bootstrap_unequal_cluster_sizes():
    from medrl.metrics.bootstrap import boot_counts, boot_indices, bootstrap_ci

    clusters = ["a", "a", "a", "b", "c", "c"]
    idx = boot_indices(6, n_boot=50, seed=1, clusters=clusters)
    counts = boot_counts(6, n_boot=50, seed=1, clusters=clusters)
    for b, rows in enumerate(idx):  # whole clusters only, and the same draws both ways
        got = np.bincount(rows, minlength=6)
        assert got[0] == got[1] == got[2] and got[4] == got[5]
        assert (got == counts[b]).all()
    x = np.array([1.0, 1.0, 1.0, 5.0, 3.0, 3.0])
    m = bootstrap_ci(x, n_boot=50, ci=0.9, seed=1, clusters=clusters, keep_boot=True)
    assert m["boot"] == pytest.approx([float(x[r].mean()) for r in idx])


def test_cxr_auroc_counts_unmentioned_as_negative_like_diag_training(stubs, tmp_path):
    from medrl.models.xrv_diag import label_targets

    m = _evaluate(tmp_path / "a", 2)
    v = np.repeat(0.1 + 0.8 * np.arange(K) / (K - 1), 2)
    y = np.repeat(np.array(LABEL0, dtype=float), 2)
    # the diag model's training reading of the same labels: target, and which rows count
    target, mask = label_targets(y[:, None])  # train_diag's reading (the default: NaN negative)
    keep = mask[:, 0].bool().numpy()
    from sklearn.metrics import roc_auc_score

    expected = roc_auc_score(target[keep, 0].numpy(), v[keep])
    assert expected < 1.0  # differs from the NaN-ignored reading (= 1.0 here)
    assert per_class_auroc(y[:, None], v[:, None], ["c"])["c"] == 1.0
    assert m["auroc"][PATHOLOGIES[0]]["value"] == pytest.approx(expected)
    assert m["auroc"][PATHOLOGIES[0]]["n"] == int(keep.sum())
    from medrl.models.xrv_diag import TRAIN_UNMENTIONED

    assert m["auroc_unmentioned"] == TRAIN_UNMENTIONED == "negative"
