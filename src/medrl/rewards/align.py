"""CXRL posture-alignment reward (paper Sec. 2.3.1).

``r_align(psi) = -(max(|sx-1|, |sy-1|) + |theta|/(2*pi) + sqrt(tx^2 + ty^2))`` where psi is
the affine transform ``(sx, sy, tx, ty, theta)`` (theta in radians, translations in the
normalised [-1, 1] coordinates of ``torch.nn.functional.affine_grid``) that the frozen
posture aligner predicts to bring a CXR onto the canonical CXR. 0 means "already aligned";
every deviation from the identity makes it more negative.
"""
from __future__ import annotations

import math

import torch

__all__ = ["align_reward"]


def align_reward(psi: torch.Tensor) -> torch.Tensor:
    """Reward for psi of shape (..., 5) ordered (sx, sy, tx, ty, theta); returns shape (...)."""
    if psi.shape[-1] != 5:
        raise ValueError(f"psi: last dimension must be 5 (sx, sy, tx, ty, theta), got shape {tuple(psi.shape)}")
    sx, sy, tx, ty, theta = psi.unbind(-1)
    scale = torch.maximum((sx - 1).abs(), (sy - 1).abs())
    rot = theta.abs() / (2 * math.pi)
    shift = torch.sqrt(tx * tx + ty * ty)
    return -(scale + rot + shift)
