"""EfficientNet-B0 multi-label classifiers for ISIC (paper: the H=6 reward and H=4 metric models).

One network serves every ISIC classifier: torchvision's EfficientNet-B0 with its last Linear
replaced by ``Linear(1280, len(heads))``. The H=6 model (hair, gel_bubble, ruler, ink, MEL,
NV) is trained on split "train" and is the RL reward; the H=4 model (artifacts only) is
trained on the disjoint split "cls_b" and scores generated images (APR), so the metric is
not the reward the policy was optimised against. The augmentation experiment reuses the same
code with a single "MEL" head.

``pixel_branch`` (width w > 0) adds two 3x3 convolutions at the input's full resolution
beside the trunk; their global max- and mean-pooled maps (2w numbers) join the trunk's 1280
features before the last Linear. Trained from scratch on 879 64-px phantoms, the plain
EfficientNet never finds the thin purple ink strokes and small white gel bubbles (test
AUROC 0.60 / 0.63, train 0.65 / 0.65: it underfits) although one colour statistic separates them (0.86 /
0.98); its stride-2 stem and 32x downsampling dilute a few pixels of colour. The branch is
a learned colour/edge detector that keeps them (docs/NOTEBOOK.md, ISIC-06). 0 gives the
plain torchvision network (the paper's, and the published checkpoints' layout).

ImageNet normalisation happens inside ``forward`` so every caller (reward, APR, augmentation)
passes plain [0, 1] images. Weights are never downloaded: ``imagenet_weights`` is an optional
local torchvision state dict (.pth or .safetensors); the embedded default trains from scratch.

On-disk format of a trained classifier directory: ``model.safetensors`` (the state dict),
``config.json`` (heads, arch, size) and ``eval.json`` (held-out metrics).
"""
from __future__ import annotations

import hashlib
import math
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from medrl.checkpoints import discard_train_state, fingerprint
from medrl.errors import DataError
from medrl.io import atomic_path, read_json, write_json
from medrl.models.training import resume_epochs, save_epoch
from medrl.progress import progress

__all__ = [
    "ARCHS",
    "ArtifactClassifier",
    "EfficientNetWithPixelBranch",
    "build_classifier",
    "train_classifier",
    "load_classifier",
    "save_classifier",
    "convert_published_classifier",
    "predict_probs",
    "binary_metrics",
    "augment_batch",
    "recalibrate_bn_loader",
]

ARCHS = ("efficientnet_b0",)
_FEATURES = {"efficientnet_b0": 1280}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CKPT_NAME = "classifier"


class ArtifactClassifier(nn.Module):
    """EfficientNet backbone + one logit per head; takes (B,3,H,W) images in [0, 1].

    ``heads`` names the outputs in order; ``size`` is the square input size it was trained
    at (None until trained/loaded), which callers use to resize their images."""

    def __init__(self, net: nn.Module, heads: Sequence[str], arch: str, size: int | None = None):
        super().__init__()
        self.net = net
        self.heads = list(heads)
        self.arch = arch
        self.size = size
        # Not persistent: the saved state dict is exactly the torchvision network's.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images: expected shape (B, 3, H, W) in [0, 1], got {tuple(x.shape)}")
        return self.net((x.to(self.mean.dtype) - self.mean) / self.std)

    def config(self) -> dict[str, Any]:
        return {"heads": self.heads, "arch": self.arch, "size": self.size,
                "pixel_branch": int(getattr(self.net, "pixel_width", 0))}


class EfficientNetWithPixelBranch(nn.Module):
    """torchvision EfficientNet trunk plus a full-resolution pixel branch (module docstring).

    Keeps the trunk's attribute names (``features``, ``avgpool``, ``classifier`` as
    Dropout + Linear), so feature extractors that read ``features``/``avgpool`` work
    unchanged and ImageNet weights load into the trunk as before."""

    def __init__(self, net: nn.Module, width: int, n_out: int):
        super().__init__()
        self.pixel_width = int(width)
        self.features, self.avgpool = net.features, net.avgpool
        n_trunk = net.classifier[1].in_features
        self.pixel = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.SiLU(),
        )
        self.classifier = nn.Sequential(net.classifier[0], nn.Linear(n_trunk + 2 * width, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trunk = torch.flatten(self.avgpool(self.features(x)), 1)
        p = self.pixel(x)
        # max: "is there any purple/white spot"; mean: how much of the image it covers
        return self.classifier(torch.cat([trunk, p.amax(dim=(-1, -2)), p.mean(dim=(-1, -2))], dim=1))


# ----------------------------------------------------------------------------- build / IO


def build_classifier(
    heads: list[str], *, arch: str = "efficientnet_b0", imagenet_weights: str | None = None,
    pixel_branch: int = 0,
) -> ArtifactClassifier:
    """EfficientNet-B0 with ``len(heads)`` logits; optional local ImageNet backbone weights
    and an optional full-resolution pixel branch of width ``pixel_branch`` (0 = none).

    ``imagenet_weights``: a torchvision ``efficientnet_b0`` state dict saved as .pth
    (``torch.save``) or .safetensors; loaded into the backbone before the classification
    head is replaced (so the 1000-class head in the file is accepted and dropped)."""
    import torchvision

    if arch not in ARCHS:
        raise DataError(f"arch: unknown classifier architecture {arch!r}; expected one of {list(ARCHS)}")
    heads = [str(h) for h in heads]
    if not heads or len(set(heads)) != len(heads):
        raise DataError(f"heads: expected a non-empty list of distinct names, got {heads}")
    if not isinstance(pixel_branch, int) or pixel_branch < 0:
        raise DataError(f"pixel_branch: expected an integer width >= 0 (0 = none), got {pixel_branch!r}")
    net = torchvision.models.efficientnet_b0(weights=None)
    if imagenet_weights is not None:
        _load_backbone(net, Path(imagenet_weights))
    if pixel_branch:
        net = EfficientNetWithPixelBranch(net, pixel_branch, len(heads))
    else:
        # Keep torchvision's dropout (classifier[0]); replace only the Linear.
        net.classifier[1] = nn.Linear(_FEATURES[arch], len(heads))
    return ArtifactClassifier(net, heads, arch)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a weights-only torch file, unwrapped and de-prefixed."""
    if not path.is_file():
        raise DataError(f"{path}: imagenet_weights file not found; expected a local EfficientNet-B0 .pth or .safetensors")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with non-tensor objects, wrong format
        raise DataError(f"{path}: cannot read weights ({type(e).__name__}: {e}); expected a torchvision EfficientNet-B0 state dict (.pth or .safetensors)") from None
    # Training checkpoints wrap the weights ({"state_dict": ...}, {"model_state_dict": ...}).
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DataError(f"{path}: not a state dict of tensors; expected a torchvision EfficientNet-B0 state dict")
    # DDP ("module.") and wrapper ("model.", "net.") prefixes.
    for prefix in ("module.", "model.", "net."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _load_backbone(net: nn.Module, path: Path) -> None:
    sd = _read_state_dict(path)
    own = net.state_dict()
    backbone = {k for k in own if not k.startswith("classifier.")}
    missing = sorted(backbone - set(sd))
    unexpected = sorted(k for k in sd if k not in own)
    bad_shape = sorted(k for k in backbone & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or bad_shape:
        raise DataError(
            f"{path}: not an EfficientNet-B0 state dict ({len(missing)} missing keys e.g. {missing[:3]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:3]}, {len(bad_shape)} with wrong shapes e.g. {bad_shape[:3]}); "
            "expected torchvision.models.efficientnet_b0().state_dict()"
        )
    net.load_state_dict({k: sd[k] for k in backbone}, strict=False)


def save_classifier(model: ArtifactClassifier, out_dir: Path) -> None:
    """Write ``model.safetensors`` + ``config.json`` into ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(out_dir / "config.json", model.config())


def convert_published_classifier(weights: str | Path, heads: list[str], size: int, out_dir: str | Path) -> None:
    """Turn the RL4Med-DDPO authors' ``artifact_classifier_train_H{6,4}.pth`` (a checkpoint
    dict whose ``model_state_dict`` holds ``model.``-prefixed EfficientNet-B0 weights with a
    Dropout+Linear head) into a classifier directory ``load_classifier`` reads.

    ``heads`` must be the authors' order (hair, gel_bubble, ruler, ink[, MEL, NV]); ``size``
    is the input size they trained at (512)."""
    path = Path(weights)
    sd = _read_state_dict(path)
    model = build_classifier(heads)
    own = model.net.state_dict()
    missing = sorted(set(own) - set(sd))
    bad = sorted(k for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or bad:
        raise DataError(
            f"{path}: does not fit EfficientNet-B0 with {len(heads)} heads {heads} "
            f"({len(missing)} missing keys e.g. {missing[:3]}, wrong shapes: {bad[:3]})"
        )
    model.net.load_state_dict({k: sd[k] for k in own})
    model.size = int(size)
    save_classifier(model, Path(out_dir))


def load_classifier(dir: str | Path, device: str | torch.device = "cpu") -> ArtifactClassifier:
    """Load a classifier directory written by ``train_classifier``: eval mode, frozen."""
    from safetensors.torch import load_file

    d = Path(dir)
    cfg = read_json(d / "config.json")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("heads"), list) or "arch" not in cfg:
        raise DataError(f"{d / 'config.json'}: expected keys heads (list), arch, size")
    wpath = d / "model.safetensors"
    if not wpath.is_file():
        raise DataError(f"{wpath}: classifier weights not found; expected a directory written by train_classifier")
    try:  # directories written before the pixel branch existed have no key: none
        model = build_classifier(cfg["heads"], arch=cfg["arch"], pixel_branch=cfg.get("pixel_branch", 0))
    except DataError as e:
        raise DataError(f"{d / 'config.json'}: {e}") from None
    try:
        model.load_state_dict(load_file(str(wpath)), strict=True)
    except (RuntimeError, OSError) as e:
        raise DataError(f"{wpath}: weights do not match config.json ({str(e)[:300]})") from None
    model.size = int(cfg["size"]) if cfg.get("size") is not None else None
    model.eval().requires_grad_(False)
    return model.to(device)


# ----------------------------------------------------------------------------- augmentation


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Dermoscopy augmentation on a (B,3,S,S) batch in [0, 1], one draw per image.

    Lesions have no canonical orientation, so flips and 90-degree rotations are label
    preserving; colour jitter is small (brightness/contrast/saturation +-10%) and has no hue
    shift, because hue is what tells ink and gel from skin."""
    b = x.shape[0]

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(x.device)

    flip_h = draw(b) < 0.5
    flip_v = draw(b) < 0.5
    x = torch.where(flip_h.view(b, 1, 1, 1), x.flip(-1), x)
    x = torch.where(flip_v.view(b, 1, 1, 1), x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where((draw(b) < 0.5).view(b, 1, 1, 1), x.transpose(-1, -2), x)
    bright, contrast, sat = (1.0 + 0.2 * (draw(b, 1, 1, 1) - 0.5) for _ in range(3))
    x = x * bright
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = gray + (x - gray) * sat
    mean = gray.mean(dim=(-1, -2), keepdim=True)
    x = mean + (x - mean) * contrast
    return x.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- metrics


def binary_metrics(prob: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUROC (NaN when only one class is present), accuracy at ``threshold``, counts."""
    from torchmetrics.functional.classification import binary_auroc

    prob = np.array(prob, dtype=np.float64).reshape(-1)  # copies: torch wants writable arrays
    label = np.array(label).reshape(-1).astype(np.int64)
    n, n_pos = int(label.size), int(label.sum())
    out: dict[str, float] = {"n": float(n), "n_pos": float(n_pos)}
    if n == 0:
        return out | {"auroc": math.nan, "acc": math.nan}
    out["acc"] = float(((prob > threshold).astype(int) == label).mean())
    if 0 < n_pos < n:
        out["auroc"] = float(binary_auroc(torch.from_numpy(prob), torch.from_numpy(label)))
    else:
        out["auroc"] = math.nan
    return out


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def json_safe(obj: Any) -> Any:
    """NaN -> None, recursively, so the JSON files stay strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


# ----------------------------------------------------------------------------- data


def _check_items(items: pd.DataFrame, heads: Sequence[str], split: str, what: str) -> pd.DataFrame:
    missing = [c for c in ["path", "split", *heads] if c not in items.columns]
    if missing:
        raise DataError(f"items: missing columns {missing}; expected path, split and the label columns {list(heads)}")
    rows = items[items["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise DataError(f"items: no rows with split == {split!r} ({what}); found splits {sorted(items['split'].astype(str).unique())}")
    bad = [h for h in heads if not rows[h].isin([0, 1]).all()]
    if bad:
        raise DataError(f"items: label columns {bad} of split {split!r} are not all 0/1")
    return rows


def _dataset(rows: pd.DataFrame, heads: Sequence[str], size: int, mode: str = "RGB"):
    from medrl.data.datasets import TableImageDataset

    return TableImageDataset(rows, path_col="path", label_cols=list(heads), size=size, mode=mode)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels) from whatever the dataset yields: a tuple/list or a dict."""
    if isinstance(batch, dict):
        img = batch.get("image", batch.get("pixel_values"))
        return img, batch.get("labels", batch.get("label"))
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


@torch.no_grad()
def predict_probs(
    model: ArtifactClassifier,
    rows: pd.DataFrame,
    *,
    size: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    desc: str = "predict",
    path_col: str = "path",
) -> np.ndarray:
    """Sigmoid outputs (N, H) for the images at ``rows[path_col]`` in row order."""
    size = size or model.size
    if size is None:
        raise DataError("size: the classifier has no recorded input size; pass size=")
    rows = rows.reset_index(drop=True)
    if path_col != "path":
        rows = rows.rename(columns={path_col: "path"})
    ds = _dataset(rows, [], size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    out = []
    for batch in progress(loader, desc=desc, total=len(loader)):
        img, _ = _split_batch(batch)
        out.append(torch.sigmoid(model(img.to(device).float())).float().cpu())
    model.train(was_training)
    if not out:
        return np.zeros((0, len(model.heads)), dtype=np.float32)
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- training


def recalibrate_bn_loader(model: nn.Module, loader: Any, device: torch.device) -> None:
    """BatchNorm recalibration (medrl.models.training.recalibrate_bn) over a loader's images.

    A from-scratch EfficientNet trained for a few hundred steps has running statistics that
    lag its weights (eval-mode outputs near chance); one pass over un-augmented images fixes it."""
    from medrl.models.training import recalibrate_bn

    recalibrate_bn(model, (_split_batch(b)[0].float() for b in progress(loader, desc="recalibrate BatchNorm", total=len(loader))), device)


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def train_classifier(
    items: pd.DataFrame,
    heads: list[str],
    out_dir: Path,
    *,
    train_split: str,
    eval_split: str,
    size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    imagenet_weights: str | None,
    ckpt_dir: Path,
    device: str = "cpu",
    arch: str = "efficientnet_b0",
    weight_decay: float = 1e-2,
    num_workers: int = 0,
    pixel_branch: int = 0,
) -> dict[str, float]:
    """Multi-label BCE training of ``heads`` on ``split == train_split``; eval on ``eval_split``.
    ``pixel_branch``: see ``build_classifier``.

    AdamW with a per-step cosine schedule; flips/transposes and small colour jitter
    (``augment_batch``). The final model (no model selection on the evaluation split, which
    is the held-out test split) is written to ``out_dir`` with ``eval.json``. A checkpoint
    in ``ckpt_dir`` after every epoch lets an interrupted run resume exactly (randomness is
    re-seeded from (seed, epoch)); it is removed once the model is saved.

    Returns per-head ``auroc_<head>``/``acc_<head>``, ``auroc_macro``/``acc_macro``,
    ``exact_match`` (all heads right), ``train_loss`` and counts."""
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    heads = list(heads)
    if epochs < 1 or batch_size < 1 or size < 16:
        raise DataError(f"epochs/batch_size/size: expected epochs>=1, batch_size>=1, size>=16; got {epochs}, {batch_size}, {size}")
    train_rows = _check_items(items, heads, train_split, "training")
    eval_rows = _check_items(items, heads, eval_split, "evaluation")
    dev = torch.device(device)
    fp = fingerprint(
        heads=heads, arch=arch, size=size, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
        wd=weight_decay, imagenet_weights=imagenet_weights, pixel_branch=pixel_branch,
        train=hashlib.sha256("\n".join(train_rows["path"].astype(str)).encode()).hexdigest(),
        labels=hashlib.sha256(train_rows[heads].to_numpy().astype(np.int8).tobytes()).hexdigest(),
    )
    ds = _dataset(train_rows, heads, size)
    ckpt = ckpt_dir / _CKPT_NAME
    t0 = time.perf_counter()
    model, losses = _fit_classifier(
        ds, heads, dev, ckpt, fp, arch=arch, size=size, epochs=epochs, batch_size=batch_size, lr=lr,
        seed=seed, imagenet_weights=imagenet_weights, weight_decay=weight_decay, num_workers=num_workers,
        pixel_branch=pixel_branch)
    train_s = time.perf_counter() - t0

    model.eval()
    probs = predict_probs(model, eval_rows, size=size, device=dev, batch_size=max(batch_size, 64), desc=f"eval {eval_split}")
    labels = eval_rows[heads].to_numpy().astype(int)
    metrics, per_head = _head_metrics(probs, labels, heads)
    metrics["train_loss"] = float(losses[-1]) if losses else math.nan
    metrics["n_train"] = float(len(train_rows))
    metrics["n_eval"] = float(len(eval_rows))
    metrics["train_seconds"] = float(train_s)

    save_classifier(model, out_dir)
    write_json(
        out_dir / "eval.json",
        json_safe({
            "train_split": train_split, "eval_split": eval_split, "heads": heads, "size": size,
            "epochs": epochs, "seed": seed, "train_losses": losses, "per_head": per_head,
            # Wall time is left out so that the same inputs give a byte-identical file.
            "metrics": {k: v for k, v in metrics.items() if k != "train_seconds"},
        }),
    )
    # The model is safely written: the checkpoint is no longer needed.
    discard_train_state(ckpt)
    if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics


def _fit_classifier(ds: Any, heads: list[str], dev: torch.device, ckpt: Path, fingerprint: str, *, arch: str,
                    size: int, epochs: int, batch_size: int, lr: float, seed: int, imagenet_weights: str | None,
                    weight_decay: float, num_workers: int, pixel_branch: int) -> tuple[ArtifactClassifier, list[float]]:
    """Build (or resume) and train the classifier, checkpointing after every epoch, then recalibrate
    BatchNorm; returns (model, mean loss per epoch). The caller's global RNG is left untouched."""
    drop_last = len(ds) > batch_size  # BatchNorm cannot train on a last batch of one image
    steps_per_epoch = len(ds) // batch_size if drop_last else 1
    # Library code must not disturb the caller's global RNG (dropout and init use it).
    with torch.random.fork_rng(devices=_rng_devices(dev)):
        torch.manual_seed(seed)
        model = build_classifier(heads, arch=arch, imagenet_weights=imagenet_weights, pixel_branch=pixel_branch).to(dev)
        model.size = size
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        ckpt_config = {"fingerprint": fingerprint}
        start, losses = resume_epochs(ckpt, ckpt_config, model, opt, sched)
        for epoch in progress(range(start, epochs), desc=f"train classifier {'/'.join(heads)}", total=epochs, initial=start):
            torch.manual_seed(seed * 100_003 + epoch)
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            loader = torch.utils.data.DataLoader(
                ds, batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=gen,
                num_workers=num_workers, pin_memory=dev.type == "cuda",
            )
            losses.append(_train_epoch(model, opt, sched, loader, gen, len(heads), dev))
            save_epoch(ckpt, ckpt_config, model, opt, epoch + 1, losses, sched)
        # Inside fork_rng for a clean global RNG; deterministic, so a resumed run agrees.
        bn_loader = torch.utils.data.DataLoader(ds, batch_size=max(batch_size, 64), shuffle=False, num_workers=num_workers)
        recalibrate_bn_loader(model, bn_loader, dev)
    return model, losses


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, loader: Any, gen: torch.Generator,
                 n_heads: int, dev: torch.device) -> float:
    """One epoch of augmented multi-label BCE steps; returns the epoch's mean loss per image."""
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        img, lab = _split_batch(batch)
        img = augment_batch(img.to(dev, non_blocking=True).float(), gen)
        lab = lab.to(dev).float().view(img.shape[0], n_heads)
        loss = nn.functional.binary_cross_entropy_with_logits(model(img), lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * img.shape[0]
        count += img.shape[0]
    return total / max(count, 1)


def _head_metrics(probs: np.ndarray, labels: np.ndarray, heads: list[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(per-head and macro AUROC/accuracy plus exact match, per-head binary metrics)."""
    metrics: dict[str, float] = {}
    per_head: dict[str, dict[str, float]] = {}
    for j, h in enumerate(heads):
        m = binary_metrics(probs[:, j], labels[:, j])
        per_head[h] = m
        metrics[f"auroc_{h}"] = m["auroc"]
        metrics[f"acc_{h}"] = m["acc"]
    metrics["auroc_macro"] = _nanmean([per_head[h]["auroc"] for h in heads])
    metrics["acc_macro"] = _nanmean([per_head[h]["acc"] for h in heads])
    metrics["exact_match"] = float(((probs > 0.5).astype(int) == labels).all(axis=1).mean())
    return metrics, per_head
