"""Diagnostic model: xrv DenseNet construction, weight-file loading, class mapping, training."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchxrayvision as xrv
from safetensors.torch import save_file

from medrl.data.reports import PATHOLOGIES
from medrl.errors import DataError
from medrl.io import load_image, save_image
from medrl.models import xrv_diag
from medrl.models.xrv_diag import (
    build_diag,
    label_accuracy,
    label_targets,
    load_diag,
    predict_probs,
    save_diag,
    train_diag,
    xrv_normalize,
)


@pytest.fixture(autouse=True)
def _never_download(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torchxrayvision tried to fetch weights")

    monkeypatch.setattr(xrv.models, "get_weights", refuse)


def _released_name(key: str) -> str:
    return xrv.models.model_urls[key]["weights_url"].rsplit("/", 1)[-1]


def test_embedded_default_is_a_small_xrv_densenet121():
    m = build_diag(None, growth_rate=8, input_size=32)
    assert isinstance(m, xrv.models.DenseNet)
    assert m.pathologies == PATHOLOGIES and m.medrl_index == list(range(11))
    blocks = [sum(1 for n, _ in getattr(m.features, f"denseblock{i}").named_children()) for i in range(1, 5)]
    assert blocks == [6, 12, 24, 16]  # the DenseNet-121 layout is kept
    assert m.features.conv0.out_channels == 16 and m.features.conv0.in_channels == 1
    assert m.features.denseblock1.denselayer1.conv2.out_channels == 8


def test_xrv_normalisation_and_channel_handling():
    x = torch.rand(2, 1, 40, 40)
    z = xrv_normalize(x, 32)
    assert z.shape == (2, 1, 32, 32) and z.min() >= -1024 and z.max() <= 1024
    assert torch.allclose(xrv_normalize(torch.zeros(1, 1, 8, 8), None), torch.full((1, 1, 8, 8), -1024.0))
    assert torch.allclose(xrv_normalize(torch.ones(1, 1, 8, 8), None), torch.full((1, 1, 8, 8), 1024.0))
    m = build_diag(None, growth_rate=4, input_size=32)
    p1 = predict_probs(m, x)
    p3 = predict_probs(m, x.expand(-1, 3, -1, -1))
    assert p1.shape == (2, 11) and torch.allclose(p1, p3, atol=1e-6)


def test_loads_xrv_state_dict_with_released_name_and_maps_classes(tmp_path):
    torch.manual_seed(0)
    ref = xrv.models.DenseNet(weights=None, growth_rate=4, num_init_features=8)  # 18 xrv outputs
    path = tmp_path / _released_name("all")
    torch.save(ref.state_dict(), path)  # a weights_only-loadable state dict
    m = build_diag(path)
    assert m.medrl_input_size == 224 and m.pathologies == xrv.models.model_urls["all"]["labels"]
    # our 11 classes picked by name from xrv's 18 outputs
    assert [m.pathologies[i] for i in m.medrl_index] == PATHOLOGIES
    x = torch.rand(3, 3, 64, 64)
    got = predict_probs(m, x)
    # reference: xrv's own pipeline (gray, 224 px, [-1024, 1024], op_threshs rescaling)
    ref.op_threshs = torch.tensor(xrv.models.model_urls["all"]["op_threshs"], dtype=torch.float32)
    ref.eval()
    with torch.no_grad():
        z = torch.nn.functional.interpolate(x.mean(1, keepdim=True), size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        want = ref((2 * z - 1) * 1024)
    for j, c in enumerate(PATHOLOGIES):
        assert torch.allclose(got[:, j], want[:, xrv.models.model_urls["all"]["labels"].index(c)], atol=1e-5), c


def test_safetensors_metadata_order_and_round_trip(tmp_path):
    torch.manual_seed(1)
    names = list(reversed(PATHOLOGIES)) + ["Hernia"]
    ref = xrv.models.DenseNet(weights=None, growth_rate=4, num_init_features=8, num_classes=len(names))
    f = tmp_path / "custom.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(f),
              metadata={"pathologies": json.dumps(names), "input_resolution": "48"})
    m = build_diag(f)
    assert m.medrl_input_size == 48 and m.op_threshs is None
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        want = torch.sigmoid(ref.eval()((2 * x - 1) * 1024))
    got = predict_probs(m, x)
    for j, c in enumerate(PATHOLOGIES):
        assert torch.allclose(got[:, j], want[:, names.index(c)], atol=1e-5)
    save_diag(m, tmp_path / "dir")
    assert torch.allclose(predict_probs(load_diag(tmp_path / "dir"), x), got, atol=1e-6)


def test_bad_weight_files_are_data_errors(tmp_path):
    small = xrv.models.DenseNet(weights=None, growth_rate=4, num_init_features=8)
    nih = tmp_path / _released_name("nih")  # NIH weights do not predict Lung Lesion etc.
    torch.save(small.state_dict(), nih)
    with pytest.raises(DataError, match="does not predict"):
        build_diag(nih)
    pickled = tmp_path / "model.pt"
    torch.save(small, pickled)  # a whole pickled model, like the file xrv downloads
    with pytest.raises(DataError, match="weights_only"):
        build_diag(pickled)
    anon = tmp_path / "anon.pt"
    torch.save(small.state_dict(), anon)
    with pytest.raises(DataError, match="pathologies"):
        build_diag(anon)
    m = build_diag(anon, pathologies=xrv.datasets.default_pathologies)
    assert [m.pathologies[i] for i in m.medrl_index] == PATHOLOGIES


def test_label_policy():
    labels = np.array([[1, 0, -1, np.nan] + [np.nan] * 7], dtype=np.float32)
    target, mask = label_targets(labels)
    assert target[0, :4].tolist() == [1, 0, 0, 0] and mask[0, :4].tolist() == [1, 1, 0, 1]
    probs = torch.full((1, 11), 0.1)
    probs[0, 0] = 0.9  # right on the positive; every negative/unmentioned right; uncertain ignored
    assert float(label_accuracy(probs, labels)[0]) == 1.0
    probs[0, 1] = 0.9  # now wrong on one of the 10 compared classes
    assert float(label_accuracy(probs, labels)[0]) == pytest.approx(0.9)
    assert float(label_accuracy(probs, np.full((1, 11), -1.0))[0]) == 0.0


def test_label_accuracy_ignoring_unmentioned_does_not_pay_for_erased_findings():
    labels = np.array([[1, 0, -1] + [np.nan] * 8], dtype=np.float32)  # one positive, one negative stated
    blank = torch.full((1, 11), 0.1)  # an image the model reads as normal
    # unmentioned read as negative: 9 of the 10 compared classes right without showing the finding
    assert float(label_accuracy(blank, labels, unmentioned="negative")[0]) == pytest.approx(0.9)
    # stated classes only: half right
    assert float(label_accuracy(blank, labels, unmentioned="ignore")[0]) == pytest.approx(0.5)
    target, mask = label_targets(labels, "ignore")
    assert mask[0].tolist() == [1, 1] + [0] * 9
    shown = blank.clone()
    shown[0, 0] = 0.9
    assert float(label_accuracy(shown, labels, unmentioned="ignore")[0]) == 1.0
    with pytest.raises(ValueError, match="unmentioned"):
        label_targets(labels, "positive")


def test_finding_recall_counts_stated_positives_only():
    from medrl.models.xrv_diag import finding_recall

    labels = np.array([[1, 1, 0, -1] + [np.nan] * 7, [0] + [np.nan] * 10], dtype=np.float32)
    probs = np.full((2, 11), 0.9)
    probs[0, 1] = 0.1  # one of the two stated findings missed; predictions elsewhere do not count
    r = finding_recall(probs, labels)
    assert r[0] == pytest.approx(0.5) and np.isnan(r[1])  # image 2's report states no finding
    assert finding_recall(np.zeros((2, 11)), labels)[0] == 0.0  # an image read as normal


def _effusion_pairs(tmp_path) -> tuple[pd.DataFrame, int]:
    """Effusion = a bright lower band on every other image; everything else absent."""
    rng = np.random.default_rng(0)
    size, n = 32, 192
    rows = []
    for i in range(n):
        img = torch.from_numpy(rng.uniform(0.1, 0.4, (1, size, size)).astype(np.float32))
        eff = i % 2 == 0
        if eff:
            img[:, -10:, :] += 0.5
        p = tmp_path / "img" / f"{i}.png"
        save_image(img.clamp(0, 1), p)
        lab = {c: np.nan for c in PATHOLOGIES}
        lab["Effusion"] = 1.0 if eff else 0.0
        if i % 7 == 0:
            lab["Edema"] = -1.0  # uncertain: masked out of the loss
        rows.append({"image": str(i), "path": str(p), "split": "test" if i >= 160 else "train", **lab,
                     **{f"gt_{c}": (1.0 if (c == "Effusion" and eff) else 0.0) for c in PATHOLOGIES}})
    return pd.DataFrame(rows), size


def test_train_diag_learns_a_visible_pathology(tmp_path):
    """3 short epochs must find the effusion band."""
    pairs, size = _effusion_pairs(tmp_path)
    m = train_diag(pairs, tmp_path / "diag", size=size, epochs=3, batch_size=16, lr=3e-3, growth_rate=4, seed=0,
                   ckpt_dir=tmp_path / "ckpt")
    assert m["auroc_Effusion"] > 0.9 and m["auroc_gt_Effusion"] == m["auroc_Effusion"]
    assert np.isnan(m["auroc_Atelectasis"])  # no positives in test: undefined, not faked
    assert m["test_label_accuracy"] > 0.8
    model = load_diag(tmp_path / "diag")
    assert model.medrl_input_size == size and model.pathologies == PATHOLOGIES
    cfg = json.loads((tmp_path / "diag" / "config.json").read_text())
    assert cfg["arch"]["growth_rate"] == 4


def test_youden_thresholds_pick_each_class_operating_point():
    """The cut maximising TPR - FPR over the labelled images; masked images ignored; a class
    without positives keeps 0.5."""
    from medrl.models.xrv_diag import youden_thresholds

    probs = np.array([[0.05, 0.9], [0.10, 0.8], [0.20, 0.1], [0.30, 0.2], [0.90, 0.3]], dtype=np.float32)
    targets = np.array([[0, 0], [0, 0], [1, 0], [1, 0], [0, 0]], dtype=np.float32)
    mask = np.array([[1, 1], [1, 1], [1, 1], [1, 1], [0, 1]], dtype=np.float32)  # image 4 masked for class 0
    thr = youden_thresholds(probs, targets, mask).numpy()
    assert thr[0] == pytest.approx(0.20) and thr[1] == pytest.approx(0.5)


def test_operating_point_moves_the_reward_cut_to_each_class_threshold(tmp_path):
    """operating_point="youden": the saved model carries op_threshs (xrv's mechanism), so its 0.5
    cut on the rescaled outputs fires exactly where the raw sigmoid reaches the class threshold;
    AUROC is unchanged (a monotone rescaling)."""
    from medrl.models.xrv_diag import predict_probs

    pairs, size = _effusion_pairs(tmp_path)
    kw = dict(size=size, epochs=1, batch_size=16, lr=3e-3, growth_rate=4, seed=0)
    plain = train_diag(pairs, tmp_path / "plain", ckpt_dir=tmp_path / "c1", **kw)
    m = train_diag(pairs, tmp_path / "op", ckpt_dir=tmp_path / "c2", operating_point="youden", **kw)
    assert m["auroc_Effusion"] == pytest.approx(plain["auroc_Effusion"])
    model = load_diag(tmp_path / "op")
    op = model.op_threshs.clone()
    assert op.shape == (len(PATHOLOGIES),) and 0 < float(op[PATHOLOGIES.index("Effusion")]) < 1
    x = torch.stack([load_image(p, size=size, mode="L") for p in pairs["path"]])
    rescaled = predict_probs(model, x)
    model.op_threshs = None
    raw = predict_probs(model, x)
    assert torch.equal(rescaled >= 0.5, raw >= op[None, :])
    assert not torch.equal(raw >= 0.5, raw >= op[None, :])  # the cut did move


def test_train_diag_rejects_bad_labels(tmp_path):
    pairs = pd.DataFrame([{"image": "a", "path": "x.png", "split": "train", **{c: 2.0 for c in PATHOLOGIES}}])
    with pytest.raises(DataError, match="outside"):
        train_diag(pairs, tmp_path / "d", size=16, epochs=1, batch_size=1, lr=1e-3, growth_rate=4, seed=0, ckpt_dir=tmp_path / "c")
    assert xrv_diag.XRV_INPUT_RESOLUTION == 224
