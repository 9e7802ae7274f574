"""The planted CXR deficiency: label noise and under-representation in the anchor's fine-tune data.

CXRL's anchor renders the findings its reports state imperfectly. The embedded world plants
that at a known size, as RL4Med's phantoms do for an artifact: of the training images whose
report states one finding, only a share (``finetune_share``) stays in the anchor's fine-tune
set, and in a share (``overclaim``) of the training reports that do not state it the fine-tune
caption claims it anyway, although the image does not show it. The anchor then sees the
finding's words with the finding on only ``planted_rate`` of its fine-tune images, and too few
of them to learn what it looks like. The reward and evaluator networks and the RL prompts keep
every image and the true reports, so RL can find out what the reports mean; the tables report
how much of the gap between the anchor's rate and what the VAE can show RL closed
(``metrics.cxr_eval``, ``tables.cxrl_planted``).
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

from medrl.errors import DataError

# What an overclaimed caption adds (each read as positive by reports.label_report)
CLAIMS: dict[str, list[str]] = {
    "Effusion": ["Small right pleural effusion.", "Small left pleural effusion.", "Small bilateral pleural effusions.",
                 "Moderate right pleural effusion.", "Moderate left pleural effusion."],
    "Edema": ["Mild pulmonary edema.", "Moderate pulmonary edema.", "Mild interstitial pulmonary edema."],
    "Cardiomegaly": ["Mild cardiomegaly.", "Moderate cardiomegaly.", "Enlarged cardiac silhouette."],
}
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def plant_finding(pairs: pd.DataFrame, *, finding: str, overclaim: float, finetune_share: float, seed: int
                  ) -> tuple[pd.Series, np.ndarray, dict[str, Any]]:
    """(fine-tune caption per row of ``pairs``, 1/0: in the anchor's fine-tune set, the plant's
    record for planted.json).

    ``pairs`` needs ``impression``, ``split`` and the report label column ``finding`` (1 =
    stated). Each train row whose report states the finding stays in the fine-tune set with
    probability ``finetune_share``; each train row whose report does not is, with probability
    ``overclaim``, given a caption that drops the impression's sentences about the finding
    (e.g. a negation) and appends a claim of it. Other rows keep their impression."""
    from medrl.data.reports import label_report

    if finding not in CLAIMS:
        raise DataError(f"planted.finding={finding!r}: expected one of {sorted(CLAIMS)}")
    for name, v in (("overclaim", overclaim), ("finetune_share", finetune_share)):
        if not 0 < v <= 1:
            raise DataError(f"planted.{name}={v}: expected a share in (0, 1]")
    missing = [c for c in ("impression", "split", finding) if c not in pairs.columns]
    if missing:
        raise DataError(f"pairs: missing columns {missing}; the CXR plant needs the report labels")
    captions = pairs["impression"].astype(str).copy()
    train = (pairs["split"] == "train").to_numpy()
    stated = (pairs[finding] == 1).to_numpy()
    rng = np.random.default_rng([seed, 7])
    candidates = np.flatnonzero(train & ~stated)
    chosen = candidates[rng.random(len(candidates)) < overclaim]
    for i in chosen:
        kept = [s for s in _SENTENCE.split(captions.iloc[i]) if s and math.isnan(label_report(s)[finding])]
        captions.iloc[i] = " ".join(kept + [CLAIMS[finding][rng.integers(len(CLAIMS[finding]))]])
    # drawn after the captions, so finetune_share 1 leaves them as they were
    finetune = np.ones(len(pairs), dtype=int)
    true_rows = np.flatnonzero(train & stated)
    finetune[true_rows[np.random.default_rng([seed, 8]).random(len(true_rows)) >= finetune_share]] = 0
    n_kept, n_over, n_train = int(finetune[true_rows].sum()), len(chosen), int(train.sum())
    record = {
        "finding": finding, "overclaim": float(overclaim), "finetune_share": float(finetune_share),
        "n_train": n_train, "n_stated_true": len(true_rows), "n_kept": n_kept, "n_overclaimed": n_over,
        # the finding's share of the fine-tune images whose caption states it
        "planted_rate": n_kept / (n_kept + n_over) if n_kept + n_over else float("nan"),
        "planted_false_rate": 0.0,  # a caption that does not state the finding is truthful
        "prevalence": len(true_rows) / max(1, n_train),
        "finetune_prevalence": n_kept / max(1, n_train - len(true_rows) + n_kept),
    }
    return captions, finetune, record

