"""All CXRL metrics of one model's samples, in the schema ``tables.cxrl`` reads.

r_align (posture aligner), AUROC per pathology of the diagnostic DenseNet-121 on generated
images against the report labels, r_diag (the training reward's label accuracy, read as
``rl.cxr.diag_unmentioned``), image-report cosine similarity (dual encoder, = r_consist), the
variant's combined reward on the held-out reports when its weights are given, FID/KID with
the CXR DenseNet-121's pooled features (always: ``metrics.inception_weights`` is ISIC's), and
MS-SSIM between samples of the same report. Every metric that a network judges is computed
twice: by the reward networks (the paper's protocol; keys as named) and by the independent
evaluators (``eval_``-prefixed keys), trained on the other half of the train pairs with another
seed and width; ``judges`` holds each network's accuracy on the held-out real test pairs against
exact ground truth (phantoms: true posture psi and true findings); with the stack's VAE given,
``vae_ceiling`` holds what each diagnostic judge reads on those real images after a VAE round
trip: the best a generator on this stack's latents can score. Every metric carries a bootstrap
CI; the samples of one report are not independent, so the CIs resample *reports* (cluster
bootstrap over ``prompt_id``), not images. Rows are ordered by a model-independent key and
resampled with the same seed, so "CXRL - other" differences are paired.

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


# Every judge-dependent metric is written twice: by the reward nets (the paper's protocol, keys as
# named) and by the independent evaluators (the same keys prefixed "eval_"): networks of another
# width, seed and half of the train pairs (workflow/graph.py, classifiers.cxr_eval). MS-SSIM uses
# no network and is written once.
JUDGE_PREFIX = {"reward": "", "eval": "eval_"}
JUDGED_KEYS = ("r_align", "similarity", "auroc", "r_diag", "reward", "finding_recall", "positive_rate", "fid", "kid",
               "feature_extractor")
NETS = ("aligner", "diag", "dualenc")


def evaluate_cxr_samples(samples_dir: Path, prepared_dir: Path, aligner_dir: Path, diag_dir: Path, dualenc_dir: Path,
                         out_dir: Path, *, evaluators: Mapping[str, Path], metrics: dict[str, Any],
                         device: str = "cpu", diag_unmentioned: str = "ignore",
                         weights: Mapping[str, float] | None = None,
                         independent: Mapping[str, bool] | None = None,
                         stack_dir: Path | None = None) -> dict[str, float]:
    """Write ``out_dir/metrics.json`` (tables.cxrl schema) and ``out_dir/per_image.csv``.

    ``evaluators``: {"aligner", "diag", "dualenc"} -> the independent evaluators' directories;
    every judged metric (``JUDGED_KEYS``) is computed with the reward nets and again, prefixed
    ``eval_``, with the evaluators. ``held_out_split``: the pairs the samples' reports came from
    (test or validate). ``judges`` holds each judge's accuracy on those real pairs
    (``judge_accuracy``) and, per evaluator, whether it is ``independent``
    (default: all; false when it is the released reward network itself).

    ``weights`` ({"l_align", "l_diag", "l_consist"}, a variant's) adds ``reward``: the combined
    *direct* reward on the held-out reports. With RLCF the training reward subtracts the
    anchor's score for the same report, so ``reward(variant) - reward(anchor)`` (paired,
    ``medrl.metrics.bootstrap.linear_combination``) is the held-out RLCF reward.

    ``stack_dir`` (the stack whose VAE the samples were decoded by) adds ``vae_ceiling``
    (``vae_finding_ceiling``) for the reward and the evaluator diagnostic models."""
    from medrl.metrics.msssim import msssim_within_groups
    from medrl.models.xrv_diag import TRAIN_UNMENTIONED

    samples_dir, prepared_dir, out_dir = Path(samples_dir), Path(prepared_dir), Path(out_dir)
    missing = [n for n in NETS if n not in evaluators]
    if missing:
        raise DataError(f"evaluators: no directory for {missing}; expected the independent {list(NETS)}")
    n_boot, ci, seed = int(metrics["bootstrap"]), float(metrics["ci"]), int(metrics["seed"])
    df, test, labels = _samples_with_labels(samples_dir, prepared_dir)
    images = torch.stack([load_image(p, mode="L") for p in progress(df["path"], desc="load samples")])
    ctx = _Judging(df, test, labels, images, dict(n_boot=n_boot, ci=ci, seed=seed, keep_boot=True),
                   int(metrics["kid_subset_size"]), device, diag_unmentioned, weights, str(out_dir))
    indep = {n: bool((independent or {}).get(n, True)) for n in NETS}
    result: dict[str, Any] = {"auroc_unmentioned": TRAIN_UNMENTIONED, "n_images": int(len(df)),
                              "n_reports": int(df["prompt_id"].astype(str).nunique()), "bootstrap_unit": "report",
                              "held_out_split": str(test["split"].iloc[0]), "judges": {}}
    per_image = df.copy()
    for judge, dirs in (("reward", {"aligner": aligner_dir, "diag": diag_dir, "dualenc": dualenc_dir}),
                        ("eval", evaluators)):
        pre = JUDGE_PREFIX[judge]
        part, cols, acc = _judge_metrics(ctx, {n: Path(dirs[n]) for n in NETS})
        result.update({pre + k: v for k, v in part.items()})
        per_image = per_image.assign(**{pre + k: v for k, v in cols.items()})
        result["judges"][judge] = {n: {**acc[n], "independent": indep[n] if judge == "eval" else False}
                                   for n in NETS}

    _planted_finding(result, per_image, labels, prepared_dir, ctx.boot)
    if stack_dir is not None:
        result["vae_ceiling"] = vae_finding_ceiling(Path(stack_dir), test, {"reward": Path(diag_dir),
                                                                          "eval": Path(evaluators["diag"])},
                                                    size=int(images.shape[-1]), device=device)
    groups = {pid: [Path(p) for p in g["path"]] for pid, g in df.groupby("prompt_id", sort=True)}
    ms_pairs, ms = msssim_within_groups(groups, channels="L", device=device, n_boot=n_boot, ci=ci, seed=seed)
    result["msssim"] = {k: ms[k] for k in ("value", "lo", "hi", "n", "ci", "method", "boot", "boot_key") if k in ms}

    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(per_image, out_dir / "per_image.csv")
    write_table(ms_pairs, out_dir / "msssim_pairs.csv")
    write_json(out_dir / "metrics.json", result)
    return _summary(result, len(df))


def _planted_finding(result: dict[str, Any], per_image: pd.DataFrame, labels: np.ndarray, prepared_dir: Path,
                     boot: Mapping[str, Any]) -> None:
    """The planted finding's rates (``metrics.planted.finding_rates``) under the evaluator
    (``planted``) and the reward's judge (``planted_reward_judge``), where prepare planted one."""
    from medrl.data.reports import PATHOLOGIES
    from medrl.metrics.planted import finding_rates, read_planted

    planted = read_planted(prepared_dir)
    if planted is None:
        return
    stated = labels[:, list(PATHOLOGIES).index(planted["finding"])] == 1
    result["planted"] = finding_rates(per_image, stated, planted, boot, prob_prefix="eval_prob_")
    result["planted_reward_judge"] = finding_rates(per_image, stated, planted, boot, prob_prefix="prob_")


class _Judging:
    """What scoring one model's samples with one judge needs (the same for both judges)."""

    def __init__(self, df: pd.DataFrame, test: pd.DataFrame, labels: np.ndarray, images: torch.Tensor,
                 boot: dict[str, Any], kid_subset_size: int, device: str, diag_unmentioned: str,
                 weights: Mapping[str, float] | None, where: str) -> None:
        self.df, self.test, self.labels, self.images, self.boot = df, test, labels, images, boot
        self.kid_subset_size, self.device, self.diag_unmentioned = kid_subset_size, device, diag_unmentioned
        self.weights, self.where = weights, where
        self.items = df["item"].tolist()
        self.reports = df["prompt_id"].astype(str).tolist()  # the cluster of each image: its report


def _judge_metrics(j: _Judging, dirs: Mapping[str, Path]) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                                                   dict[str, dict[str, Any]]]:
    """One judge's metrics of the samples (unprefixed JUDGED_KEYS), its per-image columns, and its
    accuracy on the held-out real test pairs."""
    from medrl.data.reports import PATHOLOGIES
    from medrl.metrics.auroc import auroc_with_ci
    from medrl.metrics.bootstrap import bootstrap_ci
    from medrl.metrics.fidelity import fid_kid
    from medrl.models.xrv_diag import TRAIN_UNMENTIONED

    nets = _load_nets(dirs, j.device)
    r_align, probs, sim = _score(nets, j.images, j.df["prompt"].tolist())
    boot, items, reports = j.boot, j.items, j.reports
    result: dict[str, Any] = {
        "r_align": bootstrap_ci(r_align.astype(float), items=items, clusters=reports, **boot),
        "similarity": bootstrap_ci(sim.astype(float), items=items, clusters=reports, **boot),
        "auroc": auroc_with_ci(j.labels, probs, list(PATHOLOGIES), items=items, clusters=reports,
                               nan_as_negative=TRAIN_UNMENTIONED == "negative",
                               **{k: boot[k] for k in ("n_boot", "ci", "seed")}),
    }
    r_diag = _diagnostic_metrics(result, probs, j.labels, items, reports, boot, diag_unmentioned=j.diag_unmentioned,
                                 weights=j.weights, where=f"{j.where}: reward")
    # always the CXR DenseNet (CXRL Table 2a); metrics.inception_weights is for ISIC's FID only
    fk = fid_kid([Path(p) for p in j.test["path"]], [Path(p) for p in j.df["path"]],
                 extractor=cxr_fid_extractor(nets["diag"]), weights_path=None, kid_subset_size=j.kid_subset_size,
                 device=j.device, fake_clusters=dict(zip(items, reports)),
                 **{k: boot[k] for k in ("n_boot", "ci", "seed")})
    result.update(fid=fk["fid_metric"], kid=fk["kid_metric"], feature_extractor=fk["feature_extractor"])
    cols = {"r_align": r_align, "r_diag": r_diag, "similarity": sim,
            **{f"prob_{c}": probs[:, i] for i, c in enumerate(PATHOLOGIES)}}
    return result, cols, judge_accuracy(nets, j.test, size=int(j.images.shape[-1]))


def _load_nets(dirs: Mapping[str, Path], device: str) -> dict[str, Any]:
    from medrl.models.dual_encoder import load_dual_encoder
    from medrl.models.posture import load_aligner
    from medrl.models.xrv_diag import load_diag

    return {"aligner": load_aligner(dirs["aligner"], device=device), "diag": load_diag(dirs["diag"], device=device),
            "dualenc": load_dual_encoder(dirs["dualenc"], device=device)}


def _score(nets: Mapping[str, Any], images: torch.Tensor, prompts: list[str]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(r_align, diagnostic probabilities, image-report similarity) per image."""
    from medrl.models.dual_encoder import embed_images, embed_texts
    from medrl.models.posture import predict_psi
    from medrl.models.xrv_diag import predict_probs
    from medrl.rewards.align import align_reward

    with torch.no_grad():
        r_align = align_reward(predict_psi(nets["aligner"], images)).cpu().numpy()
        probs = predict_probs(nets["diag"], images).numpy()
        sim = (embed_images(nets["dualenc"], images).cpu() * embed_texts(nets["dualenc"], prompts).cpu()).sum(-1).numpy()
    return r_align, probs, sim


def judge_accuracy(nets: Mapping[str, Any], test: pd.DataFrame, *, size: int) -> dict[str, dict[str, Any]]:
    """Each network's accuracy on the held-out real test pairs, against exact ground truth where
    the data has it: ``aligner``: psi error against the true posture (phantoms; ``None`` without
    psi columns), ``diag``: AUROC per finding against ``gt_<class>`` (else the report labels, as
    ``reference`` says), ``dualenc``: image<->report retrieval (recall@k, ``i2t_auroc``)."""
    from medrl.models.dual_encoder import embed_images, embed_texts, retrieval_metrics
    from medrl.models.posture import psi_accuracy, psi_columns
    from medrl.models.xrv_diag import diag_accuracy, predict_probs

    x = torch.stack([load_image(p, size=size, mode="L") for p in test["path"]])
    cols = psi_columns(test)
    aligner = psi_accuracy(nets["aligner"], x, torch.tensor(test[cols].to_numpy(np.float32))) if cols else None
    with torch.no_grad():
        diag = diag_accuracy(predict_probs(nets["diag"], x).numpy(), test)
        texts = [str(t) for t in test["impression"]]
        dualenc = {"n": int(len(test)), **retrieval_metrics(embed_images(nets["dualenc"], x).cpu(),
                                                            embed_texts(nets["dualenc"], texts).cpu(), texts)}
    return {"aligner": {"psi": aligner, "reference": "exact posture psi" if cols else "none (no psi columns)"},
            "diag": diag, "dualenc": dualenc}


def vae_finding_ceiling(stack_dir: Path, test: pd.DataFrame, diag_dirs: Mapping[str, Path], *, size: int,
                        device: str = "cpu") -> dict[str, Any]:
    """What can a generator on this stack's latents show at all? Each diagnostic model of
    ``diag_dirs`` (judge -> directory) on the held-out real images as they are ("real") and after
    a round trip through the stack's VAE ("vae_roundtrip": encode, posterior mode, decode), per
    finding (``finding_accuracy``). A finding the round trip erases is one no RL reward can make
    the generator draw recognisably."""
    from medrl.diffusion.stack import load_vae
    from medrl.diffusion.vae_train import load_images
    from medrl.models.xrv_diag import load_diag, predict_probs

    x = load_images([Path(p) for p in test["path"]], size, "L")  # [-1, 1], grey repeated to 3 channels
    vae = load_vae(str(stack_dir), device=device)
    with torch.no_grad():
        rt = torch.cat([vae.decode(vae.encode(b.to(device)).latent_dist.mode()).sample.float().clamp(-1, 1).cpu()
                        for b in x.split(64)])
    out: dict[str, Any] = {"n_images": int(len(test))}
    for judge, d in diag_dirs.items():
        net = load_diag(d, device=device)
        out[judge] = {name: finding_accuracy(predict_probs(net, ((imgs + 1) / 2).mean(1, keepdim=True)).numpy(), test)
                      for name, imgs in (("real", x), ("vae_roundtrip", rt))}
    return out


def finding_accuracy(probs: np.ndarray, test: pd.DataFrame) -> dict[str, Any]:
    """Per finding: ``auroc`` against the report labels, read as the samples' AUROC is
    (unmentioned per ``xrv_diag.TRAIN_UNMENTIONED``, uncertain ignored), so a generator's AUROC and
    this one compare like for like; ``auroc_exact`` against the exact labels where the data has
    them (``xrv_diag.diag_accuracy``); and how often the model fires (p >= 0.5) on images that
    have the finding (``recall``) and on those that do not (``false_rate``), by the exact labels
    where present, else the report's."""
    from medrl.data.reports import PATHOLOGIES
    from medrl.metrics.auroc import per_class_auroc
    from medrl.models.xrv_diag import TRAIN_UNMENTIONED, diag_accuracy

    classes = list(PATHOLOGIES)
    auroc = per_class_auroc(test[classes].to_numpy(np.float64), probs, classes,
                            nan_as_negative=TRAIN_UNMENTIONED == "negative")
    exact = diag_accuracy(probs, test)
    recall, false_rate = {}, {}
    for j, c in enumerate(classes):
        y = test[f"gt_{c}"].to_numpy(float) if f"gt_{c}" in test.columns else test[c].to_numpy(float)
        fires = probs[:, j] >= 0.5
        recall[c] = float(fires[y == 1].mean()) if (y == 1).any() else None
        false_rate[c] = float(fires[y == 0].mean()) if (y == 0).any() else None
    return {"n": int(len(test)), "auroc": auroc, "auroc_exact": exact["auroc"], "exact_reference": exact["reference"],
            "recall": recall, "false_rate": false_rate}


def _samples_with_labels(samples_dir: Path, prepared_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """(samples manifest in a model-independent order, the held-out pairs by image, labels of each
    sample's report). The held-out pairs are the split (test or validate) the samples' reports came
    from: the real images that FID and the judges' accuracy are measured on."""
    from medrl.data.reports import PATHOLOGIES
    from medrl.metrics.apr import read_manifest
    from medrl.metrics.fidelity import item_key

    df = read_manifest(samples_dir / "manifest.csv")
    df["item"] = [item_key(Path(p)) for p in df["path"]]
    df = df.sort_values("item", kind="stable").reset_index(drop=True)
    pairs = read_table(prepared_dir / "pairs.csv", ["image", "split", "impression", "path", *PATHOLOGIES])
    pairs = pairs.astype({"image": str})
    ids = set(df["prompt_id"].astype(str))
    held_out = None
    for name in ("test", "validate"):
        rows = pairs[pairs.split == name].drop_duplicates("image").set_index("image")
        if len(rows) and ids <= set(rows.index):
            held_out = rows
            break
    if held_out is None:
        raise DataError(f"{samples_dir / 'manifest.csv'}: prompt_id {sorted(ids)[:3]}... not all among the test "
                        f"pairs nor all among the validate pairs of {prepared_dir / 'pairs.csv'}; expected samples "
                        f"generated from one held-out split's reports")
    labels = held_out.loc[df["prompt_id"].astype(str), list(PATHOLOGIES)].to_numpy(np.float32)
    return df, held_out, labels


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
    """The point estimates evaluate_cxr_samples returns (for MLflow), for both judges."""
    summary = {"msssim": result["msssim"]["value"], "n_images": float(n_images)}
    for pre in JUDGE_PREFIX.values():
        summary.update({pre + k: result[pre + k]["value"] for k in ("r_align", "r_diag", "similarity", "fid", "kid",
                                                                    "positive_rate")})
        summary[pre + "auroc_avg"] = result[pre + "auroc"]["avg"]["value"]
        fr = result.get(pre + "finding_recall")
        summary[pre + "finding_recall"] = fr["value"] if fr else float("nan")
        if pre + "reward" in result:
            summary[pre + "reward"] = result[pre + "reward"]["value"]
    summary.update({f"planted_{k}": v["value"] for k, v in result.get("planted", {}).items() if k != "planted"})
    return summary
