"""Prompt grammar (labels <-> prompt) and the report impression extractor / labeler."""
from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest

from medrl.data.prompts import (
    ARTIFACTS4,
    HEADS6,
    ISIC_COLUMNS,
    evaluation_prompts,
    labels_to_prompt,
    prompt_to_labels,
    slug,
)
from medrl.data.reports import PATHOLOGIES, evaluate_labeler, extract_impression, label_report
from medrl.errors import DataError

NAN = math.nan

# ----------------------------------------------------------------------------- prompts


def test_constants_exact():
    assert ISIC_COLUMNS == ["image", "MEL", "NV", "dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches", "vasc"]
    assert ARTIFACTS4 == ["hair", "gel_bubble", "ruler", "ink"]
    assert HEADS6 == ["hair", "gel_bubble", "ruler", "ink", "MEL", "NV"]
    assert PATHOLOGIES == ["Atelectasis", "Consolidation", "Pneumothorax", "Edema", "Effusion", "Pneumonia",
                           "Cardiomegaly", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]


def test_examples_follow_the_rl4med_grammar():
    base = {h: 0 for h in HEADS6}
    assert labels_to_prompt({**base, "MEL": 1, "hair": 1, "ruler": 1}) == "a dermoscopic image with melanoma (MEL) showing hair, ruler"
    assert labels_to_prompt({**base, "NV": 1}) == "a dermoscopic image with melanocytic nevus (NV) with no visible artifacts"
    # artifacts always in ARTIFACTS4 order, whatever the dict order
    assert labels_to_prompt({"ink": 1, "gel_bubble": 1, "MEL": 0, "NV": 1, "hair": 0, "ruler": 0}) == (
        "a dermoscopic image with melanocytic nevus (NV) showing gel bubble, ink")
    assert labels_to_prompt({**base, "ink": 1}) == "a dermoscopic image with another lesion type showing ink"


def test_evaluation_prompts_round_trip_and_cover_all_subsets():
    prompts = evaluation_prompts()
    assert len(prompts) == 32 and len(set(prompts)) == 32
    seen = set()
    for p in prompts:
        labels = prompt_to_labels(p)
        assert set(labels) == set(HEADS6)
        assert labels["MEL"] + labels["NV"] == 1
        assert labels_to_prompt(labels) == p
        seen.add(tuple(labels[h] for h in HEADS6))
    expected = {(*bits, mel, 1 - mel) for mel in (0, 1) for bits in itertools.product((0, 1), repeat=4)}
    assert seen == expected


def test_prompt_parsing_is_tolerant_but_strict_on_content():
    assert prompt_to_labels("  A Dermoscopic image with MELANOMA (mel)   showing ink,hair ") == {
        "hair": 1, "gel_bubble": 0, "ruler": 0, "ink": 1, "MEL": 1, "NV": 0}
    for bad in ["a photo of a cat", "a dermoscopic image with melanoma (MEL) showing hair, hair",
                "a dermoscopic image with melanoma (MEL) showing tattoo", ""]:
        with pytest.raises(DataError, match=re.escape(repr(bad))):
            prompt_to_labels(bad)


def test_labels_to_prompt_rejects_bad_labels():
    with pytest.raises(DataError, match="MEL and NV"):
        labels_to_prompt({h: 1 for h in HEADS6})
    with pytest.raises(DataError, match="ruler"):
        labels_to_prompt({"MEL": 1, "NV": 0, "hair": 0, "gel_bubble": 0, "ink": 0})
    with pytest.raises(DataError, match="expected 0 or 1"):
        labels_to_prompt({"MEL": 1, "NV": 0, "hair": 2, "gel_bubble": 0, "ruler": 0, "ink": 0})


def test_slug_is_safe_and_unique():
    prompts = evaluation_prompts()
    other = [labels_to_prompt({"MEL": 0, "NV": 0, **dict(zip(ARTIFACTS4, bits))}) for bits in itertools.product((0, 1), repeat=4)]
    weird = ["a dermoscopic image with melanoma (MEL) with no visible artifacts ", "x/y?*", "x y", "x-y"]
    slugs = [slug(p) for p in prompts + other + weird]
    assert len(set(slugs)) == len(slugs)
    assert all(re.fullmatch(r"[A-Za-z0-9_\-]+", s) for s in slugs)
    assert slug(prompts[0]) == "MEL__none"
    assert slug("a dermoscopic image with melanocytic nevus (NV) showing hair, ink") == "NV__hair-ink"
    assert slug(prompts[5]) == slug(prompts[5])  # stable


# ----------------------------------------------------------------------------- impression

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 COMPARISON:  ___

 FINDINGS:

 PA and lateral views of the chest provided.   There is no focal consolidation,
 effusion, or pneumothorax.  The cardiomediastinal silhouette is normal.

 IMPRESSION:

 Small right pleural effusion.  No
 pneumothorax.

 RECOMMENDATION(S):  Follow-up radiograph.
"""


def test_extract_impression_handles_mimic_formatting():
    assert extract_impression(MIMIC_REPORT) == "Small right pleural effusion. No pneumothorax."
    no_imp = MIMIC_REPORT.split(" IMPRESSION:")[0]
    assert extract_impression(no_imp) == (
        "PA and lateral views of the chest provided. There is no focal consolidation, effusion, or pneumothorax. "
        "The cardiomediastinal silhouette is normal.")
    assert extract_impression("FINDINGS: Lungs clear. IMPRESSION: Normal chest.") == "Normal chest."
    assert extract_impression("impression:\n  Mild edema.\n") == "Mild edema."  # lower-case header on its own line
    assert extract_impression("CONCLUSION: Large effusion.") == "Large effusion."
    assert extract_impression("just some text") == ""
    assert extract_impression(float("nan")) == ""  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- labeler

CASES = [
    ("No pneumothorax or pleural effusion.", {"Pneumothorax": 0, "Effusion": 0}),
    ("Small right pleural effusion. No pneumothorax.", {"Effusion": 1, "Pneumothorax": 0}),
    ("Possible right lower lobe pneumonia, no effusion.", {"Pneumonia": -1, "Effusion": 0}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": -1}),
    ("Cannot exclude pneumonia.", {"Pneumonia": -1}),
    ("No focal consolidation to suggest pneumonia.", {"Consolidation": 0, "Pneumonia": 0}),
    ("Heart size is normal. Normal mediastinal contours.", {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0}),
    ("The heart is not enlarged.", {"Cardiomegaly": 0}),
    ("Moderate cardiomegaly with mild pulmonary edema.", {"Cardiomegaly": 1, "Edema": 1}),
    ("Bibasilar opacities, likely atelectasis.", {"Lung Opacity": 1, "Atelectasis": -1}),
    ("A 1.5 cm nodule in the right upper lobe. No acute fracture.", {"Lung Lesion": 1, "Fracture": 0}),
    ("No significant change in small left effusion.", {"Effusion": 1}),
    ("Left pneumothorax has resolved.", {"Pneumothorax": 0}),
    ("Interval resolution of the previously seen pleural effusion.", {"Effusion": 0}),
    ("Widened mediastinum.", {"Enlarged Cardiomediastinum": 1}),
    ("No acute cardiopulmonary process.", {}),
    ("No pneumothorax, but there is a large left pleural effusion.", {"Pneumothorax": 0, "Effusion": 1}),
    ("Pneumonia?", {"Pneumonia": -1}),
    ("Questionable left rib fracture.", {"Fracture": -1}),
    ("Findings may represent edema.", {"Edema": -1}),
    ("Findings suggestive of early pneumonia.", {"Pneumonia": -1}),
    ("Free of pleural effusion. Negative for pneumothorax.", {"Effusion": 0, "Pneumothorax": 0}),
    ("Lungs are without consolidation or edema.", {"Consolidation": 0, "Edema": 0}),
    ("Left lower lobe collapse.", {"Atelectasis": 1}),
    ("Small pericardial effusion.", {}),
    ("Right upper lobe mass. Possible right upper lobe mass.", {"Lung Lesion": 1}),  # positive beats uncertain
]


@pytest.mark.parametrize("text,expected", CASES)
def test_label_report_negation_and_uncertainty(text, expected):
    got = label_report(text)
    assert set(got) == set(PATHOLOGIES)
    for cls in PATHOLOGIES:
        if cls in expected:
            assert got[cls] == expected[cls], (text, cls, got[cls])
        else:
            assert math.isnan(got[cls]), (text, cls, got[cls])


def test_evaluate_labeler_counts_positive_mentions():
    truth = pd.DataFrame({c: [NAN] * 4 for c in PATHOLOGIES})
    pred = truth.copy()
    truth["Effusion"] = [1, 1, 0, -1]
    pred["Effusion"] = [1, 0, 1, 1]  # tp=1, fp=2 (a 0 and a -1 in truth), fn=1
    truth["Edema"] = [1, NAN, NAN, NAN]
    pred["Edema"] = [1, NAN, NAN, NAN]
    ev = evaluate_labeler(pred, truth)
    eff = ev["per_class"]["Effusion"]
    assert eff["precision"] == pytest.approx(1 / 3) and eff["recall"] == pytest.approx(1 / 2)
    assert eff["f1"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert ev["per_class"]["Edema"]["f1"] == 1.0
    assert ev["macro_f1"] == pytest.approx((eff["f1"] + 1.0) / 2)  # only classes with support
    assert ev["per_class"]["Edema"]["agreement"] == 1.0
    assert ev["per_class"]["Effusion"]["agreement"] == 0.25  # only row 0 matches exactly
    with pytest.raises(DataError, match="rows"):
        evaluate_labeler(pred.iloc[:2], truth)
    with pytest.raises(DataError, match="Edema"):
        evaluate_labeler(pred.drop(columns=["Edema"]), truth)


def test_labeler_recovers_phantom_report_labels():
    from medrl.data.phantoms.cxr import sample_case, write_report

    rows, truth = [], []
    for i in range(400):
        case = sample_case(5, i, "AP" if i % 3 == 0 else "PA")
        report, labels = write_report(case, 5, i)
        rows.append(label_report(extract_impression(report)))
        truth.append(labels)
    ev = evaluate_labeler(pd.DataFrame(rows), pd.DataFrame(truth))
    assert ev["macro_f1"] > 0.97 and ev["agreement"] > 0.97
    truth_df = pd.DataFrame(truth)
    assert (truth_df == -1).to_numpy().sum() > 10 and (truth_df == 0).to_numpy().sum() > 50
    assert np.isnan(truth_df.to_numpy()).sum() > 0
