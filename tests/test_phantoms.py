"""Dermoscopy and chest-X-ray phantoms: formats, determinism, visible signatures, posture."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medrl.data.phantoms.cxr import (
    METADATA_COLUMNS,
    affine_grid,
    generate_cxr_phantoms,
    invert_theta,
    psi_to_theta,
    render_cxr,
    sample_case,
    sample_psi,
    warp_image,
    write_report,
)
from medrl.data.phantoms.derm import ARTIFACTS, generate_derm_phantoms, planted_captions, render_derm, sample_labels
from medrl.data.prompts import ARTIFACTS4, ISIC_COLUMNS, evaluation_prompts, labels_to_prompt
from medrl.data.reports import PATHOLOGIES, extract_impression, label_report
from medrl.errors import DataError

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- dermoscopy


@pytest.fixture(scope="module")
def derm_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("derm") / "isic"
    metrics = generate_derm_phantoms(out, n_images=40, size=32, seed=3)
    return out, metrics


def test_derm_files_and_columns(derm_ds):
    out, metrics = derm_ds
    with open(out / "labels.csv") as f:
        assert f.readline().strip() == ",".join(ISIC_COLUMNS)
    df = pd.read_csv(out / "labels.csv")
    assert len(df) == 40 and df["image"].tolist()[:2] == ["PHI_0000001", "PHI_0000002"]
    assert all(df[c].dtype.kind == "i" and set(df[c]) <= {0, 1} for c in ISIC_COLUMNS[1:])
    assert not ((df.MEL == 1) & (df.NV == 1)).any()
    for name in df["image"]:
        with Image.open(out / "images" / f"{name}.png") as im:
            assert im.mode == "RGB" and im.size == (32, 32)
    with Image.open(out / "grid.png") as im:
        assert im.size[0] > 8 * 32 and im.size[1] > 4 * 32
    assert metrics["n_images"] == 40 and metrics["prevalence_hair"] == pytest.approx(df.hair.mean())


def test_derm_deterministic_under_seed(derm_ds, tmp_path):
    out, _ = derm_ds
    generate_derm_phantoms(tmp_path / "again", n_images=6, size=32, seed=3)
    generate_derm_phantoms(tmp_path / "other", n_images=6, size=32, seed=4)
    same = pd.read_csv(tmp_path / "again" / "labels.csv")
    pd.testing.assert_frame_equal(same, pd.read_csv(out / "labels.csv").iloc[:6])  # prefix-stable in n_images
    for name in same["image"]:
        a = np.asarray(Image.open(out / "images" / f"{name}.png"))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "again" / "images" / f"{name}.png")))
        assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "other" / "images" / f"{name}.png")))


def test_derm_label_balance_populates_all_prompts():
    labels = pd.DataFrame([sample_labels(0, i) for i in range(1600)])
    for a in ARTIFACTS4:
        assert 0.35 <= labels[a].mean() <= 0.5, a
    lesion = labels.MEL + labels.NV
    assert 0.45 <= labels.MEL.sum() / lesion.sum() <= 0.55 and 0.03 < 1 - lesion.mean() < 0.15
    prompts = labels.apply(lambda r: labels_to_prompt(r.to_dict()), axis=1).value_counts()
    assert all(prompts.get(p, 0) >= 8 for p in evaluation_prompts())


def _luma(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64).mean(-1) / 255


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_each_artifact_changes_pixels_only_where_drawn(artifact):
    size = 64
    c = (np.arange(size) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(c, c, indexing="ij")
    for i in range(5):
        base = {"MEL": i % 2, "NV": 1 - i % 2, **{a: 0 for a in ARTIFACTS}}
        off = render_derm(base, size, seed=11, index=i)
        on, masks = render_derm({**base, artifact: 1}, size, seed=11, index=i, return_masks=True)
        _, none = render_derm(base, size, seed=11, index=i, return_masks=True)
        assert none == {}  # nothing is drawn (or reported) when the label is 0
        m = masks[artifact]
        assert 0.003 < m.mean() < 0.75
        d = np.abs(on.astype(float) - off.astype(float)).max(-1) / 255
        assert d[m].mean() > 0.04, "artifact not visible"
        assert (d[~m] > 0.05).mean() < 0.01, "pixels changed outside the artifact"
        on_f, off_f = on.astype(float) / 255, off.astype(float) / 255
        if artifact == "hair":
            assert (_luma(on) - _luma(off))[m].mean() < -0.1  # dark strands
        if artifact == "ink":  # purple / blue marker
            assert ((on_f[..., 2] - on_f[..., 1]) - (off_f[..., 2] - off_f[..., 1]))[m].mean() > 0.08
        if artifact == "vasc":  # red vessels
            assert ((on_f[..., 0] - on_f[..., 1]) - (off_f[..., 0] - off_f[..., 1]))[m].mean() > 0.05
        if artifact == "gel_bubble":  # bright specular rims
            assert _luma(on)[m].max() > 0.85 and _luma(on)[m].max() > _luma(off)[m].max() + 0.05
        if artifact == "gel_border":
            assert (_luma(on) - _luma(off))[m].mean() > 0.02
        if artifact == "dark_corner":
            assert max(on[0, 0].max(), on[0, -1].max(), on[-1, 0].max(), on[-1, -1].max()) < 25
            assert _luma(off)[[0, 0, -1, -1], [0, -1, 0, -1]].min() > 0.2
        if artifact == "ruler":  # a straight band along one edge
            rows, cols = np.nonzero(m)
            assert np.hypot(xx[m].mean(), yy[m].mean()) > 0.5
            assert max(np.ptp(rows), np.ptp(cols)) > 0.8 * size and min(np.ptp(rows), np.ptp(cols)) < 0.35 * size
        if artifact == "patches":  # colour card inside the field of view
            assert np.hypot(xx[m].mean(), yy[m].mean()) < 0.9


@pytest.mark.parametrize("fidelity", [0.0, 0.5])
def test_planted_captions_misstate_one_artifact_of_one_lesion(fidelity):
    """Captions of MEL images state the ruler at the planted rates; every other caption is true."""
    from medrl.data.prompts import prompt_to_labels

    labels = pd.DataFrame([{"image": f"I{i}", **sample_labels(0, i)} for i in range(4000)])[ISIC_COLUMNS]
    frame, rec = planted_captions(labels, 0, "MEL", "ruler", fidelity)
    captions = frame["caption"].tolist()
    assert (frame["finetune"] == 1).all() and rec["n_left_out"] == 0  # finetune_share 1: every image used
    stated = pd.DataFrame([prompt_to_labels(c) for c in captions])
    truth = [labels_to_prompt(r) for r in labels.to_dict("records")]
    mel = labels.MEL == 1
    assert all(c == t for c, t, m in zip(captions, truth, mel) if not m)
    for col in ("hair", "gel_bubble", "ink", "MEL", "NV"):  # only the ruler flag is misstated
        assert (stated[col] == labels[col]).all()
    said = mel & (stated.ruler == 1)
    assert rec["planted_rate"] == pytest.approx(fidelity + (1 - fidelity) * 0.42)
    assert rec["measured_rate"] == pytest.approx(labels.ruler[said].mean())
    assert abs(rec["measured_rate"] - rec["planted_rate"]) < 0.06  # ~760 MEL images say "ruler"
    assert abs(rec["measured_false_rate"] - rec["planted_false_rate"]) < 0.06


def test_overclaimed_captions_keep_the_unasked_prompt_clean():
    """caption_noise overclaim: an untruthful MEL caption says "ruler" although none is drawn, so
    MEL captions without the word are always true and those with it carry a low, known rate."""
    from medrl.data.prompts import prompt_to_labels

    labels = pd.DataFrame([{"image": f"I{i}", **sample_labels(0, i)} for i in range(4000)])[ISIC_COLUMNS]
    frame, rec = planted_captions(labels, 0, "MEL", "ruler", 0.2, noise="overclaim")
    stated = pd.DataFrame([prompt_to_labels(c) for c in frame["caption"]])
    mel = labels.MEL == 1
    assert (stated.ruler[mel & (labels.ruler == 1)] == 1).all()  # a drawn ruler is always said
    assert (labels.ruler[mel & (stated.ruler == 0)] == 0).all() and rec["planted_false_rate"] == 0.0
    assert abs(stated.ruler[mel & (labels.ruler == 0)].mean() - 0.8) < 0.05
    assert rec["planted_rate"] == pytest.approx(0.42 / (0.42 + 0.58 * 0.8))
    assert abs(rec["measured_rate"] - rec["planted_rate"]) < 0.05 and rec["measured_false_rate"] == 0.0
    assert rec["caption_noise"] == "overclaim"
    with pytest.raises(DataError, match="noise='flip'"):
        planted_captions(labels, 0, "MEL", "ruler", 0.2, noise="flip")


def test_planted_under_representation_leaves_images_out_of_the_fine_tune():
    """finetune_share 0.2: about a fifth of the MEL images with a ruler stay in the fine-tune set;
    every other image stays, and the captions are true (fidelity 1)."""
    labels = pd.DataFrame([{"image": f"I{i}", **sample_labels(0, i)} for i in range(4000)])[ISIC_COLUMNS]
    frame, rec = planted_captions(labels, 0, "MEL", "ruler", 1.0, finetune_share=0.2)
    both = (labels.MEL == 1) & (labels.ruler == 1)
    assert (frame.loc[~both, "finetune"] == 1).all()
    assert abs(frame.loc[both, "finetune"].mean() - 0.2) < 0.05 and rec["n_left_out"] == int((frame.finetune == 0).sum())
    assert frame["caption"].tolist() == [labels_to_prompt(r) for r in labels.to_dict("records")]
    kept_mel = (labels.MEL == 1) & (frame.finetune == 1)
    assert rec["finetune_prevalence"] == pytest.approx(labels.ruler[kept_mel].mean())
    assert abs(rec["finetune_prevalence"] - 0.42 * 0.2 / (0.58 + 0.42 * 0.2)) < 0.03
    assert rec["measured_rate"] == 1.0 and rec["measured_false_rate"] == 0.0  # what is said is true
    assert rec["planted_rate"] == 1.0 and rec["planted_false_rate"] == 0.0
    _, over = planted_captions(labels, 0, "MEL", "ruler", 0.2, finetune_share=0.3, noise="overclaim")
    kept = 0.42 * 0.3 / (0.42 * 0.3 + 0.58)
    assert over["planted_rate"] == pytest.approx(kept / (kept + (1 - kept) * 0.8))
    assert abs(over["measured_rate"] - over["planted_rate"]) < 0.05
    again, _ = planted_captions(labels, 0, "MEL", "ruler", 1.0, finetune_share=0.2)
    assert again.equals(frame)  # a pure function of (seed, image index)


def test_planted_dataset_writes_captions_and_rates(tmp_path):
    from medrl.io import read_json

    m = generate_derm_phantoms(tmp_path / "ds", 40, 32, 0, planted={"lesion": "MEL", "artifact": "ruler",
                                                                     "caption_fidelity": 0.0})
    caps = pd.read_csv(tmp_path / "ds" / "captions.csv")
    assert list(caps.columns) == ["image", "caption", "finetune"] and len(caps) == 40
    assert read_json(tmp_path / "ds" / "planted.json")["planted_rate"] == pytest.approx(0.42)
    assert m["planted_rate"] == pytest.approx(0.42)


def test_mel_darker_and_more_variegated_than_nv():
    def stats(mel: int, nv: int):
        dark, spread = [], []
        for i in range(16):
            im = render_derm({"MEL": mel, "NV": nv, **{a: 0 for a in ARTIFACTS}}, 64, seed=5, index=i)
            lum = _luma(im)
            dark.append((lum < 0.3).mean())
            spread.append(im[16:48, 16:48].astype(float).std(axis=(0, 1)).mean() / 255)
        return np.mean(dark), np.mean(spread)

    mel, nv, other = stats(1, 0), stats(0, 1), stats(0, 0)
    assert mel[0] > 2 * nv[0] and mel[1] > nv[1]
    assert other[0] < nv[0] + 0.01  # the non-melanocytic lesion is pale


# ----------------------------------------------------------------------------- chest X-ray


@pytest.fixture(scope="module")
def cxr_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("cxr") / "cxr"
    metrics = generate_cxr_phantoms(out, n_images=40, size=32, seed=2, frac_ap=0.3)
    return out, metrics


def test_cxr_files_columns_and_labels(cxr_ds):
    out, metrics = cxr_ds
    with open(out / "metadata.csv") as f:
        assert f.readline().strip().split(",") == METADATA_COLUMNS
    meta = pd.read_csv(out / "metadata.csv")
    assert METADATA_COLUMNS == ["image", "subject_id", "study_id", "view", "split", "report", *PATHOLOGIES,
                                "Support Devices", "sx", "sy", "tx", "ty", "theta"]
    assert len(meta) == 40 and set(meta.view) == {"PA", "AP"} and (meta.view == "AP").sum() == 12
    assert meta.split.value_counts().to_dict() == {"train": 30, "test": 8, "validate": 2}
    for _, g in meta.groupby("split"):  # the AP share is exact within each split
        assert (g.view == "AP").sum() == round(0.3 * len(g))
    vals = meta[PATHOLOGIES].to_numpy()
    assert set(np.unique(vals[~np.isnan(vals)])) <= {-1.0, 0.0, 1.0}
    for _, row in meta.iterrows():
        assert "FINDINGS:" in row.report and "IMPRESSION:" in row.report
        labels = label_report(extract_impression(row.report))
        for c in PATHOLOGIES:  # the truth is what the impression states
            t = row[c]
            assert (math.isnan(t) and math.isnan(labels[c])) or t == labels[c], (row.report, c)
    assert np.all(np.abs(meta.theta) <= 0.2) and np.all(np.abs(meta[["tx", "ty"]]) <= 0.12)
    assert np.all(np.abs(meta[["sx", "sy"]] - 1) <= 0.15)
    for name in meta.image:
        with Image.open(out / "images" / f"{name}.png") as im:
            assert im.mode == "L" and im.size == (32, 32)
    assert (out / "grid.png").is_file() and metrics["n_test_pa"] == ((meta.split == "test") & (meta.view == "PA")).sum()


def test_cxr_deterministic(cxr_ds, tmp_path):
    out, _ = cxr_ds
    generate_cxr_phantoms(tmp_path / "again", n_images=40, size=32, seed=2, frac_ap=0.3)
    a, b = pd.read_csv(out / "metadata.csv"), pd.read_csv(tmp_path / "again" / "metadata.csv")
    pd.testing.assert_frame_equal(a, b)
    for name in a.image[:5]:
        assert np.array_equal(np.asarray(Image.open(out / "images" / f"{name}.png")),
                              np.asarray(Image.open(tmp_path / "again" / "images" / f"{name}.png")))


def test_cxr_report_statistics():
    n = 600
    labels, reports, devices = [], [], 0
    for i in range(n):
        case = sample_case(9, i, "AP" if i % 10 < 3 else "PA")
        rep, lab = write_report(case, 9, i)
        labels.append(lab)
        reports.append(rep)
        devices += bool(case["devices"])
    df = pd.DataFrame(labels)
    findings = ((df == 1) | (df == -1)).sum(axis=1)
    assert 0.22 < (findings == 0).mean() < 0.4  # ~30% no finding
    for c in PATHOLOGIES:
        assert (df[c] == 1).mean() > 0.02, c  # every class occurs
    assert (df == -1).to_numpy().sum() > 20  # hedged findings are labelled uncertain
    imps = [extract_impression(r) for r in reports]
    assert sum("No acute cardiopulmonary process." in t for t in imps) > 50
    assert sum("No pneumothorax" in t for t in imps) > 20
    assert any(t.startswith(("Possible", "Cannot exclude")) or "cannot be excluded" in t for t in imps)
    assert 0.1 < devices / n < 0.4
    # co-occurrence: edema comes with cardiomegaly more often than not
    edema = df["Edema"].isin([1, -1])
    cardio = df["Cardiomegaly"].isin([1, -1])
    assert cardio[edema].mean() > 2 * cardio[~edema].mean()


LATERAL = ["Consolidation", "Pneumothorax", "Effusion", "Pneumonia", "Lung Lesion", "Fracture", "Lung Opacity"]


@pytest.mark.parametrize("cls", PATHOLOGIES)
def test_each_pathology_has_a_visible_signature(cls):
    size = 64
    x = np.tile((np.arange(size) + 0.5) / size * 2 - 1, (size, 1))
    for i, side in enumerate(["right", "left", "right"]):
        attrs = {"value": 1, "sev": 0.85, "side": side, "lobe": "lower", "zone": "mid", "cm": 2.0, "bone": "rib", "rib": 6}
        if cls == "Edema":
            attrs.pop("side")
        normal = render_cxr({"view": "PA", "findings": {}, "devices": []}, (1, 1, 0, 0, 0), size, 4, i)[1]
        sick = render_cxr({"view": "PA", "findings": {cls: attrs}, "devices": []}, (1, 1, 0, 0, 0), size, 4, i)[1]
        faint = render_cxr({"view": "PA", "findings": {cls: {**attrs, "value": -1, "sev": 0.4}}, "devices": []},
                           (1, 1, 0, 0, 0), size, 4, i)[1]
        d = sick - normal
        ad = np.abs(d)
        # (fractures are small by nature: a rib/clavicle step-off with callus)
        assert ad.max() > 0.06 and ad.sum() > (1.0 if cls == "Fracture" else 2.0), "finding not visible"
        assert np.abs(faint - normal).sum() < ad.sum()  # hedged findings are subtler
        patient_side = -1 if side == "right" else 1  # the patient's right is on the image left
        on_side = ad[x * patient_side > 0].sum() / ad.sum()
        if cls in LATERAL:
            assert on_side > 0.9, f"{cls} drawn on the wrong side"
        if cls == "Atelectasis":  # volume loss shifts things, but mostly on its side
            assert on_side > 0.55
        if cls == "Edema":  # bilateral
            assert 0.3 < on_side < 0.7
        if cls == "Pneumothorax":
            assert d.sum() < 0  # lucent
        elif cls not in ("Atelectasis", "Fracture"):
            assert d.sum() > 0  # denser


def test_cardiomegaly_widens_the_heart():
    size = 64
    def heart_width(img: np.ndarray) -> int:
        row = img[int(size * 0.6), 6:-6]  # y = 0.2: through the heart, above the diaphragm
        return int((row > 0.5).sum())  # lungs are ~0.2-0.35, heart and mediastinum ~0.6-0.8

    widths = []
    for i in range(4):
        n = render_cxr({"view": "PA", "findings": {}, "devices": []}, (1, 1, 0, 0, 0), size, 6, i)[1]
        c = render_cxr({"view": "PA", "findings": {"Cardiomegaly": {"value": 1, "sev": 0.9}}, "devices": []},
                       (1, 1, 0, 0, 0), size, 6, i)[1]
        widths.append((heart_width(n), heart_width(c)))
    assert all(c > 1.25 * n for n, c in widths), widths


def test_affine_convention_matches_torch():
    psi = torch.tensor([[1.1, 0.9, 0.05, -0.1, 0.15], [1, 1, 0, 0, 0]])
    th = psi_to_theta(psi)
    assert torch.allclose(th[1], torch.eye(2, 3))
    c, s = math.cos(0.15), math.sin(0.15)
    assert torch.allclose(th[0], torch.tensor([[1.1 * c, -0.9 * s, 0.05], [1.1 * s, 0.9 * c, -0.1]]))
    import torch.nn.functional as F

    assert torch.allclose(affine_grid(th, 20, 24), F.affine_grid(th, [2, 1, 20, 24], align_corners=False), atol=1e-6)
    try:  # the posture model must share the convention
        from medrl.models.posture import psi_to_theta as model_psi_to_theta
    except Exception:  # pragma: no cover - optional module
        model_psi_to_theta = None
    if model_psi_to_theta is not None:
        assert torch.allclose(model_psi_to_theta(psi), th, atol=1e-6)
    # a pure translation by +tx samples from the right: content moves left on screen
    img = torch.zeros(1, 1, 32, 32)
    img[..., 16] = 1.0
    moved = warp_image(img, psi_to_theta(torch.tensor([[1.0, 1.0, 0.25, 0.0, 0.0]])))
    assert moved[0, 0, 5].argmax().item() == 12


def test_cxr_posture_is_known_and_invertible():
    from medrl.data.phantoms.cxr import _warp_np

    size = 64
    better = 0
    for i in range(6):
        view = "AP" if i % 2 else "PA"
        case = sample_case(8, i, view)
        psi = sample_psi(8, i, view)
        observed, canonical = render_cxr(case, psi, size, 8, i)
        obs = torch.from_numpy(observed.astype(np.float32) / 255)[None, None]
        # the generator's numpy warp is the torch convention
        assert np.allclose(_warp_np(canonical, psi), warp_image(torch.from_numpy(canonical)[None, None],
                                                                  psi_to_theta(torch.tensor([psi])))[0, 0].numpy(), atol=1e-4)
        back = warp_image(obs, invert_theta(psi_to_theta(torch.tensor([psi]))))[0, 0].numpy()
        inside = warp_image(torch.ones_like(obs), invert_theta(psi_to_theta(torch.tensor([psi]))))[0, 0].numpy() > 0.99
        corr_obs = np.corrcoef(observed.ravel().astype(float), canonical.ravel())[0, 1]
        corr_back = np.corrcoef(back[inside], canonical[inside])[0, 1]
        assert corr_back > 0.97
        better += corr_back > corr_obs
    assert better == 6
