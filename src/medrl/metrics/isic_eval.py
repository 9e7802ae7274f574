"""All RL4Med metrics of one model's samples, in the schema ``tables.rl4med`` reads.

APR and APR per prompt with the H=4 metric classifier (trained on a split disjoint from the
reward model's), the H=6 reward the policy optimised, a perceptual distance between real and
generated images of the same prompt, and FID/KID — each with a bootstrap CI over images,
resampled over the same items for every model so that "RL - SD" is a paired difference.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medrl.errors import DataError
from medrl.io import read_json, read_table, write_json, write_table
from medrl.progress import progress

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def effnet_penultimate(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Global-pooled EfficientNet features (1280-d), the classifier's penultimate layer."""
    return torch.flatten(net.avgpool(net.features(x)), 1)


def _real_by_prompt(prepared: Path) -> dict[str, list[Path]]:
    from medrl.data.prompts import slug

    prompts = read_json(prepared / "prompts.json")
    out = {}
    for p in prompts:
        folder = prepared / "real_by_prompt" / slug(p)
        out[p] = sorted(folder.glob("*.png")) if folder.is_dir() else []
    return out


def reward_head_breakdown(pred: np.ndarray, target: np.ndarray, heads: list[str], prompts: list[str]) -> dict[str, Any]:
    """Where the H=6 reward's signal is, head by head, on one model's samples.

    pred, target: (N, H) 0/1. Per head: ``match`` (share of images where the head agrees with
    the prompt), ``p_pred_asked`` / ``p_pred_not_asked`` (how often the head fires when the
    prompt asks for its label or not: a head that never fires cannot be rewarded for what the
    prompt asks) and ``within_prompt_var`` (mean over prompts of the variance of its match):
    DDPO's per-prompt advantage only sees within-prompt variation, so a head with none gives
    no learning signal. Also the reward's total and mean within-prompt variance.
    """
    pred, target = np.asarray(pred, dtype=float), np.asarray(target, dtype=float)
    if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != len(heads) or pred.shape[0] != len(prompts):
        raise ValueError(f"pred {pred.shape}, target {target.shape}: expected (len(prompts)={len(prompts)}, len(heads)={len(heads)})")
    match = (pred == target).astype(float)
    groups = pd.Series(range(len(prompts))).groupby(pd.Series(prompts)).indices.values()

    def within(x: np.ndarray) -> float:
        return float(np.mean([x[list(ix)].var() for ix in groups]))

    out: dict[str, Any] = {"heads": {}}
    for j, h in enumerate(heads):
        asked = target[:, j] == 1
        out["heads"][h] = {
            "match": float(match[:, j].mean()),
            "p_pred_asked": float(pred[asked, j].mean()) if asked.any() else float("nan"),
            "p_pred_not_asked": float(pred[~asked, j].mean()) if (~asked).any() else float("nan"),
            "within_prompt_var": within(match[:, j]),
        }
    reward = match.mean(axis=1)
    out.update(reward_var=float(reward.var()), reward_within_prompt_var=within(reward))
    return out


@torch.no_grad()
def vae_artifact_ceiling(stack_dir: str | Path, prepared_dir: str | Path, clf_h4_dir: str | Path, *, size: int,
                         n_boot: int, ci: float, seed: int, device: str = "cpu", max_images: int = 512,
                         batch_size: int = 32, split: str = "test") -> dict[str, Any]:
    """What APR can a generator on this stack's latents reach at all? The H=4 metric model on
    real held-out images as they are ("real") and after a round trip through the stack's VAE
    ("vae_roundtrip": encode, take the posterior mode, decode). If the VAE erases an artifact,
    no diffusion model sampling in its latent space can draw it recognisably.

    Per block: APR (exact artifact set, bootstrap CI) and, per head, AUROC and how often it fires
    on images that have the artifact (recall) and on images that do not. The tables read the test
    split; another ``split`` lets a render or judge be chosen without it."""
    from medrl.metrics.apr import exact_match
    from medrl.metrics.auroc import per_class_auroc
    from medrl.metrics.bootstrap import bootstrap_ci
    from medrl.models.classifiers import load_classifier
    from medrl.diffusion.stack import load_vae
    from medrl.diffusion.vae_train import load_images

    items = read_table(Path(prepared_dir) / "items.csv", ["path", "split"])
    test = items[items["split"] == split].head(max_images).reset_index(drop=True)
    if test.empty:
        raise DataError(f"{Path(prepared_dir) / 'items.csv'}: no rows with split == {split!r}; expected held-out images")
    h4 = load_classifier(clf_h4_dir, device=device)
    missing = [h for h in h4.heads if h not in test.columns]
    if missing:
        raise DataError(f"{Path(prepared_dir) / 'items.csv'}: missing label columns {missing} of the H=4 classifier")
    target = test[h4.heads].to_numpy(float)
    vae = load_vae(str(stack_dir), device=device)

    def classify(x01: torch.Tensor) -> np.ndarray:
        x01 = torch.nn.functional.interpolate(x01, size=(h4.size, h4.size), mode="bilinear", antialias=True,
                                              align_corners=False) if x01.shape[-1] != h4.size else x01
        return torch.sigmoid(h4(x01.to(device))).float().cpu().numpy()

    probs: dict[str, list[np.ndarray]] = {"real": [], "vae_roundtrip": []}
    paths = [Path(p) for p in test["path"]]
    for i in progress(range(0, len(paths), batch_size), desc="VAE ceiling", total=-(-len(paths) // batch_size)):
        x = load_images(paths[i:i + batch_size], size, "RGB").to(device)  # [-1, 1]
        z = vae.encode(x.to(vae.dtype)).latent_dist.mode()
        rec = vae.decode(z).sample.float().clamp(-1, 1)
        probs["real"].append(classify((x + 1) / 2))
        probs["vae_roundtrip"].append(classify((rec + 1) / 2))
    items_key = test["path"].astype(str).tolist()
    out: dict[str, Any] = {"n_images": len(test), "split": split, "heads": list(h4.heads)}
    for name, chunks in probs.items():
        pr = np.concatenate(chunks)
        fires = pr > 0.5
        has = target > 0.5
        out[name] = {
            "apr": bootstrap_ci(exact_match(pr, target).astype(float), items=items_key, n_boot=n_boot, ci=ci, seed=seed),
            "fires_when_present": {h: float(fires[has[:, k], k].mean()) if has[:, k].any() else None
                                   for k, h in enumerate(h4.heads)},
            "fires_when_absent": {h: float(fires[~has[:, k], k].mean()) if (~has[:, k]).any() else None
                                  for k, h in enumerate(h4.heads)},
            "auroc": {h: (None if np.isnan(v) else v) for h, v in per_class_auroc(has, pr, h4.heads).items()
                      if h != "avg"},
        }
    return out


def evaluate_isic_samples(samples_dir: Path, prepared_dir: Path, clf_h4_dir: Path, clf_h6_dir: Path, out_dir: Path,
                          *, metrics: dict[str, Any], device: str = "cpu", stack_dir: Path | None = None,
                          image_size: int | None = None) -> dict[str, float]:
    """Write ``out_dir/metrics.json`` (tables.rl4med schema) and ``out_dir/per_image.csv``.
    With ``stack_dir`` (and the VAE's ``image_size``) also the APR ceiling of that stack's VAE
    (``vae_artifact_ceiling``) under ``vae_ceiling``."""
    from medrl.metrics.apr import evaluate_apr
    from medrl.metrics.bootstrap import bootstrap_ci
    from medrl.metrics.fidelity import item_key
    from medrl.metrics.planted import APR_RATES, RATES, planted_apr, planted_rates, read_planted

    samples_dir, prepared_dir, out_dir = Path(samples_dir), Path(prepared_dir), Path(out_dir)
    n_boot, ci, seed = int(metrics["bootstrap"]), float(metrics["ci"]), int(metrics["seed"])

    per_image, apr_summary = evaluate_apr(samples_dir / "manifest.csv", clf_h4_dir, device=device)
    # Rows in a model-independent order so bootstrap resamples pair up across models.
    per_image["item"] = [item_key(Path(p)) for p in per_image["path"]]
    per_image = per_image.sort_values("item", kind="stable").reset_index(drop=True)
    items = per_image["item"].tolist()
    breakdown = _score_h6_reward(per_image, clf_h6_dir, device)

    boot = dict(n_boot=n_boot, ci=ci, seed=seed, keep_boot=True)
    result: dict[str, Any] = {
        "apr": bootstrap_ci(per_image["exact"].to_numpy(float), items=items, **boot),
        "reward": bootstrap_ci(per_image["reward"].to_numpy(float), items=items, **boot),
        "n_images": int(len(per_image)),
        "reward_heads": breakdown,
    }
    result["apr_per_prompt"] = {
        prompt: bootstrap_ci(g["exact"].to_numpy(float), items=g["item"].tolist(), **boot)
        for prompt, g in per_image.groupby("prompt", sort=True)
    }
    h4 = _fid_kid_against_real_test(result, per_image, prepared_dir, clf_h4_dir, metrics, device)
    pairs = _perceptual_against_real(result, per_image, prepared_dir, h4, metrics, device)

    extra: dict[str, float] = {}
    planted = read_planted(prepared_dir)
    if planted is not None:
        result["planted"] = {**planted_rates(per_image, planted, boot), **planted_apr(per_image, planted, boot)}
        result["planted_reward_judge"] = planted_rates(per_image, planted, boot, pred_prefix="h6_pred_")
        extra.update({f"planted_{k}": v["value"] for k, v in result["planted"].items()
                      if k in RATES or k in APR_RATES})
    if stack_dir is not None:
        if image_size is None:
            raise DataError("evaluate_isic_samples: stack_dir given without image_size (the VAE's input size)")
        vc = vae_artifact_ceiling(stack_dir, prepared_dir, clf_h4_dir, size=image_size, n_boot=n_boot, ci=ci,
                                  seed=seed, device=device)
        result["vae_ceiling"] = vc
        for name in ("real", "vae_roundtrip"):
            extra[f"ceiling_apr_{name}"] = vc[name]["apr"]["value"]
            extra.update({f"ceiling_recall_{name}_{h}": v for h, v in vc[name]["fires_when_present"].items()
                          if v is not None})

    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(per_image, out_dir / "per_image.csv")
    write_table(pairs, out_dir / "perceptual_pairs.csv")
    write_json(out_dir / "metrics.json", result)
    return {"apr": result["apr"]["value"], "reward": result["reward"]["value"], "fid": result["fid"]["value"],
            "kid": result["kid"]["value"], "perceptual": result["perceptual"]["value"],
            "n_images": float(len(per_image)), "reward_within_prompt_var": breakdown["reward_within_prompt_var"],
            **{f"h6_within_var_{h}": v["within_prompt_var"] for h, v in breakdown["heads"].items()},
            **{f"h4_{k}": v for k, v in apr_summary.items() if k.startswith("acc_")}, **extra}


def _score_h6_reward(per_image: pd.DataFrame, clf_h6_dir: Path, device: str) -> dict[str, Any]:
    """The H=6 reward the policy was trained on, re-scored on the held-out-seed samples: adds the
    ``reward`` and ``h6_pred_<head>`` columns to ``per_image``; returns the per-head breakdown."""
    from medrl.data.prompts import HEADS6, prompt_to_labels
    from medrl.models.classifiers import load_classifier, predict_probs
    from medrl.rewards.isic import match_reward

    h6 = load_classifier(clf_h6_dir, device=device)
    probs6 = torch.from_numpy(predict_probs(h6, per_image, device=device, desc="H=6 reward"))
    order = [h6.heads.index(h) for h in HEADS6]
    target6 = torch.tensor([[prompt_to_labels(p)[h] for h in HEADS6] for p in per_image["prompt"]], dtype=torch.float32)
    per_image["reward"] = match_reward(probs6[:, order], target6).numpy()
    pred6 = (probs6[:, order] > 0.5).numpy()
    for j, h in enumerate(HEADS6):
        per_image[f"h6_pred_{h}"] = pred6[:, j].astype(int)
    return reward_head_breakdown(pred6, target6.numpy(), list(HEADS6), per_image["prompt"].tolist())


def _fid_kid_against_real_test(result: dict[str, Any], per_image: pd.DataFrame, prepared_dir: Path, clf_h4_dir: Path,
                               metrics: dict[str, Any], device: str) -> Any:
    """FID / KID of the generated images vs the held-out real test images (into ``result``); returns
    the H=4 metric classifier (its features stand in when no Inception weights are given)."""
    from medrl.metrics.fidelity import INCEPTION, ModuleExtractorSpec, fid_kid
    from medrl.models.classifiers import load_classifier

    n_boot, ci, seed = int(metrics["bootstrap"]), float(metrics["ci"]), int(metrics["seed"])
    prepared_items = read_table(prepared_dir / "items.csv", ["path", "split"])
    real_test = [Path(p) for p in prepared_items.loc[prepared_items.split == "test", "path"]]
    h4 = load_classifier(clf_h4_dir, device=device)
    if metrics.get("inception_weights"):
        extractor: Any = INCEPTION
    else:
        extractor = ModuleExtractorSpec(module=h4.net, name="EfficientNet-B0 H=4 metric classifier (phantom-trained), 1280-d",
                                        features=effnet_penultimate, input_size=h4.size, in_channels=3,
                                        mean=IMAGENET_MEAN, std=IMAGENET_STD)
    fk = fid_kid(real_test, [Path(p) for p in per_image["path"]], extractor=extractor,
                 weights_path=metrics.get("inception_weights"), kid_subset_size=int(metrics["kid_subset_size"]),
                 device=device, n_boot=n_boot, ci=ci, seed=seed, standardize=not metrics.get("inception_weights"))
    result.update(fid=fk["fid_metric"], kid=fk["kid_metric"], feature_extractor=fk["feature_extractor"])
    return h4


def _perceptual_against_real(result: dict[str, Any], per_image: pd.DataFrame, prepared_dir: Path, h4: Any,
                             metrics: dict[str, Any], device: str) -> pd.DataFrame:
    """Perceptual distance between real and generated images of the same prompt (into ``result``);
    returns the scored pairs."""
    from medrl.metrics.perceptual import (EFFICIENTNET_B0_TAPS, construction_name, lpips_from_local,
                                          perceptual_net_from_sequential)

    n_boot, ci, seed = int(metrics["bootstrap"]), float(metrics["ci"]), int(metrics["seed"])
    if metrics.get("lpips_weights"):
        net = lpips_from_local(metrics["lpips_weights"])
    else:
        net = perceptual_net_from_sequential(h4.net.features, EFFICIENTNET_B0_TAPS,
                                             name=construction_name("EfficientNet-B0 H=4 (phantom-trained)"),
                                             input_size=h4.size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    fake_by_prompt = {p: [Path(x) for x in g["path"]] for p, g in per_image.groupby("prompt", sort=True)}
    pairs, perc = perceptual_distance_call(_real_by_prompt(prepared_dir), fake_by_prompt, net, seed, device, n_boot, ci)
    result["perceptual"] = {k: perc[k] for k in ("value", "lo", "hi", "n", "ci", "method", "boot", "boot_key") if k in perc}
    result["perceptual_name"] = perc["name"]
    if perc.get("prompts_skipped"):
        result["perceptual_prompts_skipped"] = perc["prompts_skipped"]
    return pairs


def perceptual_distance_call(real_by_prompt, fake_by_prompt, net, seed, device, n_boot, ci) -> tuple[pd.DataFrame, dict]:
    from medrl.metrics.perceptual import perceptual_distance

    n_real = min((len(v) for v in real_by_prompt.values() if v), default=0)
    if n_real == 0:
        raise DataError("real_by_prompt: no real test images for any prompt; expected prepared/real_by_prompt/<slug>/*.png")
    # every (real, fake) pair of a prompt, capped so the cost stays linear in the sample count
    n_fake = max(len(v) for v in fake_by_prompt.values())
    return perceptual_distance(real_by_prompt, fake_by_prompt, net=net, pairs_per_prompt=min(64, n_real * n_fake),
                               seed=seed, device=device, n_boot=n_boot, ci=ci)


__all__ = ["evaluate_isic_samples"]
