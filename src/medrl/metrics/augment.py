"""Does synthetic data help a disease classifier on under-represented artifact subgroups?

RL4Med-DDPO's downstream experiment: a MEL-vs-NV classifier (EfficientNet-B0, one "MEL"
logit) is trained on the real "train" split alone and on the real split plus generated
images (base SD, RL-fine-tuned), each generated image labelled from its prompt. Every
condition uses the same seed, architecture and schedule, so the data is the only difference.
All conditions are evaluated on the real "test" split, overall and per artifact subgroup
(each artifact present/absent, and each exact artifact subset, i.e. prompt group), with the
counts beside every number so that small subgroups are visible as such.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from medrl.errors import DataError

__all__ = ["augment_experiment", "subset_name", "subgroup_metrics"]


def subset_name(flags: Mapping[str, int]) -> str:
    """'none' or the present artifacts joined by '+', in ARTIFACTS4 order ('hair+ruler')."""
    from medrl.data.prompts import ARTIFACTS4

    present = [a for a in ARTIFACTS4 if int(flags[a]) == 1]
    return "+".join(present) if present else "none"


def _metric_key(name: str) -> str:
    # MLflow metric names allow only [A-Za-z0-9_-./ ]: "real+sd" -> "real_sd", "hair=1" -> "hair_1".
    return re.sub(r"[^A-Za-z0-9_\-./]", "_", name)


def subgroup_metrics(per_image: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """{'overall': {...}, 'artifact': {'hair=1': {...}, 'hair=0': ...}, 'subset': {'none': ...}}
    for one condition's test predictions (columns label, prob, the artifacts, subset);
    each entry holds n, n_pos, acc (at 0.5) and auroc (NaN when a group has one class)."""
    from medrl.data.prompts import ARTIFACTS4
    from medrl.models.classifiers import binary_metrics

    def m(g: pd.DataFrame) -> dict[str, float]:
        return binary_metrics(g["prob"].to_numpy(), g["label"].to_numpy())

    out: dict[str, dict[str, dict[str, float]]] = {"overall": {"all": m(per_image)}, "artifact": {}, "subset": {}}
    for a in ARTIFACTS4:
        for v in (1, 0):
            out["artifact"][f"{a}={v}"] = m(per_image[per_image[a] == v])
    for name, g in per_image.groupby("subset", sort=True):
        out["subset"][str(name)] = m(g)
    return out


def _real_rows(items: pd.DataFrame, split: str) -> pd.DataFrame:
    from medrl.data.prompts import ARTIFACTS4

    need = ["image", "path", "split", "MEL", "NV", *ARTIFACTS4]
    missing = [c for c in need if c not in items.columns]
    if missing:
        raise DataError(f"items: missing columns {missing}; expected {need}")
    rows = items[(items["split"] == split) & (items["MEL"] + items["NV"] == 1)]
    if rows.empty:
        raise DataError(f"items: no MEL or NV rows in split {split!r}; the augmentation experiment needs both")
    rows = rows[["image", "path", "MEL", *ARTIFACTS4]].copy()
    rows["source"] = "real"
    return rows.reset_index(drop=True)


def _synthetic_rows(manifest: Path) -> pd.DataFrame:
    """Generated images with labels parsed from their prompts, MEL/NV prompts only."""
    from medrl.data.prompts import ARTIFACTS4, prompt_to_labels
    from medrl.metrics.apr import read_manifest

    df = read_manifest(manifest)
    labels = pd.DataFrame([prompt_to_labels(p) for p in df["prompt"]], index=df.index)
    keep = (labels["MEL"] + labels["NV"]) == 1
    if not keep.any():
        raise DataError(f"{manifest}: no MEL or NV prompts; expected generated images of both lesion types")
    image = df["model"].astype(str) + "/" + df["prompt_id"].astype(str) + "/" + df["seed"].astype(str)
    rows = pd.DataFrame({"image": image, "path": df["path"]})
    rows = pd.concat([rows, labels[["MEL", *ARTIFACTS4]]], axis=1)[keep]
    rows["source"] = "synthetic"
    return rows.reset_index(drop=True)


def augment_experiment(
    items: pd.DataFrame,
    synthetic: dict[str, Path | None],
    out_dir: Path,
    *,
    size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str = "cpu",
    imagenet_weights: str | None = None,
    ckpt_dir: Path | None = None,
) -> dict[str, float]:
    """Train one MEL-vs-NV classifier per condition and evaluate each on the real test split.

    ``synthetic`` maps a condition name ("real", "real+sd", "real+rl") to a generation
    manifest whose images are added to the real training rows, or None for real data only.
    Writes ``out_dir/per_image.csv`` (condition, image, artifact flags, subset, label,
    prob), ``out_dir/summary.json`` (nested per-condition/per-subgroup numbers with counts)
    and each condition's model under ``out_dir/models/<condition>/``. Returns flat floats:
    ``<cond>/acc``, ``<cond>/auroc``, ``<cond>/auroc/<group>`` (names made MLflow-safe),
    ``<cond>/worst_auroc`` and, when "real" is a condition, ``<cond>/delta_auroc``."""
    from medrl.data.prompts import ARTIFACTS4
    from medrl.io import write_json, write_table
    from medrl.models.classifiers import json_safe, load_classifier, predict_probs, train_classifier

    if not synthetic:
        raise DataError("synthetic: expected at least one condition, e.g. {'real': None}")
    out_dir = Path(out_dir)
    ckpt_root = Path(ckpt_dir) if ckpt_dir is not None else out_dir / ".ckpt"
    train_real = _real_rows(items, "train")
    test = _real_rows(items, "test")
    test["subset"] = [subset_name(r) for r in test[ARTIFACTS4].to_dict("records")]

    per_image_all: list[pd.DataFrame] = []
    summary: dict[str, object] = {"seed": seed, "size": size, "epochs": epochs, "n_test": len(test), "conditions": {}}
    flat: dict[str, float] = {}
    for cond, manifest in synthetic.items():
        synth = _synthetic_rows(Path(manifest)) if manifest is not None else train_real.iloc[:0]
        train = pd.concat([train_real, synth], ignore_index=True)
        train["split"] = "train"
        table = pd.concat([train, test.assign(split="test")], ignore_index=True)
        model_dir = out_dir / "models" / re.sub(r"[^A-Za-z0-9_.-]", "_", cond)
        clf = train_classifier(
            table, ["MEL"], model_dir, train_split="train", eval_split="test", size=size, epochs=epochs,
            batch_size=batch_size, lr=lr, seed=seed, imagenet_weights=imagenet_weights,
            ckpt_dir=ckpt_root / re.sub(r"[^A-Za-z0-9_.-]", "_", cond), device=device,
        )
        model = load_classifier(model_dir, device=device)
        prob = predict_probs(model, test, device=device, batch_size=max(batch_size, 64), desc=f"augment {cond}")[:, 0]
        pi = pd.DataFrame({"condition": cond, "image": test["image"], **{a: test[a] for a in ARTIFACTS4},
                           "subset": test["subset"], "label": test["MEL"].astype(int), "prob": prob})
        per_image_all.append(pi)
        groups = subgroup_metrics(pi)
        summary["conditions"][cond] = _condition_summary(  # type: ignore[index]
            manifest, train, n_train_real=len(train_real), n_train_synthetic=len(synth), groups=groups, clf=clf)
        flat.update(_flat_condition_metrics(cond, groups, n_train_synthetic=len(synth)))

    if "real" in synthetic:
        for cond in synthetic:
            if cond != "real":
                k = _metric_key(cond)
                flat[f"{k}/delta_auroc"] = flat[f"{k}/auroc"] - flat["real/auroc"]
                flat[f"{k}/delta_worst_auroc"] = flat[f"{k}/worst_auroc"] - flat["real/worst_auroc"]

    write_table(pd.concat(per_image_all, ignore_index=True), out_dir / "per_image.csv")
    write_json(out_dir / "summary.json", json_safe(summary | {"metrics": flat}))
    return flat


def _condition_summary(manifest: Path | None, train: pd.DataFrame, *, n_train_real: int, n_train_synthetic: int,
                       groups: dict[str, Any], clf: dict[str, float]) -> dict[str, Any]:
    """summary.json entry of one condition: its training set's make-up, subgroup metrics, classifier metrics
    (adds the ``subset`` column to ``train``)."""
    from medrl.data.prompts import ARTIFACTS4

    train["subset"] = [subset_name(r) for r in train[ARTIFACTS4].to_dict("records")]
    return {
        "manifest": None if manifest is None else str(manifest),
        "n_train_real": int(n_train_real),
        "n_train_synthetic": int(n_train_synthetic),
        "train_counts": {
            "subset": {str(k): int(v) for k, v in train.groupby("subset").size().items()},
            "artifact": {f"{a}={v}": int((train[a] == v).sum()) for a in ARTIFACTS4 for v in (1, 0)},
        },
        **groups,
        "classifier": clf,
    }


def _flat_condition_metrics(cond: str, groups: dict[str, Any], *, n_train_synthetic: int) -> dict[str, float]:
    """The MLflow-safe flat metrics of one condition (accuracy, AUROC overall and per subgroup, worst AUROC)."""
    flat: dict[str, float] = {}
    k = _metric_key(cond)
    flat[f"{k}/acc"] = groups["overall"]["all"]["acc"]
    flat[f"{k}/auroc"] = groups["overall"]["all"]["auroc"]
    flat[f"{k}/n_train_synthetic"] = float(n_train_synthetic)
    for kind in ("artifact", "subset"):
        for g, m in groups[kind].items():
            flat[f"{k}/auroc/{_metric_key(g)}"] = m["auroc"]
            flat[f"{k}/acc/{_metric_key(g)}"] = m["acc"]
    sub = [m["auroc"] for m in groups["subset"].values() if not math.isnan(m["auroc"])]
    flat[f"{k}/worst_auroc"] = float(min(sub)) if sub else math.nan
    return flat
