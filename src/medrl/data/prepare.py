"""prepare_* stages: normalised datasets -> training/evaluation tables (see ARCHITECTURE.md).

Paths written into items.csv / pairs.csv are relative to the current working directory (the
workspace root, where stages run) when the image lies under it, otherwise absolute; readers
resolve relative paths against the working directory.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from medrl.data.planted_reports import plant_finding
from medrl.data.prompts import ISIC_COLUMNS, LABEL_COLUMNS, evaluation_prompts, labels_to_prompt, slug
from medrl.data.reports import PATHOLOGIES, evaluate_labeler, extract_impression, label_report
from medrl.errors import DataError
from medrl.io import atomic_dir, atomic_path, load_image, read_table, save_image, write_json, write_table
from medrl.progress import progress

PSI_NAMES = ("sx", "sy", "tx", "ty", "theta")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------- shared helpers


def workspace_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it, else absolute."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _find_images(images_dir: Path, names: list[str], table: Path) -> list[Path]:
    """images/<name>.png|.jpg|.jpeg for every name; DataError naming the first missing ones."""
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder not found (referenced by {table})")
    present = {p.name: p for p in images_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES}
    out, missing = [], []
    for name in names:
        hit = next((present[name + s] for s in _IMAGE_SUFFIXES if name + s in present), None)
        if hit is None:
            missing.append(name)
        out.append(hit)
    if missing:
        raise DataError(f"{table}: {len(missing)} images have no file in {images_dir} (e.g. {missing[:3]}); "
                        f"expected images/<image>{{{','.join(_IMAGE_SUFFIXES)}}}")
    return out


def _verify_images(files: list[Path], table: Path) -> None:
    """Decode every image completely; DataError naming the unreadable files. Without this a
    corrupt or truncated image only fails stages later (latents, classifiers)."""
    from PIL import Image

    bad: list[str] = []
    for f in progress(files, desc="verify images"):
        try:
            with Image.open(f) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... on bad data
            bad.append(f"{f} ({type(e).__name__}: {e})")
    if bad:
        raise DataError(f"{table}: {len(bad)} images cannot be decoded: {'; '.join(bad[:3])}"
                        f"{' ...' if len(bad) > 3 else ''}; expected readable PNG/JPEG files (re-download or remove "
                        "them from the table)")


def _split_counts(n: int, frac_b: float, frac_test: float) -> tuple[int, int, int]:
    """(train, cls_b, test) for a group of n: rounded fractions, test >= 1 from n = 2,
    cls_b >= 1 from n = 3, train always >= 1."""
    n_test = int(round(frac_test * n))
    n_b = int(round(frac_b * n))
    if n >= 2:
        n_test = max(n_test, 1)
    if n >= 3:
        n_b = max(n_b, 1)
    while n_test + n_b > max(n - 1, 0):
        if n_b >= n_test and n_b > 0:
            n_b -= 1
        else:
            n_test -= 1
    return n - n_b - n_test, n_b, n_test


# ----------------------------------------------------------------------------- ISIC


def _check_isic_labels(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    df = df.copy()
    df["image"] = df["image"].astype(str)
    dup = df["image"][df["image"].duplicated()].tolist()
    if dup:
        raise DataError(f"{path}: duplicate image ids {dup[:3]}; expected one row per image")
    for col in LABEL_COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = ~values.isin([0, 1])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}: column {col!r} row {row + 2} has {df[col].iloc[row]!r}; expected 0 or 1")
        df[col] = values.astype(int)
    both = df.index[(df["MEL"] == 1) & (df["NV"] == 1)].tolist()
    if both:
        raise DataError(f"{path}: rows {[i + 2 for i in both[:3]]} have MEL = NV = 1; expected at most one diagnosis")
    return df


def _captions(dataset_dir: Path, df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """The text the base model is fine-tuned on and whether it is fine-tuned on the image at all
    (0/1): captions.csv where the dataset has one (the phantoms' planted deficiency; its optional
    ``finetune`` column defaults to 1), else each image's true prompt, every image used."""
    path = dataset_dir / "captions.csv"
    if not path.is_file():
        return df["prompt"], pd.Series(1, index=df.index)
    table = read_table(path, ["image", "caption"]).set_index("image")
    missing = sorted(set(df["image"]) - set(table.index))
    if missing:
        raise DataError(f"{path}: no caption for {len(missing)} images, e.g. {missing[:3]}; expected one row per image")
    used = table["finetune"] if "finetune" in table.columns else pd.Series(1, index=table.index)
    bad = ~used.isin([0, 1])
    if bad.any():
        raise DataError(f"{path}: column 'finetune' has {used[bad].iloc[0]!r} for image {used[bad].index[0]!r}; "
                        "expected 0 or 1")
    return df["image"].map(table["caption"]), df["image"].map(used).astype(int)


def prepare_isic(dataset_dir: Path, out_dir: Path, *, size: int, frac_cls_b: float, frac_test: float, seed: int) -> dict:
    """Prompts, train / cls_b / test splits (stratified by prompt) and per-prompt real folders.

    Writes items.csv, prompts.json and real_by_prompt/<slug>/<image>.png (the test images of
    each evaluation prompt, resized to ``size``). Returns split counts and prompt coverage."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    if not (0 < frac_cls_b < 1 and 0 < frac_test < 1 and frac_cls_b + frac_test < 1):
        raise DataError(f"prepare_isic: frac_cls_b={frac_cls_b}, frac_test={frac_test}; expected both in (0, 1) with sum < 1")
    labels_path = dataset_dir / "labels.csv"
    df = _check_isic_labels(read_table(labels_path, ISIC_COLUMNS), labels_path)
    if df.empty:
        raise DataError(f"{labels_path}: no rows")
    files = _find_images(dataset_dir / "images", df["image"].tolist(), labels_path)
    _verify_images(files, labels_path)
    df["path"] = [workspace_path(f) for f in files]
    df["prompt"] = [labels_to_prompt(r) for r in df[LABEL_COLUMNS].to_dict("records")]

    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=df.index, dtype=object)
    for prompt in sorted(df["prompt"].unique()):  # sorted: the rng stream does not depend on row order
        idx = df.index[df["prompt"] == prompt].to_numpy()
        idx = idx[rng.permutation(len(idx))]
        n_train, n_b, n_test = _split_counts(len(idx), frac_cls_b, frac_test)
        split[idx[n_train : n_train + n_b]] = "cls_b"
        split[idx[n_train + n_b :]] = "test"
    df["split"] = split
    df["caption"], df["finetune"] = _captions(dataset_dir, df)
    items = df[["image", "path", "prompt", "caption", "finetune", "split", *LABEL_COLUMNS]]

    evals = evaluation_prompts()
    test = items[(items["split"] == "test") & items["prompt"].isin(evals)]
    with atomic_dir(out_dir) as tmp:
        write_table(items, tmp / "items.csv")
        write_json(tmp / "prompts.json", evals)
        if (dataset_dir / "planted.json").is_file():  # the evaluation reports the gap RL closes
            shutil.copyfile(dataset_dir / "planted.json", tmp / "planted.json")
        root = tmp / "real_by_prompt"
        root.mkdir()
        for row in progress(test.itertuples(index=False), desc="real_by_prompt", total=len(test)):
            folder = root / slug(row.prompt)
            folder.mkdir(exist_ok=True)
            save_image(load_image(row.path, size=size, mode="RGB"), folder / f"{row.image}.png")
    per_test = test["prompt"].value_counts()
    metrics = {f"n_{s}": float((items["split"] == s).sum()) for s in ("train", "cls_b", "test")}
    metrics.update({
        "n_items": float(len(items)),
        "n_prompts": float(items["prompt"].nunique()),
        "eval_prompts_in_train": float(len(set(items.loc[items["split"] == "train", "prompt"]) & set(evals))),
        "eval_prompts_in_test": float(len(per_test)),
        "min_test_per_eval_prompt": float(min(per_test.get(p, 0) for p in evals)),
        "n_other_lesion": float(((items["MEL"] == 0) & (items["NV"] == 0)).sum()),
    })
    return metrics


# ----------------------------------------------------------------------------- CXR


def _is_phantom(meta: pd.DataFrame) -> bool:
    """Phantom metadata carries the true posture; real (MIMIC) metadata has no/NaN psi."""
    return all(c in meta.columns for c in PSI_NAMES) and bool(meta[list(PSI_NAMES)].notna().all().all())


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def prepare_cxr(
    dataset_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    size: int,
    max_tokens: int,
    n_train: int,
    n_test: int,
    n_canonical: int,
    seed: int,
    n_val: int = 0,
    planted: Mapping[str, Any] | None = None,
) -> dict:
    """CXRL data: PA/AP views, impressions of <= max_tokens tokens, n_train train pairs
    (PA + AP from split train), n_test PA test pairs (split test), n_val PA validation pairs
    (split validate: the reports settings are chosen on), labels, canonical CXR.

    ``caption``/``finetune``: what the anchor is fine-tuned on, the impressions of every pair or with
    ``planted`` ({finding, overclaim, finetune_share}) those of ``data.planted_reports`` (planted.json).

    Labels: real metadata (no psi) keeps its CheXpert columns; phantom metadata is labelled
    by ``label_report`` on the impression and its true labels are kept as gt_<class>
    (labeler_eval.json compares the two). canonical = mean of n_canonical random train pairs'
    images at ``size`` (all of them when fewer)."""
    from medrl.data.tokenizer import count_tokens, load_tokenizer

    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    meta_path = dataset_dir / "metadata.csv"
    meta, phantom, n_all, no_imp = _cxr_impressions(meta_path)

    tokenizer = load_tokenizer(Path(tokenizer_dir))
    meta["n_tokens"] = [count_tokens(tokenizer, t) for t in progress(meta["impression"], desc="count tokens")]
    long = meta["n_tokens"] > max_tokens
    kept = meta[~long].reset_index(drop=True)
    labels, truth = _cxr_labels(kept, phantom, meta_path)

    train_pool = np.flatnonzero((kept["split"] == "train").to_numpy())
    pa = (kept["view"] == "PA").to_numpy()
    test_pool = np.flatnonzero((kept["split"] == "test").to_numpy() & pa)
    val_pool = np.flatnonzero((kept["split"] == "validate").to_numpy() & pa)
    why = f"(PA/AP, non-empty impression of <= {max_tokens} tokens)"
    if len(train_pool) < n_train:
        raise DataError(f"{meta_path}: only {len(train_pool)} train pairs {why} available; n_train={n_train} requested")
    if len(test_pool) < n_test:
        raise DataError(f"{meta_path}: only {len(test_pool)} PA test pairs {why} available; n_test={n_test} requested")
    if len(val_pool) < n_val:
        raise DataError(f"{meta_path}: only {len(val_pool)} PA validate pairs {why} available; n_val={n_val} requested")
    rng = np.random.default_rng(seed)
    train_idx = np.sort(rng.choice(train_pool, size=n_train, replace=False))
    test_idx = np.sort(rng.choice(test_pool, size=n_test, replace=False))
    # drawn after the others, so adding validation reports leaves the train and test pairs as they were
    val_idx = np.sort(np.random.default_rng([seed, 1]).choice(val_pool, size=n_val, replace=False))
    chosen = np.concatenate([train_idx, test_idx, val_idx])
    splits = ["train"] * n_train + ["test"] * n_test + ["validate"] * n_val
    pairs = _cxr_pairs(kept, chosen, labels, truth, phantom, dataset_dir, meta_path, splits=splits)
    pairs["caption"], pairs["finetune"], plant_record = _fine_tune_set(pairs, planted, seed)

    canon_rows = np.sort(rng.choice(n_train, size=min(n_canonical, n_train), replace=False))
    acc = torch.zeros(1, size, size, dtype=torch.float64)
    for i in progress(canon_rows, desc="canonical"):
        acc += load_image(pairs["path"].iloc[i], size=size, mode="L").double()
    canonical = (acc / len(canon_rows)).float().clamp(0, 1).contiguous()

    metrics: dict[str, float] = {
        "n_metadata": float(n_all), "n_pa_ap": float(len(meta) + int(no_imp.sum())),
        "n_no_impression": float(no_imp.sum()), "n_too_long": float(long.sum()),
        "n_train_available": float(len(train_pool)), "n_test_available": float(len(test_pool)),
        "n_train": float(n_train), "n_test": float(n_test), "n_val": float(n_val),
        "n_val_available": float(len(val_pool)), "n_canonical": float(len(canon_rows)),
        "mean_tokens": float(pairs["n_tokens"].mean()), "max_tokens_kept": float(pairs["n_tokens"].max()),
        "frac_ap_train": float((pairs.loc[pairs.split == "train", "view"] == "AP").mean()),
        "phantom": float(phantom),
    }
    for c in PATHOLOGIES:
        metrics[f"train_positive_{c}"] = float((pairs.loc[pairs.split == "train", c] == 1).mean())
    metrics.update({f"planted_{k}": float(v) for k, v in (plant_record or {}).items()
                    if k in ("planted_rate", "n_overclaimed")})
    _write_cxr_outputs(out_dir, pairs, canonical, labels, truth, metrics, plant_record)
    return metrics


def _fine_tune_set(pairs: pd.DataFrame, planted: Mapping[str, Any] | None, seed: int
                   ) -> tuple[pd.Series, Any, dict | None]:
    """(the anchor's fine-tune caption per pair, 1/0: in its fine-tune set, the plant's record or
    None): the impressions and every pair, or with ``planted`` those of ``data.planted_reports``."""
    if planted is None:
        return pairs["impression"], 1, None
    return plant_finding(pairs, finding=planted["finding"], overclaim=float(planted["overclaim"]),
                         finetune_share=float(planted["finetune_share"]), seed=seed)


def _cxr_impressions(meta_path: Path) -> tuple[pd.DataFrame, bool, int, pd.Series]:
    """(PA/AP rows of metadata.csv with a non-empty impression, phantom data?, number of rows read,
    mask of the PA/AP rows dropped for an empty impression)."""
    meta = read_table(meta_path, ["image", "view", "split", "report"])
    meta["image"] = meta["image"].astype(str)
    meta["view"] = meta["view"].astype(str).str.strip().str.upper()
    meta["split"] = meta["split"].astype(str).str.strip().str.lower()
    phantom = _is_phantom(meta)
    n_all = len(meta)
    meta = meta[meta["view"].isin(["PA", "AP"])].reset_index(drop=True)
    meta["impression"] = [extract_impression(r) for r in meta["report"]]
    no_imp = meta["impression"].str.len() == 0
    meta = meta[~no_imp].reset_index(drop=True)
    return meta, phantom, n_all, no_imp


def _cxr_labels(kept: pd.DataFrame, phantom: bool, meta_path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(labels used downstream, true labels or None): phantoms are labelled from the impression by
    ``label_report`` (their metadata labels are the truth); real data keeps its CheXpert columns."""
    if phantom:
        truth = kept[PATHOLOGIES].apply(pd.to_numeric, errors="coerce") if all(c in kept for c in PATHOLOGIES) else None
        if truth is None:
            raise DataError(f"{meta_path}: phantom metadata lacks pathology columns; expected {PATHOLOGIES}")
        labels = pd.DataFrame([label_report(t) for t in kept["impression"]], columns=PATHOLOGIES)
    else:
        missing = [c for c in PATHOLOGIES if c not in kept.columns]
        if missing:
            raise DataError(f"{meta_path}: real metadata lacks CheXpert columns {missing}; expected {PATHOLOGIES}")
        labels = kept[PATHOLOGIES].apply(pd.to_numeric, errors="coerce")
        truth = None
    return labels, truth


def _cxr_pairs(kept: pd.DataFrame, chosen: np.ndarray, labels: pd.DataFrame, truth: pd.DataFrame | None,
               phantom: bool, dataset_dir: Path, meta_path: Path, *, splits: list[str]) -> pd.DataFrame:
    """pairs.csv rows of the ``chosen`` rows of ``kept``: image path, split, impression, labels
    (+ gt_<class> and the posture psi for phantoms)."""
    sel = kept.iloc[chosen].reset_index(drop=True)
    files = _find_images(dataset_dir / "images", sel["image"].tolist(), meta_path)
    pairs = pd.DataFrame({
        "image": sel["image"], "path": [workspace_path(f) for f in files],
        "split": splits, "view": sel["view"],
        "impression": sel["impression"], "n_tokens": sel["n_tokens"].astype(int),
    })
    for c in PATHOLOGIES:
        pairs[c] = labels[c].iloc[chosen].to_numpy()
    if truth is not None:
        for c in PATHOLOGIES:
            pairs[f"gt_{c}"] = truth[c].iloc[chosen].to_numpy()
    if phantom:
        for c in PSI_NAMES:
            pairs[c] = sel[c].astype(float).to_numpy()
    return pairs


def _write_cxr_outputs(out_dir: Path, pairs: pd.DataFrame, canonical: torch.Tensor, labels: pd.DataFrame,
                       truth: pd.DataFrame | None, metrics: dict[str, float], planted: dict | None = None) -> None:
    """pairs.csv, canonical.png/.safetensors, planted.json (a planted deficiency) and (phantoms)
    labeler_eval.json, whose F1s are added to ``metrics``."""
    with atomic_dir(out_dir) as tmp:
        write_table(pairs, tmp / "pairs.csv")
        if planted is not None:
            write_json(tmp / "planted.json", planted)
        save_image(canonical, tmp / "canonical.png")
        from safetensors.torch import save_file

        with atomic_path(tmp / "canonical.safetensors") as f:
            save_file({"image": canonical}, str(f))
        if truth is not None:
            ev = evaluate_labeler(labels, truth)
            ev["n_reports"] = float(len(labels))
            write_json(tmp / "labeler_eval.json", _nan_to_none(ev))
            metrics.update({"labeler_macro_f1": ev["macro_f1"], "labeler_micro_f1": ev["micro_f1"],
                            "labeler_agreement": ev["agreement"]})
