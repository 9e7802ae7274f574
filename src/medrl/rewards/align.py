"""CXRL posture-alignment reward (paper Sec. 2.3.1).

``r_align(psi) = -(max(|sx-1|, |sy-1|) + |theta|/(2*pi) + sqrt(tx^2 + ty^2))`` where psi is
the affine transform ``(sx, sy, tx, ty, theta)`` (theta in radians, translations in the
normalised [-1, 1] coordinates of ``torch.nn.functional.affine_grid``) that the frozen
posture aligner predicts to bring a CXR onto the canonical CXR. 0 means "already aligned";
every deviation from the identity makes it more negative.

The formula is implemented next to the psi convention it reads, in ``medrl.models.posture``
(the aligner's own evaluation reports it too); this module is its name among the rewards.
"""
from __future__ import annotations

from medrl.models.posture import align_reward

__all__ = ["align_reward"]
