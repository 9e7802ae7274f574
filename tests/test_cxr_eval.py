"""Issue 17 item 7: CXR evaluation defects, through ``evaluate_cxr_samples`` itself with the
models stubbed (each image's scores are functions of its mean intensity).

(a) CXR FID always uses the CXR DenseNet features, even with ``metrics.inception_weights`` set;
(b) CIs resample reports (clusters), not images: duplicated images of one report give exactly
    the CI of one image per report;
(c) AUROC reads unmentioned labels as negatives, as the diagnostic model is trained;
(d) issue 21: every judged metric comes twice, from the reward nets and (``eval_*``) from the
    independent evaluators, with each judge's accuracy on the held-out real test pairs.
"""
from __future__ import annotations

import json
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
DIAG_EVAL = nn.Identity()
EVAL = "evaluator"  # the name of the evaluators' directory: the stubs below score with 1 - intensity there


def _is_eval(model) -> bool:
    return model is DIAG_EVAL or Path(str(model)).name == EVAL


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

    def score(model, x):  # the reward judge: the image's intensity; the evaluator: 1 - intensity
        v = _intensity(x)
        return 1.0 - v if _is_eval(model) else v

    monkeypatch.setattr(po, "load_aligner", lambda d, device="cpu": str(d))
    monkeypatch.setattr(po, "predict_psi", lambda a, x: score(a, x)[:, None].repeat(1, 5))
    monkeypatch.setattr(al, "align_reward", lambda psi: psi[:, 0])
    monkeypatch.setattr(xd, "load_diag", lambda d, device="cpu": DIAG_EVAL if Path(d).name == EVAL else DIAG)
    monkeypatch.setattr(xd, "predict_probs", lambda m, x: score(m, x)[:, None].repeat(1, len(PATHOLOGIES)))
    monkeypatch.setattr(de, "load_dual_encoder", lambda d, device="cpu": str(d))
    monkeypatch.setattr(de, "embed_images", lambda m, x: score(m, x)[:, None])
    monkeypatch.setattr(de, "embed_texts", lambda m, t: torch.ones(len(t), 1))
    monkeypatch.setattr(fd, "fid_kid", fake_fid_kid)
    monkeypatch.setattr(ms, "msssim_within_groups",
                        lambda groups, **kw: (pd.DataFrame(), {"value": 1.0, "lo": 1.0, "hi": 1.0, "n": len(groups)}))
    return calls


# class 0: positives score high, unmentioned (NaN) mid, negatives low -> with NaN ignored AUROC = 1,
# with NaN as negative the positives only beat part of the NaN reports
LABEL0 = [0, 0, 0, np.nan, np.nan, 1, np.nan, 1, np.nan, 1, -1, 1]


def _evaluate(root: Path, per_report: int, *, metrics_extra: dict | None = None,
              independent: dict | None = None, split=lambda k: "test", sampled=lambda k: True,
              stack_dir: Path | None = None, planted: dict | None = None) -> dict:
    from medrl.io import read_json
    from medrl.metrics.cxr_eval import evaluate_cxr_samples

    rows, manifest = [], []
    for k in range(K):
        v = 0.1 + 0.8 * k / (K - 1)
        rid = f"r{k:02d}"
        _png(root / "real" / f"{rid}.png", v)
        labels = {c: (LABEL0[k] if i == 0 else np.nan) for i, c in enumerate(PATHOLOGIES)}
        psi = {"sx": 1.0 + 0.01 * k, "sy": 1.0, "tx": 0.0, "ty": 0.0, "theta": 0.0}  # true posture (phantoms)
        gt = {f"gt_{c}": (1.0 if (i == 0 and k % 2) else 0.0) for i, c in enumerate(PATHOLOGIES)}  # exact findings
        rows.append({"image": rid, "split": split(k), "impression": f"report {k}", "path": str(root / "real" / f"{rid}.png"),
                     **labels, **psi, **gt})
        for j in range(per_report if sampled(k) else 0):  # the images of one report are perfectly correlated
            p = root / "samples" / rid / f"{j:04d}.png"
            _png(p, v)
            manifest.append({"prompt_id": rid, "prompt": f"report {k}", "seed": j, "model": "m", "path": str(p)})
    (root / "prepared").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "prepared" / "pairs.csv", index=False)
    if planted is not None:
        (root / "prepared" / "planted.json").write_text(json.dumps(planted))
    pd.DataFrame(manifest).to_csv(root / "samples" / "manifest.csv", index=False)
    metrics = {"bootstrap": 300, "ci": 0.9, "seed": 3, "kid_subset_size": 2, "inception_weights": None,
               **(metrics_extra or {})}
    ev = root / EVAL
    evaluate_cxr_samples(root / "samples", root / "prepared", root, root, root, root / "out", metrics=metrics,
                         evaluators={"aligner": ev, "diag": ev, "dualenc": ev}, independent=independent,
                         stack_dir=stack_dir)
    return read_json(root / "out" / "metrics.json")


def test_cxr_fid_uses_densenet_features_even_with_inception_weights(stubs, tmp_path):
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"not used")
    _evaluate(tmp_path / "a", 2, metrics_extra={"inception_weights": str(weights)})
    reward, evaluator = stubs  # one FID per judge, each on its own DenseNet's features
    assert getattr(reward["extractor"], "module", None) is DIAG, f"CXR FID extractor: {reward['extractor']!r}"
    assert getattr(evaluator["extractor"], "module", None) is DIAG_EVAL
    for kw in stubs:
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


def test_every_judged_metric_comes_from_both_judges(stubs, tmp_path):
    """The reward nets' numbers keep their keys (the paper's protocol); the evaluators' are the same
    metrics under eval_*, computed by the evaluator networks (here: 1 - intensity), paired with
    the reward judge's (same reports, same bootstrap draws)."""
    from medrl.metrics.bootstrap import diff_from_boot
    from medrl.metrics.cxr_eval import JUDGED_KEYS

    m = _evaluate(tmp_path / "a", 2)
    v = np.round((0.1 + 0.8 * np.arange(K) / (K - 1)) * 255) / 255  # as the PNGs store it
    for key in JUDGED_KEYS:
        if key != "reward":  # only a variant's metrics (with weights) carry the combined reward
            assert key in m and f"eval_{key}" in m, key
    assert m["r_align"]["value"] == pytest.approx(v.mean())
    assert m["eval_r_align"]["value"] == pytest.approx((1 - v).mean())
    assert m["eval_similarity"]["value"] == pytest.approx((1 - v).mean())
    # the evaluator ranks the positives of class 0 last: its AUROC mirrors the reward judge's
    c0 = PATHOLOGIES[0]
    assert m["eval_auroc"][c0]["value"] == pytest.approx(1 - m["auroc"][c0]["value"])
    assert m["eval_r_align"]["boot_key"] == m["r_align"]["boot_key"]
    assert diff_from_boot(m["eval_r_align"], m["r_align"])["value"] == pytest.approx((1 - 2 * v).mean(), abs=1e-6)
    per_image = pd.read_csv(tmp_path / "a" / "out" / "per_image.csv")
    assert {"r_align", "eval_r_align", "similarity", "eval_similarity", "r_diag", "eval_r_diag"} <= set(per_image)


def test_each_judge_is_scored_on_the_held_out_real_pairs(stubs, tmp_path):
    m = _evaluate(tmp_path / "a", 1, independent={"diag": False})
    judges = m["judges"]
    assert set(judges) == {"reward", "eval"} and set(judges["eval"]) == {"aligner", "diag", "dualenc"}
    assert [judges["eval"][n]["independent"] for n in ("aligner", "diag", "dualenc")] == [True, False, True]
    assert not any(judges["reward"][n]["independent"] for n in judges["reward"])
    # posture: against the exact psi of the test phantoms
    assert judges["reward"]["aligner"]["reference"] == "exact posture psi"
    assert judges["reward"]["aligner"]["psi"]["n"] == K
    assert judges["reward"]["aligner"]["psi"]["psi_mae_sx"] != judges["eval"]["aligner"]["psi"]["psi_mae_sx"]
    # findings: against the exact labels gt_*, not the report labels (class 0: odd reports are positive)
    v = 0.1 + 0.8 * np.arange(K) / (K - 1)
    from sklearn.metrics import roc_auc_score

    gt0 = (np.arange(K) % 2).astype(float)
    assert judges["reward"]["diag"]["reference"] == "exact labels (gt_*)"
    assert judges["reward"]["diag"]["auroc"][PATHOLOGIES[0]] == pytest.approx(roc_auc_score(gt0, v))
    assert judges["eval"]["diag"]["auroc"][PATHOLOGIES[0]] == pytest.approx(roc_auc_score(gt0, 1 - v))
    # image-report retrieval on the real test pairs
    assert judges["eval"]["dualenc"]["n"] == K and "i2t_recall@1" in judges["eval"]["dualenc"]


def test_the_vae_ceiling_judges_real_test_images_before_and_after_a_vae_round_trip(stubs, tmp_path):
    """Issue 21 item 2 (CXR): with the stack given, each diagnostic judge scores the held-out real
    images as they are and after the stack's VAE (encode, mode, decode), per finding."""
    from sklearn.metrics import roc_auc_score

    from medrl.bench import tiny_stack
    from medrl.diffusion.stack import load_vae

    stack = tiny_stack(tmp_path / "stack", size=16)
    m = _evaluate(tmp_path / "a", 1, stack_dir=stack)
    vc, c0 = m["vae_ceiling"], PATHOLOGIES[0]
    assert vc["n_images"] == K and set(vc) == {"n_images", "reward", "eval"}
    gt0 = (np.arange(K) % 2).astype(bool)
    v = 0.1 + 0.8 * np.arange(K) / (K - 1)
    # real images, read as the samples are (report labels): here the samples are the real images
    assert vc["reward"]["real"]["auroc"][c0] == pytest.approx(m["auroc"][c0]["value"])
    assert vc["eval"]["real"]["auroc"][c0] == pytest.approx(m["eval_auroc"][c0]["value"])
    # and against the exact labels: what the judges' accuracy saw
    assert vc["reward"]["real"]["auroc_exact"][c0] == pytest.approx(m["judges"]["reward"]["diag"]["auroc"][c0])
    assert vc["eval"]["real"]["auroc_exact"][c0] == pytest.approx(roc_auc_score(gt0, 1 - v))
    assert vc["reward"]["real"]["recall"][c0] == pytest.approx((v[gt0] >= 0.5).mean())
    assert vc["reward"]["real"]["false_rate"][c0] == pytest.approx((v[~gt0] >= 0.5).mean())
    # round trips: the stub's score (mean intensity) of the decoded images
    vae = load_vae(str(stack))
    x = torch.stack([torch.from_numpy(np.full((3, 8, 8), round(t * 255) / 255 * 2 - 1, np.float32)) for t in v])
    with torch.no_grad():
        rt = ((vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2).mean(dim=(1, 2, 3))
    assert vc["reward"]["vae_roundtrip"]["auroc_exact"][c0] == pytest.approx(roc_auc_score(gt0, rt.numpy()), abs=1e-6)
    assert "vae_ceiling" not in _evaluate(tmp_path / "b", 1)


def test_evaluators_are_required(stubs, tmp_path):
    from medrl.errors import DataError
    from medrl.metrics.cxr_eval import evaluate_cxr_samples

    with pytest.raises(DataError, match="independent"):
        evaluate_cxr_samples(tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path / "out",
                             evaluators={"aligner": tmp_path}, metrics={"bootstrap": 10, "ci": 0.9, "seed": 0})


def test_validation_samples_are_judged_against_the_validation_pairs(stubs, tmp_path):
    """generate.split: validation samples the validate reports; FID's real images and the judges'
    accuracy then come from those pairs, and the metrics say which split they were."""
    half = lambda k: "test" if k < K // 2 else "validate"  # noqa: E731
    m = _evaluate(tmp_path / "v", 2, split=half, sampled=lambda k: k >= K // 2)
    assert m["held_out_split"] == "validate" and m["n_reports"] == K // 2
    assert m["judges"]["eval"]["aligner"]["psi"]["n"] == K // 2
    assert _evaluate(tmp_path / "t", 2, split=half, sampled=lambda k: k < K // 2)["held_out_split"] == "test"


def test_samples_must_come_from_one_held_out_split(stubs, tmp_path):
    from medrl.errors import DataError

    half = lambda k: "test" if k < K // 2 else "validate"  # noqa: E731
    with pytest.raises(DataError, match="one held-out split"):
        _evaluate(tmp_path / "m", 1, split=half)


def test_the_planted_finding_is_rated_where_reports_state_it_and_where_not(stubs, tmp_path):
    """Class 0 is stated by reports 5, 7, 9, 11 (LABEL0); the reward judge fires where the image's
    intensity is >= 0.5 (reports 6-11), the evaluator where it is <= 0.5 (reports 0-5)."""
    plain = _evaluate(tmp_path / "plain", 2)
    assert "planted" not in plain and "planted" not in plain.get("vae_ceiling", {})
    m = _evaluate(tmp_path / "planted", 2, planted={"finding": PATHOLOGIES[0], "overclaim": 0.5})
    assert m["planted"]["planted"]["finding"] == PATHOLOGIES[0]
    assert m["planted"]["rate"]["value"] == pytest.approx(1 / 4) and m["planted"]["rate"]["n"] == 8
    assert m["planted"]["false_rate"]["value"] == pytest.approx(5 / 8)
    assert m["planted_reward_judge"]["rate"]["value"] == pytest.approx(3 / 4)
    assert m["planted_reward_judge"]["false_rate"]["value"] == pytest.approx(3 / 8)
    one = _evaluate(tmp_path / "one", 1, planted={"finding": PATHOLOGIES[0], "overclaim": 0.5})
    # whole reports are resampled: two identical images per report give the CI of one
    assert (m["planted"]["rate"]["lo"], m["planted"]["rate"]["hi"]) == pytest.approx(
        (one["planted"]["rate"]["lo"], one["planted"]["rate"]["hi"]))
    assert m["planted"]["rate"]["boot_key"] and len(m["planted"]["rate"]["boot"]) == 300
