"""RL4Med-DDPO reward: agreement between a frozen artifact classifier and the prompt.

The paper's reward is the fraction of the H=6 heads (hair, gel_bubble, ruler, ink, MEL, NV)
whose thresholded prediction (sigmoid > 0.5) equals the label the prompt asks for, so an
image earns 1 only when every requested artifact is present, every unrequested one absent
and the lesion type is right.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from medrl.errors import DataError

__all__ = ["match_reward", "ArtifactReward"]


def match_reward(probs: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Fraction of heads whose prediction ``probs > threshold`` equals ``target`` (0/1).

    probs, target: (B, H). Returns (B,) float in [0, 1] in steps of 1/H."""
    if probs.ndim != 2 or probs.shape != target.shape:
        raise ValueError(f"probs/target: expected equal (B, H) shapes, got {tuple(probs.shape)} and {tuple(target.shape)}")
    pred = probs > threshold
    return (pred == (target > 0.5)).float().mean(dim=1)


class ArtifactReward:
    """Callable reward over a classifier directory written by ``train_classifier``.

    ``reward(images, prompts)`` -> ((B,) reward, terms) where terms holds ``match_<head>``
    (0/1 per image) for every head and ``artifact_exact`` (all artifact heads right)."""

    needs_anchor = False  # RLCF-style comparative rewards set this; this one is absolute

    def __init__(self, classifier_dir: str | Path, device: str | torch.device = "cpu"):
        from medrl.data.prompts import ARTIFACTS4
        from medrl.models.classifiers import load_classifier

        self.device = torch.device(device)
        self.model = load_classifier(classifier_dir, device=self.device)
        self.heads = list(self.model.heads)
        self.artifact_heads = [h for h in self.heads if h in ARTIFACTS4]
        self.size = self.model.size

    def targets(self, prompts: list[str]) -> torch.Tensor:
        """(B, H) 0/1 labels the prompts ask for, in the classifier's head order."""
        from medrl.data.prompts import prompt_to_labels

        rows = []
        for p in prompts:
            lab = prompt_to_labels(p)
            missing = [h for h in self.heads if h not in lab]
            if missing:
                raise DataError(f"prompt {p!r}: no label for classifier heads {missing}")
            rows.append([float(lab[h]) for h in self.heads])
        return torch.tensor(rows, dtype=torch.float32).view(len(prompts), len(self.heads))

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        """Sigmoid outputs (B, H) for (B,3,H,W) images in [0, 1]."""
        x = images.detach().to(self.device, torch.float32).clamp(0, 1)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return torch.sigmoid(self.model(x))

    def __call__(
        self, images: torch.Tensor, prompts: list[str], anchor_images: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        del anchor_images  # absolute reward: the anchor model's images are not needed
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise ValueError(f"images: expected (B, 3, H, W) with B == len(prompts) == {len(prompts)}, got {tuple(images.shape)}")
        probs = self.probs(images)
        target = self.targets(list(prompts)).to(probs.device)
        match = (probs > 0.5) == (target > 0.5)
        reward = match_reward(probs, target)
        terms = {f"match_{h}": match[:, j].float() for j, h in enumerate(self.heads)}
        idx = [self.heads.index(h) for h in self.artifact_heads]
        terms["artifact_exact"] = match[:, idx].all(dim=1).float() if idx else torch.ones_like(reward)
        out_dev = images.device
        return reward.to(out_dev), {k: v.to(out_dev) for k, v in terms.items()}
