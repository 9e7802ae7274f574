"""All CXRL metrics of one model's samples, in the schema ``tables.cxrl`` reads.

r_align (posture aligner), AUROC per pathology of the diagnostic DenseNet-121 on generated
images against the report labels, r_diag (the training reward's label accuracy, read as
``rl.cxr.diag_unmentioned``), image-report cosine similarity (dual encoder, = r_consist), the
variant's combined reward on the held-out reports when its weights are given, FID/KID with
the CXR DenseNet-121's pooled features (always: ``metrics.inception_weights`` is ISIC's), and
MS-SSIM between samples of the same report. Every metric carries a bootstrap CI; the samples of
one report are not independent, so the CIs resample *reports* (cluster bootstrap over
``prompt_id``), not images. Rows are ordered by a model-independent key and resampled with the
same seed, so "CXRL - other" differences are paired.

AUROC reads a class the report does not mention as a negative (uncertain -1 is ignored per
class): the convention the diagnostic model is trained with (``xrv_diag.TRAIN_UNMENTIONED``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from medrl.errors import DataError
from medrl.io import load_image, read_table, write_json, write_table
from medrl.progress import progress


def densenet_pooled(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchxrayvision DenseNet's pooled penultimate features (``features2``)."""
    return net.features2(x)


def cxr_fid_extractor(diag: torch.nn.Module) -> Any:
    """CXRL computes FID with a CXR DenseNet-121's features; ours is the pipeline's diag model.
    xrv input scaling: [0,1] -> [-1024, 1024]  ==  (x - 0.5) / (1/2048)."""
    from medrl.metrics.fidelity import ModuleExtractorSpec

    return ModuleExtractorSpec(module=diag, name="CXR DenseNet-121 (torchxrayvision arch, phantom-trained), pooled",
                               features=densenet_pooled, input_size=getattr(diag, "medrl_input_size", None),
                               in_channels=1, mean=(0.5,), std=(1.0 / 2048.0,))


REWARD_TERMS = {"l_align": "r_align", "l_diag": "r_diag", "l_consist": "similarity"}


def combined_reward(metrics: Mapping[str, Any], weights: Mapping[str, float], *,
                    where: str = "reward") -> dict[str, Any]:
    """l_align r_align + l_diag r_diag + l_consist similarity from one model's metrics (Metric
    dicts with replicates), as a Metric whose replicates stay paired with other models'."""
    from medrl.metrics.bootstrap import linear_combination

    out = linear_combination([(float(weights[w]), metrics[t]) for w, t in REWARD_TERMS.items()], where=where,
                             keep_boot=True)
    out["weights"] = {w: float(weights[w]) for w in REWARD_TERMS}
    return out


def evaluate_cxr_samples(samples_dir: Path, prepared_dir: Path, aligner_dir: Path, diag_dir: Path, dualenc_dir: Path,
                         out_dir: Path, *, metrics: dict[str, Any], device: str = "cpu", diag_unmentioned: str = "ignore",
                         weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Write ``out_dir/metrics.json`` (tables.cxrl schema) and ``out_dir/per_image.csv``.

    ``weights`` ({"l_align", "l_diag", "l_consist"}, a variant's) adds ``reward``: the combined
    *direct* reward on the held-out reports. With RLCF the training reward subtracts the
    anchor's score for the same report, so ``reward(variant) - reward(anchor)`` (paired,
    ``medrl.metrics.bootstrap.linear_combination``) is the held-out RLCF reward."""
    from medrl.data.reports import PATHOLOGIES
    from medrl.metrics.auroc import auroc_with_ci
    from medrl.metrics.bootstrap import bootstrap_ci
    from medrl.metrics.fidelity import fid_kid
    from medrl.metrics.msssim import msssim_within_groups
    from medrl.models.xrv_diag import TRAIN_UNMENTIONED

    samples_dir, prepared_dir, out_dir = Path(samples_dir), Path(prepared_dir), Path(out_dir)
    n_boot, ci, seed = int(metrics["bootstrap"]), float(metrics["ci"]), int(metrics["seed"])
    df, test, labels = _samples_with_labels(samples_dir, prepared_dir)
    r_align, probs, sim, diag = _score_samples(df, aligner_dir, diag_dir, dualenc_dir, device)

    items = df["item"].tolist()
    reports = df["prompt_id"].astype(str).tolist()  # the cluster of each image: its report
    boot = dict(n_boot=n_boot, ci=ci, seed=seed, keep_boot=True)
    result: dict[str, Any] = {
        "r_align": bootstrap_ci(r_align.astype(float), items=items, clusters=reports, **boot),
        "similarity": bootstrap_ci(sim.astype(float), items=items, clusters=reports, **boot),
        "auroc": auroc_with_ci(labels, probs, list(PATHOLOGIES), n_boot=n_boot, ci=ci, seed=seed, items=items,
                               clusters=reports, nan_as_negative=TRAIN_UNMENTIONED == "negative"),
        "auroc_unmentioned": TRAIN_UNMENTIONED,
        "n_images": int(len(df)),
        "n_reports": int(len(set(reports))),
        "bootstrap_unit": "report",
    }
    r_diag = _diagnostic_metrics(result, probs, labels, items, reports, boot, diag_unmentioned=diag_unmentioned,
                                 weights=weights, where=f"{out_dir}: reward")

    real = [Path(p) for p in test["path"]]
    # always the CXR DenseNet (CXRL Table 2a); metrics.inception_weights is for ISIC's FID only
    fk = fid_kid(real, [Path(p) for p in df["path"]], extractor=cxr_fid_extractor(diag), weights_path=None,
                 kid_subset_size=int(metrics["kid_subset_size"]), device=device, n_boot=n_boot, ci=ci, seed=seed,
                 fake_clusters=dict(zip(items, reports)))
    result.update(fid=fk["fid_metric"], kid=fk["kid_metric"], feature_extractor=fk["feature_extractor"])

    groups = {pid: [Path(p) for p in g["path"]] for pid, g in df.groupby("prompt_id", sort=True)}
    ms_pairs, ms = msssim_within_groups(groups, channels="L", device=device, n_boot=n_boot, ci=ci, seed=seed)
    result["msssim"] = {k: ms[k] for k in ("value", "lo", "hi", "n", "ci", "method", "boot", "boot_key") if k in ms}

    per_image = df.assign(r_align=r_align, r_diag=r_diag, similarity=sim, **{f"prob_{c}": probs[:, i] for i, c in enumerate(PATHOLOGIES)})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(per_image, out_dir / "per_image.csv")
    write_table(ms_pairs, out_dir / "msssim_pairs.csv")
    write_json(out_dir / "metrics.json", result)
    return _summary(result, len(df))


def _samples_with_labels(samples_dir: Path, prepared_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """(samples manifest in a model-independent order, test pairs by image, labels of each sample's report)."""
    from medrl.data.reports import PATHOLOGIES
    from medrl.metrics.apr import read_manifest
    from medrl.metrics.fidelity import item_key

    df = read_manifest(samples_dir / "manifest.csv")
    df["item"] = [item_key(Path(p)) for p in df["path"]]
    df = df.sort_values("item", kind="stable").reset_index(drop=True)
    pairs = read_table(prepared_dir / "pairs.csv", ["image", "split", "impression", "path", *PATHOLOGIES])
    test = pairs[pairs.split == "test"].astype({"image": str}).drop_duplicates("image").set_index("image")
    unknown = sorted(set(df["prompt_id"].astype(str)) - set(test.index))[:3]
    if unknown:
        raise DataError(f"{samples_dir / 'manifest.csv'}: prompt_id {unknown} not among the test pairs of "
                        f"{prepared_dir / 'pairs.csv'}; expected samples generated from the test reports")
    labels = test.loc[df["prompt_id"].astype(str), list(PATHOLOGIES)].to_numpy(np.float32)
    return df, test, labels


def _score_samples(df: pd.DataFrame, aligner_dir: Path, diag_dir: Path, dualenc_dir: Path, device: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
    """(r_align, diagnostic probabilities, image-report similarity) per sample, and the diagnostic model."""
    from medrl.models.dual_encoder import embed_images, embed_texts, load_dual_encoder
    from medrl.models.posture import load_aligner, predict_psi
    from medrl.models.xrv_diag import load_diag, predict_probs
    from medrl.rewards.align import align_reward

    images = torch.stack([load_image(p, mode="L") for p in progress(df["path"], desc="load samples")])
    aligner = load_aligner(aligner_dir, device=device)
    diag = load_diag(diag_dir, device=device)
    dualenc = load_dual_encoder(dualenc_dir, device=device)
    with torch.no_grad():
        r_align = align_reward(predict_psi(aligner, images)).cpu().numpy()
        probs = predict_probs(diag, images).numpy()
        sim = (embed_images(dualenc, images).cpu() * embed_texts(dualenc, df["prompt"].tolist()).cpu()).sum(-1).numpy()
    return r_align, probs, sim, diag


def _diagnostic_metrics(result: dict[str, Any], probs: np.ndarray, labels: np.ndarray, items: list[str],
                        reports: list[str], boot: dict[str, Any], *, diag_unmentioned: str,
                        weights: Mapping[str, float] | None, where: str) -> np.ndarray:
    """r_diag, the combined reward (with ``weights``), finding recall and positive rate into ``result``;
    returns r_diag per sample."""
    from medrl.metrics.bootstrap import bootstrap_ci
    from medrl.models.xrv_diag import finding_recall, label_accuracy

    r_diag = label_accuracy(torch.from_numpy(probs), labels, unmentioned=diag_unmentioned).numpy().astype(float)
    result["r_diag"] = bootstrap_ci(r_diag, items=items, clusters=reports, **boot)
    if weights is not None:
        result["reward"] = combined_reward(result, weights, where=where)
    # Reward-hacking check for r_diag: do the images still show the findings their reports state?
    recall = finding_recall(probs, labels)
    has_pos = ~np.isnan(recall)
    if has_pos.any():
        result["finding_recall"] = bootstrap_ci(recall[has_pos], items=[i for i, k in zip(items, has_pos) if k],
                                                clusters=[r for r, k in zip(reports, has_pos) if k], **boot)
    result["positive_rate"] = bootstrap_ci((probs >= 0.5).mean(axis=1).astype(float), items=items, clusters=reports,
                                           **boot)
    return r_diag


def _summary(result: dict[str, Any], n_images: int) -> dict[str, float]:
    """The point estimates evaluate_cxr_samples returns (for MLflow)."""
    summary = {"r_align": result["r_align"]["value"], "r_diag": result["r_diag"]["value"],
               "similarity": result["similarity"]["value"],
               "auroc_avg": result["auroc"]["avg"]["value"], "fid": result["fid"]["value"], "kid": result["kid"]["value"],
               "msssim": result["msssim"]["value"], "n_images": float(n_images),
               "finding_recall": result["finding_recall"]["value"] if "finding_recall" in result else float("nan"),
               "positive_rate": result["positive_rate"]["value"]}
    if "reward" in result:
        summary["reward"] = result["reward"]["value"]
    return summary
