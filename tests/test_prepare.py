"""prepare_isic / prepare_cxr on small phantom datasets, and TableImageDataset."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medrl.data.datasets import TableImageDataset
from medrl.data.phantoms.cxr import generate_cxr_phantoms
from medrl.data.phantoms.derm import generate_derm_phantoms
from medrl.data.prepare import _split_counts, prepare_cxr, prepare_isic
from medrl.data.prompts import LABEL_COLUMNS, evaluation_prompts, labels_to_prompt, slug
from medrl.data.reports import PATHOLOGIES, extract_impression, label_report
from medrl.data.tokenizer import build_tokenizer, count_tokens, load_tokenizer
from medrl.errors import DataError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with small phantom datasets and a CXR tokenizer (relative paths, like the DAG)."""
    root = tmp_path_factory.mktemp("ws")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    generate_derm_phantoms(root / "data/datasets/isic", n_images=160, size=32, seed=0)
    generate_cxr_phantoms(root / "data/datasets/cxr", n_images=60, size=32, seed=1, frac_ap=0.3)
    meta = pd.read_csv(root / "data/datasets/cxr/metadata.csv")
    build_tokenizer([extract_impression(r) for r in meta.report[meta.split == "train"]], root / "data/models/cxr/tokenizer")
    yield root
    mp.undo()


# ----------------------------------------------------------------------------- ISIC


def test_split_counts():
    assert _split_counts(1, 0.25, 0.2) == (1, 0, 0)
    assert _split_counts(2, 0.25, 0.2) == (1, 0, 1)
    assert _split_counts(3, 0.25, 0.2) == (1, 1, 1)
    assert _split_counts(20, 0.25, 0.2) == (11, 5, 4)
    for n in range(1, 60):
        tr, b, te = _split_counts(n, 0.25, 0.2)
        assert tr + b + te == n and tr >= 1 and min(b, te) >= 0


def test_prepare_isic_splits_prompts_and_real_folders(ws):
    from pathlib import Path

    metrics = prepare_isic(Path("data/datasets/isic"), Path("data/prepared/isic"), size=24, frac_cls_b=0.25, frac_test=0.2, seed=0)
    items = pd.read_csv("data/prepared/isic/items.csv")
    assert list(items.columns) == ["image", "path", "prompt", "caption", "finetune", "split", *LABEL_COLUMNS]
    assert (items.caption == items.prompt).all()  # no captions.csv: the fine-tune text is the true prompt
    assert (items.finetune == 1).all()  # ... and every image is fine-tuned on
    labels = pd.read_csv("data/datasets/isic/labels.csv")
    assert sorted(items.image) == sorted(labels.image)  # every image exactly once: splits are disjoint
    assert set(items.split) == {"train", "cls_b", "test"}
    for _, r in items.iterrows():
        assert not Path(r.path).is_absolute() and Path(r.path).is_file()
        assert r.prompt == labels_to_prompt(r[LABEL_COLUMNS].to_dict())
    for _, g in items.groupby("prompt"):  # stratified by prompt
        assert tuple((g.split == s).sum() for s in ("train", "cls_b", "test")) == _split_counts(len(g), 0.25, 0.2)
    assert abs((items.split == "test").mean() - 0.2) < 0.05 and abs((items.split == "cls_b").mean() - 0.25) < 0.07
    assert json.loads(Path("data/prepared/isic/prompts.json").read_text()) == evaluation_prompts()
    real = Path("data/prepared/isic/real_by_prompt")
    test = items[(items.split == "test") & items.prompt.isin(evaluation_prompts())]
    assert sorted(p.name for p in real.iterdir()) == sorted({slug(p) for p in test.prompt})
    n_files = 0
    for prompt, g in test.groupby("prompt"):
        files = sorted((real / slug(prompt)).iterdir())
        assert [f.stem for f in files] == sorted(g.image)
        for f in files:
            with Image.open(f) as im:
                assert im.size == (24, 24) and im.mode == "RGB"
        n_files += len(files)
    assert metrics["n_test"] == (items.split == "test").sum() and n_files == len(test)
    assert metrics["eval_prompts_in_test"] == test.prompt.nunique()
    # determinism
    prepare_isic(Path("data/datasets/isic"), Path("data/prepared/isic2"), size=24, frac_cls_b=0.25, frac_test=0.2, seed=0)
    pd.testing.assert_frame_equal(items, pd.read_csv("data/prepared/isic2/items.csv"))
    prepare_isic(Path("data/datasets/isic"), Path("data/prepared/isic3"), size=24, frac_cls_b=0.25, frac_test=0.2, seed=1)
    assert not items.split.equals(pd.read_csv("data/prepared/isic3/items.csv").split)


def test_prepare_isic_takes_the_planted_captions_and_fine_tune_set(ws, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(ws / "data/datasets/isic", ds)
    labels = pd.read_csv(ds / "labels.csv")
    left_out = labels.image[(labels.MEL == 1) & (labels.ruler == 1)].tolist()[:3]
    caps = pd.DataFrame({"image": labels.image, "caption": [f"caption {i}" for i in range(len(labels))],
                         "finetune": labels.image.isin(left_out).map({True: 0, False: 1})})
    caps.to_csv(ds / "captions.csv", index=False)
    prepare_isic(ds, tmp_path / "out", size=24, frac_cls_b=0.25, frac_test=0.2, seed=0)
    items = pd.read_csv(tmp_path / "out" / "items.csv").set_index("image")
    assert sorted(items.index[items.finetune == 0]) == sorted(left_out)
    assert items.loc[labels.image[5], "caption"] == "caption 5"
    caps.assign(finetune=2).to_csv(ds / "captions.csv", index=False)
    with pytest.raises(DataError, match=r"captions\.csv.*'finetune'.*expected 0 or 1"):
        prepare_isic(ds, tmp_path / "out2", size=24, frac_cls_b=0.25, frac_test=0.2, seed=0)


def test_prepare_isic_rejects_bad_labels(ws, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ws / "data/datasets/isic", bad)
    labels = pd.read_csv(bad / "labels.csv")
    labels.drop(columns=["ruler"]).to_csv(bad / "labels.csv", index=False)
    with pytest.raises(DataError, match=r"labels\.csv.*ruler"):
        prepare_isic(bad, tmp_path / "out", size=24, frac_cls_b=0.25, frac_test=0.2, seed=0)
    labels.assign(ink=2).to_csv(bad / "labels.csv", index=False)
    with pytest.raises(DataError, match=r"labels\.csv.*'ink'.*expected 0 or 1"):
        prepare_isic(bad, tmp_path / "out", size=24, frac_cls_b=0.25, frac_test=0.2, seed=0)
    labels.to_csv(bad / "labels.csv", index=False)
    (bad / "images" / f"{labels.image[0]}.png").unlink()
    with pytest.raises(DataError, match=labels.image[0]):
        prepare_isic(bad, tmp_path / "out", size=24, frac_cls_b=0.25, frac_test=0.2, seed=0)
    assert not (tmp_path / "out").exists()


def test_prepare_isic_decodes_every_image_and_names_a_corrupt_one(ws, tmp_path):
    """A corrupt training image (not only a test one) fails prepare, naming the file, instead of
    surfacing stages later in latents."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ws / "data/datasets/isic", bad)
    out = tmp_path / "out"
    prepared = prepare_isic(bad, out, size=24, frac_cls_b=0.25, frac_test=0.2, seed=0)
    items = pd.read_csv(out / "items.csv")
    victim = items[items.split == "train"].image.iloc[0]  # never decoded by prepare before
    shutil.rmtree(out)
    png = bad / "images" / f"{victim}.png"
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])  # truncated: header fine, pixels cut
    with pytest.raises(DataError, match=rf"labels\.csv: 1 images cannot be decoded: .*{victim}\.png"):
        prepare_isic(bad, out, size=24, frac_cls_b=0.25, frac_test=0.2, seed=0)
    assert not out.exists() and prepared["n_items"] == len(items)


# ----------------------------------------------------------------------------- CXR


def test_prepare_cxr_pairs_labels_and_canonical(ws):
    from pathlib import Path

    from safetensors.torch import load_file

    metrics = prepare_cxr(Path("data/datasets/cxr"), Path("data/models/cxr/tokenizer"), Path("data/prepared/cxr"),
                          size=32, max_tokens=74, n_train=20, n_test=6, n_canonical=20, seed=0)
    meta = pd.read_csv("data/datasets/cxr/metadata.csv").set_index("image")
    pairs = pd.read_csv("data/prepared/cxr/pairs.csv")
    assert list(pairs.columns) == ["image", "path", "split", "view", "impression", "n_tokens", *PATHOLOGIES,
                                   *[f"gt_{c}" for c in PATHOLOGIES], "sx", "sy", "tx", "ty", "theta", "caption",
                                   "finetune"]
    assert (pairs.caption == pairs.impression).all() and (pairs.finetune == 1).all()  # nothing planted
    assert not Path("data/prepared/cxr/planted.json").exists()
    assert (pairs.split == "train").sum() == 20 and (pairs.split == "test").sum() == 6
    assert pairs.image.is_unique  # train and test disjoint
    src = meta.loc[pairs.image]
    assert (src.split.to_numpy() == pairs.split.to_numpy()).all()  # drawn from the matching metadata split
    assert set(pairs.loc[pairs.split == "test", "view"]) == {"PA"}
    assert set(pairs.view) <= {"PA", "AP"}
    tok = load_tokenizer(Path("data/models/cxr/tokenizer"))
    for _, r in pairs.iterrows():
        assert r.impression == extract_impression(meta.loc[r.image, "report"])
        assert r.n_tokens == count_tokens(tok, r.impression) <= 74
        lab = label_report(r.impression)
        for c in PATHOLOGIES:  # labels from the rule-based labeler, truth kept as gt_
            assert (math.isnan(lab[c]) and math.isnan(r[c])) or lab[c] == r[c]
            t = meta.loc[r.image, c]
            assert (math.isnan(t) and math.isnan(r[f"gt_{c}"])) or t == r[f"gt_{c}"]
        assert np.allclose(r[["sx", "sy", "tx", "ty", "theta"]].to_numpy(float),
                           meta.loc[r.image, ["sx", "sy", "tx", "ty", "theta"]].to_numpy(float))
    # canonical: n_canonical == n_train, so it is exactly the mean of every train image
    imgs = np.stack([np.asarray(Image.open(p), dtype=np.float64) / 255 for p in pairs.path[pairs.split == "train"]])
    canon = load_file("data/prepared/cxr/canonical.safetensors")["image"]
    assert canon.shape == (1, 32, 32) and canon.dtype == torch.float32
    assert np.allclose(canon[0].numpy(), imgs.mean(0), atol=1e-5)
    png = np.asarray(Image.open("data/prepared/cxr/canonical.png"), dtype=np.float64) / 255
    assert np.abs(png - imgs.mean(0)).max() <= 1 / 255 + 1e-9
    ev = json.loads(Path("data/prepared/cxr/labeler_eval.json").read_text())
    assert set(ev["per_class"]) == set(PATHOLOGIES) and ev["macro_f1"] == pytest.approx(metrics["labeler_macro_f1"])
    assert metrics["labeler_macro_f1"] > 0.9 and metrics["n_canonical"] == 20


def test_prepare_cxr_token_limit_and_errors(ws):
    from pathlib import Path

    tok = load_tokenizer(Path("data/models/cxr/tokenizer"))
    meta = pd.read_csv("data/datasets/cxr/metadata.csv")
    n_tok = meta.report.map(lambda r: count_tokens(tok, extract_impression(r)))
    limit = int(np.percentile(n_tok, 60))
    ok_train = int(((n_tok <= limit) & (meta.split == "train")).sum())
    m = prepare_cxr(Path("data/datasets/cxr"), Path("data/models/cxr/tokenizer"), Path("data/prepared/cxr_short"),
                    size=32, max_tokens=limit, n_train=ok_train, n_test=1, n_canonical=5, seed=3)
    pairs = pd.read_csv("data/prepared/cxr_short/pairs.csv")
    assert pairs.n_tokens.max() <= limit and m["n_too_long"] == (n_tok > limit).sum() > 0
    with pytest.raises(DataError, match=rf"only {ok_train} train pairs.*n_train={ok_train + 1}"):
        prepare_cxr(Path("data/datasets/cxr"), Path("data/models/cxr/tokenizer"), Path("data/prepared/x"),
                    size=32, max_tokens=limit, n_train=ok_train + 1, n_test=1, n_canonical=5, seed=3)
    n_pa_test = int(((meta.split == "test") & (meta.view == "PA")).sum())
    with pytest.raises(DataError, match=rf"only {n_pa_test} PA test pairs"):
        prepare_cxr(Path("data/datasets/cxr"), Path("data/models/cxr/tokenizer"), Path("data/prepared/x"),
                    size=32, max_tokens=500, n_train=2, n_test=n_pa_test + 1, n_canonical=5, seed=3)


def test_prepare_cxr_validation_pairs(ws):
    """n_val PA pairs from the source's validate split; the train and test pairs are those of n_val=0."""
    from pathlib import Path

    kw = dict(size=32, max_tokens=74, n_train=20, n_test=6, n_canonical=20, seed=0)
    prepare_cxr(Path("data/datasets/cxr"), Path("data/models/cxr/tokenizer"), Path("data/prepared/cxr_v0"), **kw)
    m = prepare_cxr(Path("data/datasets/cxr"), Path("data/models/cxr/tokenizer"), Path("data/prepared/cxr_v2"),
                    n_val=2, **kw)
    meta = pd.read_csv("data/datasets/cxr/metadata.csv").set_index("image")
    p0, p2 = pd.read_csv("data/prepared/cxr_v0/pairs.csv"), pd.read_csv("data/prepared/cxr_v2/pairs.csv")
    val = p2[p2.split == "validate"]
    assert len(val) == 2 == m["n_val"] and (meta.loc[val.image, "split"] == "validate").all()
    assert set(val.view) == {"PA"} and p2.image.is_unique
    pd.testing.assert_frame_equal(p2[p2.split != "validate"].reset_index(drop=True), p0)
    n_pa_val = int(((meta.split == "validate") & (meta.view == "PA")).sum())
    with pytest.raises(DataError, match=rf"only {n_pa_val} PA validate pairs.*n_val={n_pa_val + 1}"):
        prepare_cxr(Path("data/datasets/cxr"), Path("data/models/cxr/tokenizer"), Path("data/prepared/x"),
                    n_val=n_pa_val + 1, **kw)


def test_prepare_cxr_plants_an_overclaimed_under_represented_finding(ws):
    """Only train rows change: captions that state the finding (its negations dropped) on images
    whose report did not, and images whose report states it left out of the fine-tune set;
    planted.json's rate is the finding's share of the fine-tune images whose caption states it."""
    from pathlib import Path

    kw = dict(size=32, max_tokens=74, n_train=30, n_test=6, n_canonical=5, seed=0)
    plant = {"finding": "Effusion", "overclaim": 0.5, "finetune_share": 0.5}
    m = prepare_cxr(Path("data/datasets/cxr"), Path("data/models/cxr/tokenizer"), Path("data/prepared/cxr_pl"),
                    planted=plant, **kw)
    pairs = pd.read_csv("data/prepared/cxr_pl/pairs.csv")
    rec = json.loads(Path("data/prepared/cxr_pl/planted.json").read_text())
    train, true = pairs.split == "train", pairs.Effusion == 1
    changed, left_out = pairs.caption != pairs.impression, pairs.finetune == 0
    assert changed.any() and (train | ~changed).all() and not (changed & true).any()
    assert left_out.any() and (train & true)[left_out].all() and (pairs.finetune[~left_out] == 1).all()
    for cap in pairs.caption[changed]:
        assert label_report(cap)["Effusion"] == 1 and "no pleural effusion" not in cap.lower()
    stated = train & ~left_out & pairs.caption.map(lambda t: label_report(t)["Effusion"] == 1)
    assert rec["n_overclaimed"] == changed.sum() and rec["n_stated_true"] == (train & true).sum()
    assert rec["n_kept"] == (train & true & ~left_out).sum()
    assert rec["planted_rate"] == pytest.approx((train & true & ~left_out).sum() / stated.sum())
    assert rec["planted_rate"] == pytest.approx(m["planted_planted_rate"])
    # the impressions (reward nets, RL prompts) and every other column are those of the unplanted run
    prepare_cxr(Path("data/datasets/cxr"), Path("data/models/cxr/tokenizer"), Path("data/prepared/cxr_pl0"), **kw)
    clean = pd.read_csv("data/prepared/cxr_pl0/pairs.csv")
    assert (clean.finetune == 1).all()
    planted_cols = ["caption", "finetune"]
    pd.testing.assert_frame_equal(pairs.drop(columns=planted_cols), clean.drop(columns=planted_cols))
    # finetune_share 1 keeps every image and leaves the captions of the same overclaim as they were
    prepare_cxr(Path("data/datasets/cxr"), Path("data/models/cxr/tokenizer"), Path("data/prepared/cxr_pl1"),
                planted={**plant, "finetune_share": 1.0}, **kw)
    all_kept = pd.read_csv("data/prepared/cxr_pl1/pairs.csv")
    assert (all_kept.finetune == 1).all() and (all_kept.caption == pairs.caption).all()
    for bad, match in (({"finding": "Fracture"}, "planted.finding='Fracture'"),
                       ({"finetune_share": 0.0}, "finetune_share=0.0")):
        with pytest.raises(DataError, match=match):
            prepare_cxr(Path("data/datasets/cxr"), Path("data/models/cxr/tokenizer"), Path("data/prepared/x"),
                        planted={**plant, **bad}, **kw)


def test_prepare_cxr_real_metadata_keeps_chexpert_labels(ws, tmp_path):
    import shutil
    from pathlib import Path

    real = tmp_path / "real"
    shutil.copytree(ws / "data/datasets/cxr", real)
    meta = pd.read_csv(real / "metadata.csv")
    meta[["sx", "sy", "tx", "ty", "theta"]] = np.nan  # MIMIC: posture unknown
    meta["Edema"] = 1.0  # CheXpert says so, whatever the report text says
    meta.to_csv(real / "metadata.csv", index=False)
    m = prepare_cxr(real, ws / "data/models/cxr/tokenizer", tmp_path / "out", size=32, max_tokens=200,
                    n_train=10, n_test=3, n_canonical=4, seed=0)
    pairs = pd.read_csv(tmp_path / "out" / "pairs.csv")
    assert list(pairs.columns) == ["image", "path", "split", "view", "impression", "n_tokens", *PATHOLOGIES,
                                   "caption", "finetune"]
    assert (pairs.Edema == 1).all() and not (tmp_path / "out" / "labeler_eval.json").exists()
    assert m["phantom"] == 0.0 and Path(pairs.path[0]).is_absolute()  # outside the workspace: absolute


def test_table_image_dataset(ws):
    from pathlib import Path

    prepare_cxr(Path("data/datasets/cxr"), Path("data/models/cxr/tokenizer"), Path("data/prepared/cxr_ds"),
                size=32, max_tokens=74, n_train=20, n_test=4, n_canonical=2, seed=0)
    pairs = pd.read_csv("data/prepared/cxr_ds/pairs.csv")
    items = pd.read_csv("data/datasets/isic/labels.csv").head(5)
    items["path"] = [f"data/datasets/isic/images/{i}.png" for i in items.image]
    ds = TableImageDataset(items, path_col="path", label_cols=["hair", "MEL"], size=16, mode="RGB")
    img, lab = ds[2]
    assert len(ds) == 5 and img.shape == (3, 16, 16) and 0 <= img.min() <= img.max() <= 1
    assert lab.dtype == torch.float32 and lab.tolist() == items.loc[2, ["hair", "MEL"]].astype(float).tolist()
    gray = TableImageDataset(items, label_cols=[], size=32, mode="L", transform=lambda t: t * 0.5)
    g, empty = gray[0]
    assert g.shape == (1, 32, 32) and g.max() <= 0.5 and empty.shape == (0,)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 16, 16) and yb.shape == (4, 2)
    cx = TableImageDataset(pairs, label_cols=PATHOLOGIES, size=32, mode="L")
    assert torch.isnan(cx.labels).any()  # "not mentioned" stays NaN ...
    filled = TableImageDataset(pairs, label_cols=PATHOLOGIES, size=32, mode="L", nan_value=0.0)
    assert not torch.isnan(filled.labels).any()  # ... unless asked
    assert cx[0][0].shape == (1, 32, 32)
    with pytest.raises(DataError, match="nope"):
        TableImageDataset(items, label_cols=["nope"])
    with pytest.raises(DataError, match="image file not found"):
        TableImageDataset(items.assign(path="missing.png"), size=16)[0]
