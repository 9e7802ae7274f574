"""The planted deficiencies of the phantom worlds, measured on generated images.

ISIC: the phantom generator misstates one artifact in the fine-tune captions of one lesion
(``planted.json``, see ``data.phantoms.derm.planted_captions``), so the base model draws that
artifact at a known low rate where such a prompt asks for it, and at a known high rate where it
does not. The same artifact on the other lesion's prompts, whose captions are truthful, is the
reference a model without the deficiency reaches. All rates come from the H=4 metric classifier,
which was not the reward.

CXR: ``prepare_cxr`` overclaims one finding in the anchor's fine-tune reports and leaves most
images showing it out of that fine-tune (``data.planted_reports``), so the anchor draws it at a
low rate where a report states it (``finding_rates``); the target is what the VAE can show
(``vae_finding_ceiling``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from medrl.io import read_json

# rate name -> (prompt of the planted lesion?, prompt asks for the artifact?)
RATES = {
    "rate": (True, True),  # planted: the artifact where asked (low)
    "false_rate": (True, False),  # planted: the artifact where not asked (high)
    "reference_rate": (False, True),  # other lesion, truthful captions
    "reference_false_rate": (False, False),
}
# APR (H=4 exact-set match) on the prompts asking for the artifact: name -> of the planted lesion?
APR_RATES = {"apr_rate": True, "reference_apr_rate": False}
# each rate -> its reference: the same group on the other lesion's prompts (truthful captions)
REFERENCES = {"rate": "reference_rate", "false_rate": "reference_false_rate", "apr_rate": "reference_apr_rate"}


def read_planted(prepared_dir: Path) -> dict[str, Any] | None:
    """The generator's planted.json copied into the prepared data, or None (real data, none planted)."""
    path = Path(prepared_dir) / "planted.json"
    return read_json(path) if path.is_file() else None


def planted_rates(per_image: pd.DataFrame, planted: Mapping[str, Any], boot: Mapping[str, Any],
                  pred_prefix: str = "pred_") -> dict[str, Any]:
    """Bootstrap CIs (paired by ``item``) of how often a judge finds the planted artifact, per RATES
    group. ``per_image`` needs ``prompt``, ``item``, ``target_<artifact>`` and
    ``<pred_prefix><artifact>``: ``pred_`` is the H=4 evaluator (metrics.apr.evaluate_apr),
    ``h6_pred_`` the reward classifier (the paper's protocol)."""
    from medrl.metrics.bootstrap import bootstrap_ci

    of_lesion, asked = _planted_masks(per_image, planted)
    pred = per_image[f"{pred_prefix}{planted['artifact']}"].to_numpy(float)
    out: dict[str, Any] = {"planted": dict(planted)}
    for name, (want_lesion, want_asked) in RATES.items():
        mask = (of_lesion == want_lesion) & (asked == want_asked)
        if mask.any():
            out[name] = bootstrap_ci(pred[mask], items=per_image.loc[mask, "item"].tolist(), **boot)
    return out


def planted_apr(per_image: pd.DataFrame, planted: Mapping[str, Any], boot: Mapping[str, Any]) -> dict[str, Any]:
    """Bootstrap CIs of APR (``exact``: the H=4 evaluator's artifact set equals the prompt's) on the
    prompts asking for the planted artifact: the planted lesion's, where the base under-draws it
    (``apr_rate``), and the other lesion's (``reference_apr_rate``). Overall APR averages these
    prompts with the many the plant does not touch."""
    from medrl.metrics.bootstrap import bootstrap_ci

    of_lesion, asked = _planted_masks(per_image, planted)
    exact = per_image["exact"].to_numpy(float)
    out: dict[str, Any] = {}
    for name, want_lesion in APR_RATES.items():
        mask = (of_lesion == want_lesion) & asked
        if mask.any():
            out[name] = bootstrap_ci(exact[mask], items=per_image.loc[mask, "item"].tolist(), **boot)
    return out


def _planted_masks(per_image: pd.DataFrame, planted: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: is the prompt of the planted lesion, and does it ask for the planted artifact."""
    from medrl.data.prompts import prompt_to_labels

    of_lesion = np.array([prompt_to_labels(p)[planted["lesion"]] == 1 for p in per_image["prompt"]])
    asked = per_image[f"target_{planted['artifact']}"].to_numpy() == 1
    return of_lesion, asked


def finding_rates(per_image: pd.DataFrame, stated: np.ndarray, planted: Mapping[str, Any], boot: Mapping[str, Any],
                  prob_prefix: str = "eval_prob_") -> dict[str, Any]:
    """CXR: bootstrap CIs, resampling whole reports (``prompt_id``), of how often a diagnostic judge
    finds the planted finding (p >= 0.5) on images whose report states it (``rate``: low for the
    anchor) and on the others (``false_rate``). ``stated``: per row of ``per_image``, does its
    report state the finding; ``eval_prob_`` is the independent evaluator, ``prob_`` the reward's judge."""
    from medrl.metrics.bootstrap import bootstrap_ci

    fires = (per_image[f"{prob_prefix}{planted['finding']}"].to_numpy(float) >= 0.5).astype(float)
    out: dict[str, Any] = {"planted": dict(planted)}
    for name, mask in (("rate", stated), ("false_rate", ~stated)):
        if mask.any():
            out[name] = bootstrap_ci(fires[mask], items=per_image.loc[mask, "item"].tolist(),
                                     clusters=per_image.loc[mask, "prompt_id"].astype(str).tolist(), **boot)
    return out


def ceiling_rates(vae_ceiling: Mapping[str, Any] | None, artifact: str,
                  keys: tuple[str, str] = ("fires_when_present", "fires_when_absent")) -> dict[str, float] | None:
    """What a model that follows every prompt would score under the evaluator: how often it finds
    the artifact (or CXR finding) on real test images after a round trip through the VAE (present:
    the asked rate's target; absent: the false rate's). ``vae_ceiling``: ISIC's
    ``metrics.isic_eval.vae_artifact_ceiling``; for CXR the evaluator's block of
    ``metrics.cxr_eval.vae_finding_ceiling`` with ``keys=("recall", "false_rate")``."""
    if not vae_ceiling:
        return None
    rt = vae_ceiling["vae_roundtrip"]
    present, absent = rt[keys[0]].get(artifact), rt[keys[1]].get(artifact)
    if present is None or absent is None:
        return None
    return {"rate": float(present), "false_rate": float(absent)}


def gap_closed(sd: Mapping[str, Any], rl: Mapping[str, Any], target: Mapping[str, float] | None = None
               ) -> dict[str, float | None]:
    """Share of the planted gap RL closed, (RL - SD) / (target - SD), for the asked rate and the APR
    on those prompts (should rise) and the false rate (should fall). ``target``: ``ceiling_rates``
    (a model that follows every prompt, seen through the VAE; it has no APR per prompt group);
    without it, SD's own rates on the other lesion's prompts. None where there is no gap to
    close: the goal lies within SD's own 95 % interval (where SD reports one), so any share
    would divide by sampling noise."""
    out: dict[str, float | None] = {}
    for name, ref in REFERENCES.items():
        if name not in sd or name not in rl or (target is not None and name not in target):
            continue
        goal = target[name] if target is not None else (sd[ref]["value"] if ref in sd else None)
        out[name] = share_closed(sd[name], rl[name], goal)
    return out


def share_closed(before: Mapping[str, Any], after: Mapping[str, Any], goal: float | None) -> float | None:
    """(after - before) / (goal - before) of two ``{"value", "lo", "hi"}`` statistics: the share of
    the gap to ``goal`` that the change closed. None where there is no gap: no goal, or the goal
    lies within ``before``'s own interval (any share would divide by sampling noise)."""
    if goal is None or _within_ci(goal, before):
        return None
    gap = goal - before["value"]
    return (after["value"] - before["value"]) / gap if abs(gap) > 1e-9 else None


def _within_ci(x: float, stat: Mapping[str, Any]) -> bool:
    return "lo" in stat and "hi" in stat and stat["lo"] <= x <= stat["hi"]
