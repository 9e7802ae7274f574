"""The planted-deficiency rates and the share of the planted gap that RL closed."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medrl.data.prompts import evaluation_prompts, prompt_to_labels
from medrl.metrics.planted import gap_closed, planted_apr, planted_rates

PLANT = {"lesion": "MEL", "artifact": "ruler", "caption_fidelity": 0.0, "prevalence": 0.42, "planted_rate": 0.42,
         "planted_false_rate": 0.42, "measured_rate": 0.40, "measured_false_rate": 0.43}
BOOT = {"n_boot": 200, "ci": 0.95, "seed": 0, "keep_boot": True}


def per_image(rate: float, false_rate: float, seed: int) -> pd.DataFrame:
    """16 images per evaluation prompt; the ruler is found at ``rate`` where a MEL prompt asks for
    it, at ``false_rate`` where a MEL prompt does not, and (reference) at 0.9 / 0.05 for NV."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in evaluation_prompts():
        lab = prompt_to_labels(p)
        p_on = (rate if lab["ruler"] else false_rate) if lab["MEL"] else (0.9 if lab["ruler"] else 0.05)
        for i in range(16):
            rows.append({"prompt": p, "item": f"{p}#{i}", "target_ruler": lab["ruler"],
                         "pred_ruler": int(rng.random() < p_on)})
    return pd.DataFrame(rows)


def with_exact(df: pd.DataFrame, planted_apr_rate: float, seed: int) -> pd.DataFrame:
    """An ``exact`` column (the H=4 artifact set is the prompt's): at ``planted_apr_rate`` on MEL
    prompts asking for the ruler, 0.9 on the other MEL prompts, 0.7 on NV prompts."""
    rng = np.random.default_rng(seed)
    mel = df["prompt"].map(lambda p: prompt_to_labels(p)["MEL"] == 1).to_numpy()
    p = np.where(mel, np.where(df["target_ruler"] == 1, planted_apr_rate, 0.9), 0.7)
    return df.assign(exact=(rng.random(len(df)) < p).astype(int))


def test_rates_per_group_and_gap_closed():
    sd = planted_rates(per_image(0.4, 0.45, 0), PLANT, BOOT)
    rl = planted_rates(per_image(0.8, 0.15, 0), PLANT, BOOT)
    assert sd["planted"] == PLANT
    assert sd["rate"]["n"] == 8 * 16 and sd["reference_rate"]["n"] == 8 * 16
    assert abs(sd["rate"]["value"] - 0.4) < 0.12 and abs(rl["rate"]["value"] - 0.8) < 0.12
    assert sd["reference_rate"]["value"] > 0.75 and sd["reference_false_rate"]["value"] < 0.2
    closed = gap_closed(sd, rl)
    want = (rl["rate"]["value"] - sd["rate"]["value"]) / (sd["reference_rate"]["value"] - sd["rate"]["value"])
    assert closed["rate"] == pytest.approx(want) and 0.5 < closed["rate"] < 1.2
    assert closed["false_rate"] > 0.5  # the false rate fell towards the reference's


def test_planted_table_reports_rates_and_gap(tmp_path):
    from medrl.metrics.bootstrap import diff_from_boot
    from medrl.tables.rl4med import _planted_table

    sd = planted_rates(per_image(0.4, 0.45, 0), PLANT, BOOT)
    rl = planted_rates(per_image(0.8, 0.15, 0), PLANT, BOOT)
    paths = _planted_table({"planted": sd}, {"planted": rl}, {"sd": "r1", "rl": "r2"}, tmp_path, [])
    table = pd.read_csv(paths["csv"])
    assert len(table) == 4 and table["Prompts"][0] == "MEL prompts asking for ruler (planted rate 0.42), H=4 evaluator"
    d = diff_from_boot(rl["rate"], sd["rate"])
    assert d["lo"] > 0  # the paired CI of the asked rate excludes zero
    assert table["gap to NV closed"][0].endswith("%")
    assert table["gap to ceiling closed"].isna().all()  # no VAE ceiling in these metrics: no such gap
    vc = {"vae_roundtrip": {"fires_when_present": {"ruler": 0.9}, "fires_when_absent": {"ruler": 0.1}}}
    paths = _planted_table({"planted": sd, "vae_ceiling": vc}, {"planted": rl}, {"sd": "r1", "rl": "r2"}, tmp_path, [])
    table = pd.read_csv(paths["csv"])
    want = (rl["rate"]["value"] - sd["rate"]["value"]) / (0.9 - sd["rate"]["value"])
    assert table["gap to ceiling closed"][0] == f"{100 * want:.0f} %"
    assert "planted rate of ruler where asked is 0.42" in (tmp_path / "rl4med_planted.md").read_text()
    assert "Under-represented" not in (tmp_path / "rl4med_planted.md").read_text()  # finetune_share 1
    sd = {**sd, **planted_apr(with_exact(per_image(0.4, 0.45, 0), 0.2, 0), PLANT, BOOT)}
    rl = {**rl, **planted_apr(with_exact(per_image(0.8, 0.15, 0), 0.5, 1), PLANT, BOOT)}
    paths = _planted_table({"planted": sd, "vae_ceiling": vc}, {"planted": rl}, {"sd": "r1", "rl": "r2"}, tmp_path, [])
    row = pd.read_csv(paths["csv"]).set_index("Prompts").loc["APR, MEL prompts asking for ruler, H=4 evaluator"]
    assert row["gap to NV closed"] == f"{100 * gap_closed(sd, rl)['apr_rate']:.0f} %"
    assert pd.isna(row["gap to ceiling closed"])


def test_planted_table_states_the_under_representation(tmp_path):
    from medrl.tables.rl4med import _planted_table

    plant = {**PLANT, "finetune_share": 0.1, "n_left_out": 150, "n_combination_images": 170, "finetune_prevalence": 0.07}
    sd = planted_rates(per_image(0.4, 0.45, 0), plant, BOOT)
    rl = planted_rates(per_image(0.8, 0.15, 0), plant, BOOT)
    _planted_table({"planted": sd}, {"planted": rl}, {"sd": "r1", "rl": "r2"}, tmp_path, [])
    text = (tmp_path / "rl4med_planted.md").read_text()
    assert "with probability 0.10 (150 of 170 left out)" in text and "ruler is on 0.07" in text


def test_gap_to_the_vae_ceiling():
    """With the ceiling as target, the gap does not depend on how well SD follows the other lesion's prompts."""
    from medrl.metrics.planted import ceiling_rates

    vc = {"vae_roundtrip": {"fires_when_present": {"ruler": 0.9}, "fires_when_absent": {"ruler": 0.1}}}
    target = ceiling_rates(vc, "ruler")
    assert target == {"rate": 0.9, "false_rate": 0.1} and ceiling_rates(None, "ruler") is None
    sd, rl = {"rate": {"value": 0.4}, "false_rate": {"value": 0.4}}, {"rate": {"value": 0.65}, "false_rate": {"value": 0.25}}
    closed = gap_closed(sd, rl, target)
    assert closed["rate"] == pytest.approx(0.5) and closed["false_rate"] == pytest.approx(0.5)
    assert gap_closed(sd, rl)["rate"] is None  # no reference rates and no target: nothing to close


def test_a_gap_within_sds_own_interval_is_no_gap():
    """The overclaiming plant leaves the unasked rate at the other lesion's (0.047 against 0.062
    in the default run): a share of that gap divides by noise, so none is reported."""
    sd = {"rate": {"value": 0.14, "lo": 0.09, "hi": 0.20}, "false_rate": {"value": 0.047, "lo": 0.016, "hi": 0.086},
          "reference_rate": {"value": 0.93}, "reference_false_rate": {"value": 0.062}}
    rl = {"rate": {"value": 0.45}, "false_rate": {"value": 0.062}}
    closed = gap_closed(sd, rl)
    assert closed["rate"] == pytest.approx((0.45 - 0.14) / (0.93 - 0.14)) and closed["false_rate"] is None
    assert gap_closed(sd, rl, {"rate": 0.92, "false_rate": 0.02})["false_rate"] is None


def test_apr_on_the_under_represented_prompts_and_its_gap():
    """APR where the planted lesion's prompts ask for the artifact (the under-represented prompts),
    against the same prompts of the other lesion: the APR gap RL must close. Only the asking
    prompts count, and the VAE ceiling, which has no APR per prompt group, is no target for it."""
    sd_images, rl_images = with_exact(per_image(0.4, 0.45, 0), 0.2, 0), with_exact(per_image(0.8, 0.15, 0), 0.5, 1)
    sd, rl = planted_apr(sd_images, PLANT, BOOT), planted_apr(rl_images, PLANT, BOOT)
    assert set(sd) == {"apr_rate", "reference_apr_rate"} and sd["apr_rate"]["n"] == 8 * 16
    asked_mel = sd_images["prompt"].map(lambda p: prompt_to_labels(p)["MEL"] == 1) & (sd_images["target_ruler"] == 1)
    assert sd["apr_rate"]["value"] == pytest.approx(sd_images.loc[asked_mel, "exact"].mean())
    closed = gap_closed(sd, rl)
    want = ((rl["apr_rate"]["value"] - sd["apr_rate"]["value"])
            / (sd["reference_apr_rate"]["value"] - sd["apr_rate"]["value"]))
    assert closed == {"apr_rate": pytest.approx(want)} and 0.3 < closed["apr_rate"] < 1.0
    assert gap_closed(sd, rl, {"rate": 0.9, "false_rate": 0.1}) == {}
