"""Radiology report handling: impression extraction and a rule-based CheXpert-style labeler.

The labeler follows the CheXpert recipe in miniature: find *mentions* of each class with
synonym patterns, classify each mention as negative / uncertain / positive from trigger
phrases in its sentence clause, then aggregate per class (positive > uncertain > negative).
Output values are CheXpert's: 1.0 positive, 0.0 negative, -1.0 uncertain, NaN not mentioned.

Scope rules (documented because they decide edge cases):
- Sentences end at '.', '!' or '?' (a '.' between two digits, as in "1.5 cm", does not end
  one); clauses end at ';' and at 'but', 'however', 'although', 'though', 'whereas',
  'except', 'aside from', 'apart from', 'there is/are/has been/have been'.
- A pre-trigger (e.g. "no", "without", "possible") covers every mention after it up to the
  end of its clause, so "No pneumothorax or pleural effusion." negates both. When several
  pre-triggers precede a mention the nearest one decides ("Possible pneumonia, no effusion").
- Post-triggers follow the mention inside the clause ("... cannot be excluded", "... has
  resolved"); a post-trigger for uncertainty wins over one for negation, and both win over
  pre-triggers. A sentence that ends in '?' makes its positive mentions uncertain.
- "no change in", "not significantly changed" and similar are not negations.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import numpy as np
import pandas as pd

from medrl.errors import DataError

PATHOLOGIES: list[str] = [
    "Atelectasis",
    "Consolidation",
    "Pneumothorax",
    "Edema",
    "Effusion",
    "Pneumonia",
    "Cardiomegaly",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
]

# ----------------------------------------------------------------------------- impression

_HEADER_WORDS = (
    r"FINDINGS\s+AND\s+IMPRESSIONS?|IMPRESSIONS?|CONCLUSIONS?|FINDINGS|INDICATIONS?|HISTORY|COMPARISONS?|"
    r"TECHNIQUE|EXAMINATION|EXAM|RECOMMENDATIONS?(?:\(S\))?|NOTIFICATIONS?|"
    r"CLINICAL\s+(?:HISTORY|INFORMATION|INDICATION)|REASON\s+FOR\s+(?:EXAMINATION|EXAM|STUDY)|"
    r"WET\s+READ|ADDENDUM|PROCEDURE|FINAL\s+REPORT"
)
# Upper-case headers anywhere (MIMIC style), or any case at the start of a line.
_HEADER_UPPER = re.compile(r"\b(" + _HEADER_WORDS + r")\s*:")
_HEADER_LINE = re.compile(r"(?im)^[ \t]*(" + _HEADER_WORDS + r")[ \t]*:")


def _sections(report: str) -> list[tuple[str, str]]:
    """[(HEADER, body)] in order of appearance; text before the first header is dropped."""
    hits: dict[int, tuple[int, str]] = {}
    for rx in (_HEADER_UPPER, _HEADER_LINE):
        for m in rx.finditer(report):
            hits[m.start(1)] = (m.end(), " ".join(m.group(1).upper().split()))
    starts = sorted(hits)
    out = []
    for i, s in enumerate(starts):
        end_hdr, name = hits[s]
        nxt = starts[i + 1] if i + 1 < len(starts) else len(report)
        out.append((name, report[end_hdr:nxt]))
    return out


def extract_impression(report: str) -> str:
    """The IMPRESSION (or CONCLUSION / 'FINDINGS AND IMPRESSION') section of a report.

    Falls back to the FINDINGS section when there is no non-empty impression, and returns
    "" when neither exists. The last such section wins (MIMIC addenda repeat headers).
    Whitespace (line wraps, indentation) is collapsed to single spaces."""
    if not isinstance(report, str):
        return ""
    sections = _sections(report)
    for wanted in (("IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "FINDINGS AND IMPRESSION",
                    "FINDINGS AND IMPRESSIONS"), ("FINDINGS",)):
        bodies = [" ".join(body.split()) for name, body in sections if name in wanted]
        bodies = [b for b in bodies if b.strip(" .")]
        if bodies:
            return bodies[-1]
    return ""


# ----------------------------------------------------------------------------- labeler

_W = r"(?:\s+\w+)"  # one more word

# Phrases that state a class is *absent/normal* by themselves (mention = negative).
_NEGATIVE_PHRASES: dict[str, list[str]] = {
    "Cardiomegaly": [
        r"\b(?:heart size|cardiac size|size of the heart|cardiac silhouette|heart)\s+(?:is\s+|are\s+|appears\s+|remains\s+)?"
        r"(?:normal|within normal limits|unremarkable)\b",
        r"\bnormal (?:heart size|cardiac size|size of the heart|cardiac silhouette|heart)\b",
    ],
    "Enlarged Cardiomediastinum": [
        r"\b(?:cardiomediastinal|mediastinal|hilar)(?:\s+and\s+hilar)?\s+(?:silhouettes?|contours?)"
        r"(?:\s+and\s+\w+\s+contours?)?\s+(?:is\s+|are\s+|appears?\s+|remains?\s+)?(?:normal|within normal limits|unremarkable)\b",
        r"\bmediastinum\s+(?:is\s+|appears\s+)?(?:normal|within normal limits|unremarkable)\b",
        r"\bnormal (?:cardiomediastinal|mediastinal)(?:\s+and\s+hilar)? (?:silhouettes?|contours?)\b",
    ],
    "Effusion": [r"\bcostophrenic angles?\s+(?:is\s+|are\s+|remains?\s+)?(?:sharp|clear|preserved)\b"],
}

_MENTIONS: dict[str, list[str]] = {
    "Atelectasis": [r"\batelecta(?:sis|ses|tic)\b", r"\bcollapse\b"],
    "Consolidation": [r"\bconsolidat(?:ion|ions|ive|ed)\b"],
    "Pneumothorax": [r"\b(?:hydro)?pneumothora(?:x|ces)\b", r"\bptx\b"],
    "Edema": [
        r"\bo?edema\b", r"\b(?:pulmonary\s+)?vascular congestion\b", r"\bpulmonary congestion\b",
        r"\b(?:congestive\s+)?heart failure\b", r"\bchf\b", r"\bfluid overload\b", r"\bkerley\s+b\b",
    ],
    "Effusion": [
        r"(?<!pericardial )\beffusions?\b", r"\bpleural fluid\b",
        r"\bblunt(?:ing|ed)\s+(?:of\s+)?(?:the\s+)?(?:\w+\s+)?costophrenic angles?\b",
    ],
    "Pneumonia": [r"\b(?:broncho)?pneumonias?\b", r"\binfection\b", r"\binfectious process\b", r"\baspiration\b"],
    "Cardiomegaly": [
        r"\bcardiomegaly\b", r"\bcardiac enlargement\b",
        r"\b(?:enlarged|enlargement of the)\s+(?:heart|cardiac silhouette)\b",
        r"\b(?:heart size|cardiac size|heart|cardiac silhouette)" + _W + r"{0,3}?\s+enlarged\b",
    ],
    "Lung Lesion": [
        r"\bnodules?\b", r"\bnodular\b", r"\bmass(?:es)?\b", r"\b(?:lung|pulmonary|cavitary|cavitating)\s+lesions?\b",
        r"\btumou?rs?\b", r"\bneoplasms?\b", r"\bcarcinoma\b", r"\bmalignancy\b", r"\bmetasta(?:sis|ses|tic)\b",
    ],
    "Fracture": [r"\bfractur(?:e|es|ed)\b"],
    "Lung Opacity": [
        r"\bopaci(?:ty|ties|fication|fications|fied)\b", r"\binfiltrat(?:e|es|ion)\b",
        r"\bair[- ]?space (?:disease|process|opacity|opacities)\b", r"\bhaziness\b", r"\bincreased density\b",
    ],
    "Enlarged Cardiomediastinum": [
        r"\b(?:widened|widening of the|enlarged|enlargement of the|prominent)\s+(?:superior\s+)?"
        r"(?:mediastinum|mediastinal (?:silhouette|contours?)|cardiomediastinal (?:silhouette|contours?))\b",
        r"\bmediastinal (?:widening|enlargement)\b",
        r"\b(?:mediastinum|mediastinal contours?|cardiomediastinal silhouette|cardiomediastinal contours?)"
        + _W + r"{0,3}?\s+(?:widened|enlarged)\b",
    ],
}

_NEG_PRE = [
    r"\bno\b", r"\bnot\b", r"\bwithout\b", r"\bnegative for\b", r"\bfree of\b", r"\babsence of\b",
    r"\bresolution of\b", r"\bresolved\b", r"\bclear of\b", r"\bnor\b", r"\bneither\b", r"\bruled out\b",
]
_UNC_PRE = [
    r"\bpossibl[ey]\b", r"\bprobabl[ey]\b", r"\blikely\b", r"\bmay\b", r"\bmight\b", r"\bcould\b",
    r"\bquestionabl[ey]\b", r"\bquestion of\b", r"\bsuggestive of\b", r"\bsuggest(?:s|ing)\b", r"\bsuspicious for\b",
    r"\bsuspect(?:ed)?\b", r"\bconcerning for\b", r"\bconcern for\b", r"\bcan ?not (?:be )?exclude(?:d)?\b",
    r"\bcannot rule out\b", r"\bcan not rule out\b", r"\bdifficult to exclude\b", r"\bversus\b", r"\bvs\b",
    r"\bdifferential\b", r"\bconsider(?:ed)?\b", r"\bpresum(?:ed|ably)\b", r"\bborderline\b", r"\bequivocal\b",
    r"\braises? the possibility\b", r"\bpotential\b", r"(?:^|\s)\?",
]
_UNC_POST = [
    r"\bcan ?not be (?:excluded|ruled out)\b", r"\bnot (?:be )?excluded\b", r"\bnot (?:be )?ruled out\b",
    r"\bis (?:possible|suspected|questioned|not excluded)\b", r"^\s*\?",
]
_NEG_POST = [
    r"\b(?:not|no longer)\s+(?:seen|present|identified|evident|visualized|appreciated|demonstrated|detected|enlarged|widened)\b",
    r"\b(?:has|have)\s+(?:since\s+)?resolved\b", r"\bresolved\b", r"\b(?:is|are)\s+absent\b",
]
# Phrases containing negation words that do not negate a finding.
_PSEUDO_NEG = [
    r"\bno (?:significant |interval |appreciable |substantial |definite )?(?:change|changes|increase|decrease|worsening|improvement)\b",
    r"\bnot (?:significantly |substantially |markedly )?(?:changed|increased|decreased|improved|worsened)\b",
    r"\bwithout (?:significant |interval )?change\b",
    r"\bnot (?:well )?(?:evaluated|assessed)\b",
]
_CLAUSE_BREAK = re.compile(
    r";|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bwhereas\b|\bexcept\b|\baside from\b|\bapart from\b"
    r"|\bthere (?:is|are|has been|have been)\b"
)
_SENTENCE_END = re.compile(r"(?<!\d)\.|\.(?!\d)|[!?](?=\s|$)")

_C = lambda pats: [re.compile(p) for p in pats]  # noqa: E731
_NEG_PHRASES_RX = {k: _C(v) for k, v in _NEGATIVE_PHRASES.items()}
_MENTIONS_RX = {k: _C(v) for k, v in _MENTIONS.items()}
_NEG_PRE_RX, _UNC_PRE_RX = _C(_NEG_PRE), _C(_UNC_PRE)
_UNC_POST_RX, _NEG_POST_RX, _PSEUDO_RX = _C(_UNC_POST), _C(_NEG_POST), _C(_PSEUDO_NEG)
_POST_WINDOW_WORDS = 8


def _blank(text: str, spans: Iterable[tuple[int, int]]) -> str:
    chars = list(text)
    for s, e in spans:
        chars[s:e] = "_" * (e - s)
    return "".join(chars)


def _sentences(text: str) -> list[str]:
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[start : m.end()])
        start = m.end()
    out.append(text[start:])
    return [s for s in out if s.strip(" .")]


def _clauses(sentence: str) -> list[str]:
    cuts = [0] + [m.start() for m in _CLAUSE_BREAK.finditer(sentence)] + [len(sentence)]
    return [sentence[a:b] for a, b in zip(cuts, cuts[1:]) if sentence[a:b].strip()]


def _last_trigger(text: str) -> str | None:
    """'neg' / 'unc' for the nearest trigger in ``text`` (the words before a mention)."""
    unc = [(m.start(), m.end()) for rx in _UNC_PRE_RX for m in rx.finditer(text)]
    neg = [
        (m.start(), m.end()) for rx in _NEG_PRE_RX for m in rx.finditer(text)
        # "not" inside "can not exclude" is part of an uncertainty trigger.
        if not any(us <= m.start() < ue for us, ue in unc)
    ]
    best = max([(s, "unc") for s, _ in unc] + [(s, "neg") for s, _ in neg], default=None)
    return None if best is None else best[1]


def _classify(clause: str, start: int, end: int, question: bool) -> float:
    post_words = clause[end:].split()
    post = " ".join(post_words[:_POST_WINDOW_WORDS])
    if any(rx.search(post) for rx in _UNC_POST_RX):
        return -1.0
    span = clause[start:end]
    if any(rx.search(post) for rx in _NEG_POST_RX) or re.search(r"\b(?:not|no)\b", span):
        return 0.0
    pre = _last_trigger(clause[:start])
    if pre == "neg":
        return 0.0
    if pre == "unc" or question:
        return -1.0
    return 1.0


def label_report(text: str) -> dict[str, float]:
    """CheXpert-style labels for the 11 PATHOLOGIES from free text (usually an impression).

    1.0 positive, 0.0 negative, -1.0 uncertain, NaN not mentioned."""
    mentions: dict[str, list[float]] = {p: [] for p in PATHOLOGIES}
    if isinstance(text, str):
        lowered = " ".join(text.lower().split())
        lowered = _blank(lowered, [m.span() for rx in _PSEUDO_RX for m in rx.finditer(lowered)])
        for sentence in _sentences(lowered):
            question = sentence.rstrip().endswith("?")
            for clause in _clauses(sentence):
                taken: list[tuple[int, int]] = []
                for cls, rxs in _NEG_PHRASES_RX.items():
                    for rx in rxs:
                        for m in rx.finditer(clause):
                            mentions[cls].append(0.0)
                            taken.append(m.span())
                scan = _blank(clause, taken)
                for cls, rxs in _MENTIONS_RX.items():
                    seen: list[tuple[int, int]] = []
                    for rx in rxs:
                        for m in rx.finditer(scan):
                            if any(s < m.end() and m.start() < e for s, e in seen):
                                continue  # two synonyms matching the same words = one mention
                            seen.append(m.span())
                            mentions[cls].append(_classify(scan, m.start(), m.end(), question))
    out: dict[str, float] = {}
    for cls, vals in mentions.items():
        if 1.0 in vals:
            out[cls] = 1.0
        elif -1.0 in vals:
            out[cls] = -1.0
        elif 0.0 in vals:
            out[cls] = 0.0
        else:
            out[cls] = math.nan
    return out


def label_reports(texts: Iterable[str]) -> pd.DataFrame:
    """label_report over many texts, as a DataFrame with PATHOLOGIES columns."""
    return pd.DataFrame([label_report(t) for t in texts], columns=PATHOLOGIES)


# ----------------------------------------------------------------------------- evaluation


def evaluate_labeler(pred: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """Per-class precision / recall / F1 of *positive* mentions (value == 1), rows aligned.

    Returns {"per_class": {cls: {precision, recall, f1, support, predicted, agreement}},
    "macro_f1", "micro_f1", "agreement"}. ``agreement`` is the share of rows where the full
    four-way value (1/0/-1/NaN) matches, which also checks negation and uncertainty.
    Conventions: precision is 1 when nothing is predicted positive and nothing is positive,
    0 when nothing is predicted but something is; recall likewise. macro_f1 averages the
    classes with support > 0 (NaN if none)."""
    for name, df in (("pred", pred), ("truth", truth)):
        missing = [c for c in PATHOLOGIES if c not in df.columns]
        if missing:
            raise DataError(f"evaluate_labeler: {name} lacks columns {missing}; expected {PATHOLOGIES}")
    if len(pred) != len(truth):
        raise DataError(f"evaluate_labeler: pred has {len(pred)} rows, truth {len(truth)}; expected equal")
    per: dict[str, dict[str, float]] = {}
    tp_all = pp_all = sup_all = 0
    agree_all = []
    for cls in PATHOLOGIES:
        p = pd.to_numeric(pred[cls], errors="coerce").to_numpy(dtype=float)
        t = pd.to_numeric(truth[cls], errors="coerce").to_numpy(dtype=float)
        pp, tt = p == 1, t == 1
        tp, npp, sup = int((pp & tt).sum()), int(pp.sum()), int(tt.sum())
        precision = tp / npp if npp else (1.0 if sup == 0 else 0.0)
        recall = tp / sup if sup else (1.0 if npp == 0 else 0.0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        agree = (p == t) | (np.isnan(p) & np.isnan(t))
        agree_all.append(agree)
        per[cls] = {
            "precision": float(precision), "recall": float(recall), "f1": float(f1),
            "support": float(sup), "predicted": float(npp), "agreement": float(agree.mean()) if len(agree) else math.nan,
        }
        tp_all, pp_all, sup_all = tp_all + tp, pp_all + npp, sup_all + sup
    f1s = [v["f1"] for v in per.values() if v["support"] > 0]
    micro_p = tp_all / pp_all if pp_all else 0.0
    micro_r = tp_all / sup_all if sup_all else 0.0
    micro_f1 = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r > 0 else 0.0
    return {
        "per_class": per,
        "macro_f1": float(np.mean(f1s)) if f1s else math.nan,
        "micro_f1": float(micro_f1),
        "agreement": float(np.mean(np.concatenate(agree_all))) if len(pred) else math.nan,
    }
