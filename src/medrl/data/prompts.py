"""ISIC label columns and the RL4Med prompt grammar (labels <-> prompt text).

Grammar (lower-case, one space between words)::

    a dermoscopic image with <lesion> <artifacts>

    <lesion>    = "melanoma (MEL)"            if MEL == 1
                | "melanocytic nevus (NV)"    if NV == 1
                | "another lesion type"       if MEL == NV == 0   (ISIC's other diagnoses;
                                                                   phantoms: a non-melanocytic lesion)
    <artifacts> = "showing " + ", ".join(names)   names in ARTIFACTS4 order, as in ARTIFACT_TEXT
                | "with no visible artifacts"     when none of ARTIFACTS4 is present

Only the four prompt artifacts (ARTIFACTS4) enter the prompt, as in RL4Med-DDPO; the other
ISIC artifact columns (dark_corner, gel_border, patches, vasc) are image nuisance factors.
An image may not be both MEL and NV (ISIC diagnoses are one-hot).
"""
from __future__ import annotations

import hashlib
import itertools
import re
from typing import Mapping

from medrl.errors import DataError

ISIC_COLUMNS: list[str] = [
    "image", "MEL", "NV", "dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches", "vasc",
]
LABEL_COLUMNS: list[str] = ISIC_COLUMNS[1:]
ARTIFACTS4: list[str] = ["hair", "gel_bubble", "ruler", "ink"]
HEADS6: list[str] = ["hair", "gel_bubble", "ruler", "ink", "MEL", "NV"]

PREFIX = "a dermoscopic image with"
LESION_TEXT = {"MEL": "melanoma (MEL)", "NV": "melanocytic nevus (NV)", "OTHER": "another lesion type"}
ARTIFACT_TEXT = {"hair": "hair", "gel_bubble": "gel bubble", "ruler": "ruler", "ink": "ink"}
NO_ARTIFACTS = "with no visible artifacts"

_TEXT_TO_ARTIFACT = {v: k for k, v in ARTIFACT_TEXT.items()}
_TEXT_TO_LESION = {v.lower(): k for k, v in LESION_TEXT.items()}
_PROMPT_RE = re.compile(
    r"^a dermoscopic image with (?P<lesion>" + "|".join(re.escape(t.lower()) for t in LESION_TEXT.values()) + r")"
    r" (?:(?P<none>with no visible artifacts)|showing (?P<arts>[a-z ,]+))$"
)


def _flag(labels: Mapping[str, int], key: str) -> int:
    if key not in labels:
        raise DataError(f"labels: missing key {key!r}; expected {HEADS6}")
    value = labels[key]
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise DataError(f"labels[{key!r}] = {value!r}; expected 0 or 1") from None
    if as_int not in (0, 1) or as_int != value:
        raise DataError(f"labels[{key!r}] = {value!r}; expected 0 or 1")
    return as_int


def lesion_of(labels: Mapping[str, int]) -> str:
    """'MEL', 'NV' or 'OTHER' (neither); raises DataError when both are 1."""
    mel, nv = _flag(labels, "MEL"), _flag(labels, "NV")
    if mel and nv:
        raise DataError(f"labels {dict(labels)}: MEL and NV both 1; expected at most one diagnosis")
    return "MEL" if mel else "NV" if nv else "OTHER"


def labels_to_prompt(labels: Mapping[str, int]) -> str:
    """The RL4Med prompt for one image's labels (needs MEL, NV and the ARTIFACTS4 keys)."""
    lesion = LESION_TEXT[lesion_of(labels)]
    present = [ARTIFACT_TEXT[a] for a in ARTIFACTS4 if _flag(labels, a)]
    tail = f"showing {', '.join(present)}" if present else NO_ARTIFACTS
    return f"{PREFIX} {lesion} {tail}"


def _normalise(prompt: str) -> str:
    return " ".join(prompt.strip().lower().split())


def prompt_to_labels(prompt: str) -> dict[str, int]:
    """Inverse of labels_to_prompt: {head: 0/1} for HEADS6.

    Case and runs of whitespace are ignored; artifacts may come in any order but each at
    most once. Raises DataError naming the prompt if it does not follow the grammar."""
    if not isinstance(prompt, str):
        raise DataError(f"prompt {prompt!r}: expected a string")
    m = _PROMPT_RE.match(_normalise(prompt))
    if m is None:
        raise DataError(
            f"prompt {prompt!r} does not parse; expected '{PREFIX} <lesion> showing <artifacts>' "
            f"or '... {NO_ARTIFACTS}' with lesion in {list(LESION_TEXT.values())}"
        )
    lesion = _TEXT_TO_LESION[m.group("lesion")]
    out = {h: 0 for h in HEADS6}
    if lesion != "OTHER":
        out[lesion] = 1
    if m.group("arts") is not None:
        names = [n.strip() for n in m.group("arts").split(",")]
        for name in names:
            key = _TEXT_TO_ARTIFACT.get(name)
            if key is None:
                raise DataError(f"prompt {prompt!r}: unknown artifact {name!r}; expected one of {list(ARTIFACT_TEXT.values())}")
            if out[key]:
                raise DataError(f"prompt {prompt!r}: artifact {name!r} listed twice")
            out[key] = 1
    return out


def evaluation_prompts() -> list[str]:
    """The 32 evaluation prompts: MEL/NV x every subset of ARTIFACTS4 (empty subset first)."""
    prompts = []
    for lesion in ("MEL", "NV"):
        for k in range(len(ARTIFACTS4) + 1):
            for subset in itertools.combinations(ARTIFACTS4, k):
                labels = {h: 0 for h in HEADS6}
                labels[lesion] = 1
                labels.update({a: 1 for a in subset})
                prompts.append(labels_to_prompt(labels))
    return prompts


def slug(prompt: str) -> str:
    """Filesystem-safe name, unique per prompt string.

    Canonical prompts get a readable slug ('MEL__hair-ruler', 'NV__none', 'OTHER__ink');
    any other string gets a sanitised prefix plus 10 hex digits of its sha1 so distinct
    strings never collide."""
    try:
        labels = prompt_to_labels(prompt)
        canonical = labels_to_prompt(labels) == prompt
    except DataError:
        canonical = False
    if canonical:
        lesion = "MEL" if labels["MEL"] else "NV" if labels["NV"] else "OTHER"
        arts = [a for a in ARTIFACTS4 if labels[a]]
        return f"{lesion}__{'-'.join(arts) if arts else 'none'}"
    stem = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"
    return f"{stem}--{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:10]}"
