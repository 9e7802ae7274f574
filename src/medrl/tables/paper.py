"""Published numbers, transcribed from the papers.

CXRL (Han et al., "Advancing Text-Driven Chest X-Ray Generation with Policy-Based Reinforcement
Learning", MICCAI 2024, arXiv:2403.06516): Tables 1, 2a, 2b and 3, keyed by our model names
(``anchor`` = RoentGen, the frozen anchor; ``full`` = CXRL; ``no_ace``/``no_rlcf`` the
ablations; ``align_only``/``diag_only``/``consist_only`` the reward ablations of Table 2b).
``llm_cxr`` is an external baseline (LLM-CXR) that this pipeline does not train; its numbers
are shown as paper-only rows. Table 1's third column is printed as "CXR-CLIP Distance (up)"
in the paper although higher is better and the text calls it a consistency score: it is the
image-report embedding (cosine) similarity, which is what we report.

RL4Med-DDPO (Saremi et al., "RL4Med-DDPO: Reinforcement Learning for Controlled Guidance
Towards Diverse Medical Image Generation using Vision-Language Foundation Models", MICCAI 2025,
arXiv:2503.15784): the source this project was given is the authors' repository README, which
contains no numeric results, so the RL4Med tables carry an empty paper column (never numbers
from memory).
"""
from __future__ import annotations

# The 11 Table-3 pathologies in the paper's column order (== medrl.data.reports.PATHOLOGIES).
CXR_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Consolidation", "Pneumothorax", "Edema", "Effusion", "Pneumonia", "Cardiomegaly",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)
CXR_ABBREV: dict[str, str] = {
    "Atelectasis": "Atel.", "Consolidation": "Cnsl.", "Pneumothorax": "Pmtx.", "Edema": "Edem.",
    "Effusion": "Eff.", "Pneumonia": "Pna.", "Cardiomegaly": "Cmgl.", "Lung Lesion": "Les.",
    "Fracture": "Frac.", "Lung Opacity": "Opac.", "Enlarged Cardiomediastinum": "ECm.", "avg": "Avg.",
}

# Row labels as the paper prints them.
CXRL_LABELS: dict[str, str] = {
    "anchor": "RoentGen [3] (anchor)",
    "llm_cxr": "LLM-CXR [19]",
    "full": "CXRL (Ours)",
    "no_ace": "w/o ACE",
    "no_rlcf": "w/o RLCF (direct feedback)",
    "repeated": "CXRL, reports repeated per batch (not in the paper)",
    "align_only": "+ r_align",
    "diag_only": "+ r_diag",
    "consist_only": "+ r_consist",
}

# Table 1: r_align(psi) (up), AUROC (up), CXR-CLIP similarity (up).
CXRL_TABLE1: dict[str, dict[str, float]] = {
    "anchor": {"r_align": -0.363, "auroc": 0.65, "similarity": 0.285},
    "llm_cxr": {"r_align": -0.327, "auroc": 0.78, "similarity": 0.201},
    "full": {"r_align": -0.246, "auroc": 0.81, "similarity": 0.343},
    "no_ace": {"r_align": -0.354, "auroc": 0.66, "similarity": 0.321},
    "no_rlcf": {"r_align": -0.319, "auroc": 0.71, "similarity": 0.301},
}
CXRL_TABLE1_DIGITS = {"r_align": 3, "auroc": 2, "similarity": 3}

# Table 2(a): FID (down, CXR DenseNet-121 features), MS-SSIM (down).
CXRL_TABLE2A: dict[str, dict[str, float]] = {
    "anchor": {"fid": 2.58, "msssim": 0.197},
    "llm_cxr": {"fid": 4.01, "msssim": 0.275},
    "full": {"fid": 1.51, "msssim": 0.147},
    "no_ace": {"fid": 1.79, "msssim": 0.192},
    "no_rlcf": {"fid": 1.58, "msssim": 0.188},
}
CXRL_TABLE2A_DIGITS = {"fid": 2, "msssim": 3}

# Table 2(b): FID per reward ablation: (Exp. #, reward label, FID).
CXRL_TABLE2B: dict[str, tuple[str, str, float]] = {
    "anchor": ("-", "Anchor Model [3]", 2.58),
    "align_only": ("1", "+ r_align", 1.89),
    "diag_only": ("2", "+ r_diag", 1.64),
    "consist_only": ("3", "+ r_consist", 1.92),
    "full": ("4", "r_align + r_diag + r_consist", 1.51),
}
CXRL_TABLE2B_DIGITS = 2

# Table 3: per-pathology AUROC of a CXR classifier on generated images; last value = Avg.
_T3_ORDER = (*CXR_CLASSES, "avg")
CXRL_TABLE3: dict[str, dict[str, float]] = {
    "anchor": dict(zip(_T3_ORDER, (.78, .90, .79, .71, .46, .39, .46, .57, .90, .48, .71, .65))),
    "llm_cxr": dict(zip(_T3_ORDER, (.86, .88, .81, .86, .68, .76, .67, .76, .88, .62, .82, .78))),
    "full": dict(zip(_T3_ORDER, (.87, .94, .88, .89, .77, .60, .63, .79, .94, .70, .86, .81))),
}
CXRL_TABLE3_DIGITS = 2

RL4MED_PAPER_NOTE = (
    "Paper column empty: the RL4Med-DDPO seed text (the authors' repository README) carries no "
    "numeric results, so there are no published numbers to set beside ours."
)
CXRL_SOURCE_NOTE = "Paper numbers: CXRL (seed 004_0d4a1c28a312c6e4), transcribed verbatim."
