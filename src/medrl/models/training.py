"""Training helpers shared by the reward/evaluator networks (posture aligner, XRV diagnostic
classifier, dual encoder, artifact classifiers): image loading from pairs tables, train/test
splits, per-epoch checkpoints (medrl.checkpoints) and BatchNorm recalibration.
The learning-rate schedule they share with the diffusion trainers is medrl.lr_schedule."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch
from torch import nn

from medrl.checkpoints import TrainState, load_train_state, save_train_state
from medrl.errors import DataError
from medrl.io import load_image
from medrl.progress import progress

__all__ = [
    "TORCH_LOAD_ERRORS",
    "images_from_pairs",
    "judge_pairs",
    "judge_split",
    "recalibrate_bn",
    "resolve_image_path",
    "resume_epochs",
    "save_epoch",
    "split_rows",
    "to_unit",
]


# what torch.load(weights_only=True) raises on refused pickles (UnpicklingError) or torn files
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError)


# ----------------------------------------------------------------------------- data helpers


def resolve_image_path(path: str | Path, base: str | Path | None = None) -> Path:
    """Absolute paths as given; relative ones against ``base`` (default: the cwd, which is
    the workspace root that pairs.csv paths are relative to)."""
    p = Path(path)
    return p if p.is_absolute() or base is None else Path(base) / p


def images_from_pairs(pairs: pd.DataFrame, size: int, *, column: str = "path", base: str | Path | None = None, desc: str = "load images") -> torch.Tensor:
    """Load the grayscale images named by ``pairs[column]`` as uint8 (N, 1, size, size).

    uint8 keeps a 5000-image 224 px real set at 250 MB; callers convert per batch."""
    if column not in pairs.columns:
        raise DataError(f"pairs: missing column '{column}'; expected image paths (pairs.csv format)")
    out = torch.empty((len(pairs), 1, size, size), dtype=torch.uint8)
    for i, p in enumerate(progress(list(pairs[column]), desc=desc)):
        img = load_image(resolve_image_path(p, base), size=size, mode="L")
        out[i] = (img * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)
    return out


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (as stored by ``images_from_pairs``) to float in [0, 1]."""
    return x.float() / 255.0


JUDGES = ("reward", "eval")


def judge_split(image_ids: Iterable[Any], reward_share: float) -> list[str]:
    """Which judge trains on each image: ``"reward"`` (the RL reward nets) or ``"eval"`` (the
    independent evaluators), by a hash of the image id alone: deterministic, independent of row
    order, of the other rows and of any seed, so the two sets never share an image (and a grown
    dataset keeps every image's judge)."""
    import hashlib

    out = []
    for image in image_ids:
        h = int.from_bytes(hashlib.sha256(f"medrl-judge:{image}".encode()).digest()[:8], "big")
        out.append("reward" if h / 2.0**64 < reward_share else "eval")
    return out


def judge_pairs(pairs: pd.DataFrame, judge: str, reward_share: float) -> pd.DataFrame:
    """``pairs`` without the train rows of the other judge (``judge_split`` on the ``image``
    column); test rows are kept (every judge is evaluated on the same held-out pairs)."""
    if judge not in JUDGES:
        raise ValueError(f"judge: {judge!r}; expected one of {JUDGES}")
    for col in ("image", "split"):
        if col not in pairs.columns:
            raise DataError(f"pairs: missing column '{col}'; expected the pairs.csv format")
    mine = pd.Series(judge_split(pairs["image"].astype(str), reward_share), index=pairs.index) == judge
    train = pairs["split"] == "train"
    if train.any() and not (train & mine).any():
        raise DataError(f"pairs: none of the {int(train.sum())} train pairs falls to the {judge} judge "
                        f"(reward_share={reward_share}); expected more train pairs or a share further from 0/1")
    return pairs[~train | mine].reset_index(drop=True)


def split_rows(pairs: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of ``pairs`` whose ``split`` column is ``name``, re-indexed from 0."""
    if "split" not in pairs.columns:
        raise DataError("pairs: missing column 'split'; expected values in {train, test}")
    return pairs[pairs["split"] == name].reset_index(drop=True)


# ----------------------------------------------------------------------------- checkpoints


def resume_epochs(ckpt_dir: Path, config: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
                  sched: Any = None) -> tuple[int, list[Any]]:
    """Load the epoch checkpoint (medrl.checkpoints) of the run with ``config`` into model,
    optimiser and (if given) lr scheduler; returns (first epoch to train, history so far), (0, [])
    when there is none."""
    state = load_train_state(ckpt_dir, config)
    if state is None:
        return 0, []
    model.load_state_dict(state.tensors["model"])
    opt.load_state_dict(state.objects["optim"])
    if sched is not None:
        sched.load_state_dict(state.objects["scheduler"])
    return int(state.meta["epoch"]), list(state.meta["history"])


def save_epoch(ckpt_dir: Path, config: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, epoch: int,
               history: list[Any], sched: Any = None) -> None:
    """Checkpoint model, optimiser and (if given) lr scheduler after ``epoch`` epochs (medrl.checkpoints)."""
    objects = {"optim": opt.state_dict(), **({"scheduler": sched.state_dict()} if sched is not None else {})}
    save_train_state(ckpt_dir, TrainState(tensors={"model": model.state_dict()}, objects=objects,
                                          meta={"epoch": epoch, "history": history}), config)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], device: str | torch.device = "cpu") -> None:
    """Re-estimate BatchNorm running statistics with the final weights (cumulative mean over
    ``batches``, already preprocessed for ``model``). After a short from-scratch run the
    running statistics lag the weights and eval-mode outputs are off; one pass fixes it."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = model.training
    model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for b in batches:
        model(b.to(device))
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    model.train(was_training)
