"""Augmentation experiment: MEL-vs-NV classifier on real vs real+synthetic, per subgroup."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medrl.data.prompts import ARTIFACTS4, HEADS6, labels_to_prompt
from medrl.errors import DataError
from medrl.io import read_json, read_table, save_image
from medrl.metrics.augment import augment_experiment, subset_name, subgroup_metrics

torch.set_num_threads(1)

SIZE = 32


def _lesion_image(rng, lesion: str, arts: dict[str, int]) -> torch.Tensor:
    """Skin background, a dark (MEL) or light-brown (NV) disc, crude artifact marks."""
    img = torch.tensor([0.85, 0.65, 0.55]).view(3, 1, 1) + 0.05 * torch.from_numpy(rng.standard_normal((3, SIZE, SIZE))).float()
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    disc = ((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2) < (SIZE / 4) ** 2
    colour = {"MEL": (0.2, 0.1, 0.08), "NV": (0.6, 0.4, 0.3), "OTHER": (0.8, 0.3, 0.3)}[lesion]
    img[:, disc] = torch.tensor(colour).view(3, 1)
    if arts["hair"]:
        img[:, :, 3] = 0.05
    if arts["ruler"]:
        img[:, -3:, :] = 0.95
    if arts["ink"]:
        img[:, 0:3, 0:6] = torch.tensor([0.5, 0.1, 0.6]).view(3, 1, 1)
    if arts["gel_bubble"]:
        img[:, 4:8, -8:-4] = 1.0
    return img.clamp(0, 1)


def _items(tmp_path, rng, n: dict[str, int]) -> pd.DataFrame:
    rows = []
    for split, k in n.items():
        for i in range(k):
            lesion = ["MEL", "NV", "OTHER"][i % 3] if split == "train" else ["MEL", "NV"][i % 2]
            arts = {a: int(rng.random() < 0.4) for a in ARTIFACTS4}
            path = tmp_path / "real" / f"{split}_{i}.png"
            save_image(_lesion_image(rng, lesion, arts), path)
            rows.append({"image": f"{split}_{i}", "path": str(path), "split": split,
                         "MEL": int(lesion == "MEL"), "NV": int(lesion == "NV"), **arts})
    return pd.DataFrame(rows)


def _manifest(tmp_path, rng, n: int, model: str) -> tuple[str, int]:
    rows, n_mel_nv = [], 0
    for i in range(n):
        lesion = ["MEL", "NV", "OTHER"][i % 3]
        arts = {a: int(rng.random() < 0.5) for a in ARTIFACTS4}
        labels = {h: 0 for h in HEADS6} | arts
        if lesion != "OTHER":
            labels[lesion] = 1
            n_mel_nv += 1
        path = tmp_path / model / f"{i}.png"
        save_image(_lesion_image(rng, lesion, arts), path)
        rows.append({"prompt_id": i, "prompt": labels_to_prompt(labels), "seed": i, "model": model, "path": str(path)})
    m = tmp_path / f"{model}.csv"
    pd.DataFrame(rows).to_csv(m, index=False)
    return str(m), n_mel_nv


def test_subset_name_and_subgroup_metrics():
    assert subset_name({"hair": 1, "gel_bubble": 0, "ruler": 1, "ink": 0}) == "hair+ruler"
    assert subset_name({a: 0 for a in ARTIFACTS4}) == "none"
    pi = pd.DataFrame({
        "label": [1, 0, 1, 0], "prob": [0.9, 0.2, 0.4, 0.6],
        "hair": [1, 1, 0, 0], "gel_bubble": 0, "ruler": [0, 0, 0, 1], "ink": 0,
    })
    pi["subset"] = [subset_name(r) for r in pi[ARTIFACTS4].to_dict("records")]
    g = subgroup_metrics(pi)
    assert g["overall"]["all"]["n"] == 4 and g["overall"]["all"]["acc"] == 0.5
    assert g["artifact"]["hair=1"] == {"n": 2.0, "n_pos": 1.0, "acc": 1.0, "auroc": 1.0}
    assert g["artifact"]["hair=0"]["acc"] == 0.0 and g["artifact"]["hair=0"]["auroc"] == 0.0
    assert g["artifact"]["ink=1"]["n"] == 0 and np.isnan(g["artifact"]["ink=1"]["auroc"])
    assert g["subset"]["ruler"]["n"] == 1 and np.isnan(g["subset"]["ruler"]["auroc"])  # one class only
    assert set(g["subset"]) == {"hair", "none", "ruler"}


def test_augment_experiment_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    items = _items(tmp_path, rng, {"train": 36, "cls_b": 3, "test": 20})
    sd, n_sd = _manifest(tmp_path, rng, 12, "sd")
    out = tmp_path / "augment"
    conditions = {"real": None, "real_again": None, "real+sd": sd}
    flat = augment_experiment(items, conditions, out, size=SIZE, epochs=1, batch_size=8, lr=1e-3, seed=0)

    per_image = read_table(out / "per_image.csv", ["condition", "image", *ARTIFACTS4, "subset", "label", "prob"])
    assert len(per_image) == 3 * 20 and set(per_image.condition) == set(conditions)
    a = per_image[per_image.condition == "real"].prob.to_numpy()
    b = per_image[per_image.condition == "real_again"].prob.to_numpy()
    assert np.array_equal(a, b)  # same seed and data -> same model: only the data differs between conditions
    c = per_image[per_image.condition == "real+sd"].prob.to_numpy()
    assert not np.array_equal(a, c)

    summary = read_json(out / "summary.json")
    test = items[items.split == "test"]
    for cond in conditions:
        s = summary["conditions"][cond]
        assert s["n_train_real"] == 24  # the OTHER train rows are not MEL/NV
        assert s["overall"]["all"]["n"] == 20 and s["overall"]["all"]["n_pos"] == 10
        for art in ARTIFACTS4:
            assert s["artifact"][f"{art}=1"]["n"] == (test[art] == 1).sum()
            assert s["artifact"][f"{art}=0"]["n"] == (test[art] == 0).sum()
        assert sum(g["n"] for g in s["subset"].values()) == 20
        assert sum(s["train_counts"]["subset"].values()) == s["n_train_real"] + s["n_train_synthetic"]
    assert summary["conditions"]["real"]["n_train_synthetic"] == 0
    assert summary["conditions"]["real+sd"]["n_train_synthetic"] == n_sd
    assert (out / "models" / "real_sd" / "model.safetensors").is_file()

    for key in ("real/auroc", "real/acc", "real_sd/auroc", "real_sd/worst_auroc", "real_sd/auroc/hair_1", "real_sd/acc/none"):
        assert key in flat, key
    assert flat["real_sd/delta_auroc"] == pytest.approx(flat["real_sd/auroc"] - flat["real/auroc"])
    assert flat["real/auroc"] == pytest.approx(summary["conditions"]["real"]["overall"]["all"]["auroc"])
    assert all(isinstance(v, float) for v in flat.values())


def test_augment_experiment_bad_input(tmp_path):
    rng = np.random.default_rng(1)
    items = _items(tmp_path, rng, {"train": 6, "test": 4})
    with pytest.raises(DataError, match="ink"):
        augment_experiment(items.drop(columns=["ink"]), {"real": None}, tmp_path / "o", size=SIZE, epochs=1, batch_size=4, lr=1e-3, seed=0)
    with pytest.raises(DataError, match="no MEL or NV"):
        augment_experiment(items.assign(MEL=0, NV=0), {"real": None}, tmp_path / "o", size=SIZE, epochs=1, batch_size=4, lr=1e-3, seed=0)
