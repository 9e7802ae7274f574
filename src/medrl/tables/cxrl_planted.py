"""cxrl_planted: the planted CXR deficiency (``metrics.planted.finding_rates``), anchor vs each
CXRL variant, and the share of the anchor's gap to the VAE ceiling that each variant closed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from medrl.errors import DataError
from medrl.metrics.bootstrap import diff_from_boot
from medrl.metrics.planted import ceiling_rates, share_closed
from medrl.tables.render import Recorder, fmt_pct, fmt_share, write_with_values

_JUDGES = (("planted", "evaluator"), ("planted_reward_judge", "reward judge"))


def planted_target(anchor: Mapping[str, Any], finding: str) -> dict[str, float] | None:
    """What a generator that draws every stated finding scores: the evaluator's firing rate on real
    held-out images with / without the finding after a VAE round trip (the anchor's ``vae_ceiling``)."""
    vc = anchor.get("vae_ceiling")
    return ceiling_rates(vc["eval"], finding, keys=("recall", "false_rate")) if vc else None


def build_cxrl_planted_table(metrics: Mapping[str, Mapping[str, Any]], run_ids: Mapping[str, str],
                             out_dir: str | Path, *, labels: Mapping[str, str], notes: Sequence[str] = ()
                             ) -> dict[str, str] | None:
    """Write ``cxrl_planted`` when the anchor's metrics carry a planted finding; None otherwise.
    ``metrics``/``run_ids``: model -> metrics JSON / MLflow run (``anchor`` first); ``labels``: model -> row name."""
    anchor = metrics["anchor"]
    if "planted" not in anchor:
        return None
    plant = anchor["planted"]["planted"]
    target = planted_target(anchor, plant["finding"])
    rec = Recorder("cxrl_planted")
    rows = []
    for model, m in metrics.items():
        if "planted" not in m:
            raise DataError(f"{model}: metrics have no 'planted' block although the anchor's do; expected every "
                            "model scored on the same prepared data")
        rows.append(_row(rec, model, labels.get(model, model), m, anchor, run_ids, target))
    return write_with_values(pd.DataFrame(rows), Path(out_dir) / "cxrl_planted", rec,
                             caption=f"CXRL: the planted {plant['finding'].lower()} gap, anchor vs CXRL variants",
                             label="tab:cxrl-planted", notes=[*notes, _note(plant, target)])


def _row(rec: Recorder, model: str, label: str, m: Mapping[str, Any], anchor: Mapping[str, Any],
         run_ids: Mapping[str, str], target: Mapping[str, float] | None) -> dict[str, str]:
    run = str(run_ids.get(model, ""))
    pair = f"{run} - {run_ids.get('anchor', '')}"
    row = {"Model": label}
    for block, judge in _JUDGES:
        for key, words in (("rate", "stated"), ("false_rate", "not stated")):
            col = f"finding drawn, report {words} ({judge})"
            row[col] = rec.ours(label, col, m[block].get(key), model=model, run_id=run, digits=3)
    if model != "anchor":
        for key, words in (("rate", "stated"), ("false_rate", "not stated")):
            col = f"- anchor, report {words} (evaluator)"
            a, b = m["planted"].get(key), anchor["planted"].get(key)  # absent: no held-out report of that kind
            d = diff_from_boot(a, b, where=f"{model} - anchor (planted {key})") if a and b else None
            row[col] = rec.ours(label, col, d, model=f"{model}-anchor", run_id=pair, digits=3, source="diff")
        goal = target["rate"] if target is not None else None
        a, b = m["planted"].get("rate"), anchor["planted"].get("rate")
        row["gap to ceiling closed (evaluator)"] = fmt_share(share_closed(b, a, goal) if a and b else None)
    return row


def _note(plant: Mapping[str, Any], target: Mapping[str, float] | None) -> str:
    f = plant["finding"]
    text = (f"Planted deficiency: of the {plant['n_stated_true']} training images whose report states {f}, "
            f"{plant['n_kept']} stay in the anchor's fine-tune set (share {plant['finetune_share']:.2f}), and in "
            f"{plant['n_overclaimed']} fine-tune reports (a share {plant['overclaim']:.2f} of those that do not state "
            f"it) the caption claims {f} although the image does not show it: the anchor sees {f} stated with the "
            f"finding on {plant['planted_rate']:.2f} of its images (the planted rate). Reward networks and RL prompts "
            "keep every image and the true reports. Rates: share of generated images on which the diagnostic judge "
            f"fires (p >= 0.5) for {f}, over held-out reports that state it or not; claims are read on the evaluator "
            "(not the reward).")
    if target is None:
        return text + " No VAE ceiling in the anchor's metrics: gaps are not shown."
    return text + (f" Gap to ceiling closed = (variant - anchor) / (ceiling - anchor) on the stated reports, the ceiling "
                   f"being the evaluator on real held-out images after a VAE round trip: it fires on "
                   f"{fmt_pct(target['rate'])} of those with {f} and {fmt_pct(target['false_rate'])} of those without "
                   "('no gap': the ceiling lies within the anchor's 95 % interval).")
