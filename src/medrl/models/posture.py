"""CXRL posture aligner: a ResNet-18 that predicts the affine psi aligning a CXR to the
canonical CXR (paper Sec. 2.3.1), plus the affine warp it is trained through.

Conventions (shared with ``medrl.data.phantoms.cxr`` and ``medrl.rewards.align``)
---------------------------------------------------------------------------------
psi = (sx, sy, tx, ty, theta), theta in radians, translations in the normalised [-1, 1]
coordinates of ``F.affine_grid`` (align_corners=False; x to the right, y downwards). Its
matrix (``psi_to_theta``) is ``[R(theta) @ diag(sx, sy) | (tx, ty)]``.

``warp(image, psi)`` *pulls*: output pixel at normalised position p takes the input value at
``A p + t``. So ``warp(image, psi)`` shows the content of ``image`` zoomed *out* by sx > 1
(the field of view grows), moved by -t and rotated by -theta on screen. Warps compose as
matrices: ``warp(warp(x, psi1), psi2) == warp_theta(x, compose_theta(psi_to_theta(psi1),
psi_to_theta(psi2)))`` with ``compose_theta(M1, M2) = M1 @ M2`` (homogeneous), up to
resampling.

The phantom generator writes the *posture* psi_true with ``observed = warp(canonical,
psi_true)``. The aligner predicts the *aligning* psi with ``warp(observed, psi_pred) ~=
canonical``, i.e. ``M_true @ M_pred = I``: psi_pred is the inverse of psi_true
(``aligning_psi``). The inverse of ``R diag(s)`` is ``diag(1/s) R(-theta)``, which has a
small shear unless sx == sy or theta == 0, so ``aligning_psi`` returns the closest psi
(``theta_to_psi``: rotation of the polar decomposition, scales projected on its axes) and the
evaluation also reports the parameter-free residual ``theta_to_psi(M_true @ M_pred)``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from medrl.checkpoints import discard_train_state, fingerprint
from medrl.errors import DataError
from medrl.io import atomic_dir, read_json, write_json
from medrl.lr_schedule import cosine_lr
from medrl.models.training import (
    images_from_pairs,
    recalibrate_bn,
    resolve_image_path,
    resume_epochs,
    save_epoch,
    split_rows,
    to_unit,
)
from medrl.progress import progress

__all__ = [
    "PSI_NAMES",
    "AlignerConfig",
    "PostureAligner",
    "align_reward",
    "aligning_psi",
    "compose_theta",
    "cosine_lr",
    "images_from_pairs",
    "invert_theta",
    "load_aligner",
    "predict_psi",
    "psi_accuracy",
    "psi_columns",
    "psi_to_theta",
    "recalibrate_bn",
    "resolve_image_path",
    "save_aligner",
    "theta_to_psi",
    "train_posture_aligner",
    "warp",
    "warp_theta",
]

PSI_NAMES = ("sx", "sy", "tx", "ty", "theta")
IDENTITY_PSI = (1.0, 1.0, 0.0, 0.0, 0.0)

# ----------------------------------------------------------------------------- affine algebra


def psi_to_theta(psi: torch.Tensor) -> torch.Tensor:
    """(..., 5) psi -> (..., 2, 3) matrix [R(theta) diag(sx, sy) | t] (affine_grid convention)."""
    if psi.shape[-1] != 5:
        raise ValueError(f"psi: last dimension must be 5 {PSI_NAMES}, got shape {tuple(psi.shape)}")
    sx, sy, tx, ty, th = psi.unbind(-1)
    c, s = torch.cos(th), torch.sin(th)
    row0 = torch.stack([c * sx, -s * sy, tx], -1)
    row1 = torch.stack([s * sx, c * sy, ty], -1)
    return torch.stack([row0, row1], -2)


def theta_to_psi(theta: torch.Tensor) -> torch.Tensor:
    """(..., 2, 3) affine -> closest (..., 5) psi; exact inverse of ``psi_to_theta`` for
    sx, sy > 0 and |theta| < pi. With a sheared matrix, theta is the rotation of the polar
    decomposition and sx, sy the column lengths projected on the rotated axes."""
    a, b, tx = theta[..., 0, 0], theta[..., 0, 1], theta[..., 0, 2]
    c, d, ty = theta[..., 1, 0], theta[..., 1, 1], theta[..., 1, 2]
    th = torch.atan2(c - b, a + d)
    cs, sn = torch.cos(th), torch.sin(th)
    sx = a * cs + c * sn
    sy = -b * sn + d * cs
    return torch.stack([sx, sy, tx, ty, th], -1)


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    last = torch.zeros(theta.shape[:-2] + (1, 3), dtype=theta.dtype, device=theta.device)
    last[..., 0, 2] = 1.0
    return torch.cat([theta, last], -2)


def invert_theta(theta: torch.Tensor) -> torch.Tensor:
    """Inverse affine (..., 2, 3): warp_theta(warp_theta(x, M), invert_theta(M)) ~= x."""
    return torch.linalg.inv(_homogeneous(theta))[..., :2, :]


def compose_theta(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Matrix of ``warp_theta(warp_theta(x, first), second)`` (= first @ second)."""
    return (_homogeneous(first) @ _homogeneous(second))[..., :2, :]


def aligning_psi(posture_psi: torch.Tensor) -> torch.Tensor:
    """psi that undoes a posture: if observed = warp(canonical, posture_psi), then
    warp(observed, aligning_psi(posture_psi)) ~= canonical (closest psi, see module doc)."""
    return theta_to_psi(invert_theta(psi_to_theta(posture_psi)))


def warp_theta(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Differentiable pull warp of (B, C, H, W) by (B, 2, 3) matrices (zeros outside)."""
    if images.ndim != 4:
        raise ValueError(f"images: expected (B, C, H, W), got shape {tuple(images.shape)}")
    theta = theta.to(images.dtype).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def warp(images: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """Warp (B, C, H, W) images by psi (B, 5) or (5,); see the module doc for the direction."""
    return warp_theta(images, psi_to_theta(psi.reshape(-1, 5)))



def align_reward(psi: torch.Tensor) -> torch.Tensor:
    """CXRL posture-alignment reward (paper Sec. 2.3.1; ``medrl.rewards.align``) for psi of shape
    (..., 5) ordered (sx, sy, tx, ty, theta); returns shape (...)."""
    if psi.shape[-1] != 5:
        raise ValueError(f"psi: last dimension must be 5 (sx, sy, tx, ty, theta), got shape {tuple(psi.shape)}")
    sx, sy, tx, ty, theta = psi.unbind(-1)
    scale = torch.maximum((sx - 1).abs(), (sy - 1).abs())
    rot = theta.abs() / (2 * math.pi)
    shift = torch.sqrt(tx * tx + ty * ty)
    return -(scale + rot + shift)


# ----------------------------------------------------------------------------- model


@dataclass
class AlignerConfig:
    size: int = 64          # input resolution; other sizes are resized (psi is resolution-free)
    in_channels: int = 1
    arch: str = "resnet18"
    width: int = 64         # stem width; the four stages are width x (1, 2, 4, 8) (64 = ResNet-18 proper)


class PostureAligner(nn.Module):
    """torchvision ResNet-18 (weights=None, 1-channel stem) regressing psi.

    The head's raw outputs r are mapped around the identity: sx = exp(r0), sy = exp(r1)
    (~ 1 + r near 0 and never a flip), tx = r2, ty = r3, theta = r4. The last layer starts
    near zero, so an untrained aligner predicts the identity (r_align ~ 0). The head is
    scaled by ``OUT_SCALE``: Adam moves every fc weight by ~lr per step, which over 512
    features would jump psi by O(1) per step and throw the warp off the image."""

    OUT_SCALE = 0.05

    def __init__(self, config: AlignerConfig | None = None) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.config = config or AlignerConfig()
        net = resnet18(weights=None, num_classes=5)
        net.conv1 = nn.Conv2d(self.config.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if self.config.width != 64:
            _rewiden(net, self.config.width)
        nn.init.normal_(net.fc.weight, std=1e-4)
        nn.init.zeros_(net.fc.bias)
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 1|3, H, W) in [0, 1] -> psi (B, 5)."""
        x = _to_channels(images, self.config.in_channels)
        if x.shape[-1] != self.config.size or x.shape[-2] != self.config.size:
            x = F.interpolate(x, size=(self.config.size, self.config.size), mode="bilinear", antialias=True, align_corners=False)
        r = self.net(x * 2.0 - 1.0) * self.OUT_SCALE
        return torch.stack([r[:, 0].exp(), r[:, 1].exp(), r[:, 2], r[:, 3], r[:, 4]], -1)


def _rewiden(net: nn.Module, width: int) -> None:
    """Rebuild a torchvision ResNet-18's stem, stages and head at stem width ``width`` (stages
    width x 1, 2, 4, 8), initialised as torchvision initialises ResNets."""
    from torchvision.models.resnet import BasicBlock

    net.inplanes = width
    net.conv1 = nn.Conv2d(net.conv1.in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    for i, mult in enumerate((1, 2, 4, 8)):
        setattr(net, f"layer{i + 1}", net._make_layer(BasicBlock, width * mult, 2, stride=1 if i == 0 else 2))
    net.fc = nn.Linear(width * 8, 5)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (B, 1|3, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] == channels:
        return images
    if channels == 1:
        return images.mean(1, keepdim=True)
    return images.expand(-1, channels, -1, -1)


@torch.no_grad()
def predict_psi(model: PostureAligner, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Aligning psi (B, 5) for images (B, 1|3, H, W) in [0, 1] (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(images[i : i + batch_size].to(device, torch.float32)) for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out).to(images.device) if out else torch.zeros(0, 5)


# ----------------------------------------------------------------------------- data helpers


def psi_columns(pairs: pd.DataFrame) -> list[str] | None:
    """Ground-truth posture columns (phantoms): ``gt_sx..`` preferred, else ``sx..``."""
    for prefix in ("gt_", ""):
        cols = [prefix + n for n in PSI_NAMES]
        if all(c in pairs.columns for c in cols) and pairs[cols].notna().all(axis=None):
            return cols
    return None


# ----------------------------------------------------------------------------- training


def _multiscale_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L2 at full, 1/2 and 1/4 resolution: the coarse terms widen the basin of attraction of
    the warp (bilinear sampling only gives local gradients), the full term sets precision."""
    loss = F.mse_loss(a, b)
    for k in (2, 4):
        if a.shape[-1] // k >= 4:
            loss = loss + F.mse_loss(F.avg_pool2d(a, k), F.avg_pool2d(b, k))
    return loss / 3.0


def _evaluate(model: PostureAligner, images: torch.Tensor, canonical: torch.Tensor, psi_true: torch.Tensor | None) -> dict[str, float]:
    psi = predict_psi(model, to_unit(images))
    x = to_unit(images)
    can = canonical.expand(len(x), -1, -1, -1)
    with torch.no_grad():
        aligned = torch.cat([warp(x[i : i + 256], psi[i : i + 256]) for i in range(0, len(x), 256)])
    m: dict[str, float] = {
        "test_n": float(len(x)),
        "test_l2_before": float(F.mse_loss(x, can)),
        "test_l2_after": float(F.mse_loss(aligned, can)),
        "test_r_align_pred": float(align_reward(psi).mean()),
    }
    for j, n in enumerate(PSI_NAMES):
        m[f"test_pred_std_{n}"] = float(psi[:, j].std()) if len(psi) > 1 else 0.0
    if psi_true is not None:
        target = aligning_psi(psi_true)
        identity = torch.tensor(IDENTITY_PSI).expand_as(target)
        residual = theta_to_psi(compose_theta(psi_to_theta(psi_true), psi_to_theta(psi)))
        m["test_r_align_true"] = float(align_reward(target).mean())
        for j, n in enumerate(PSI_NAMES):
            m[f"psi_mae_{n}"] = float((psi[:, j] - target[:, j]).abs().mean())
            m[f"psi_mae_identity_{n}"] = float((identity[:, j] - target[:, j]).abs().mean())
            m[f"residual_mae_{n}"] = float((residual[:, j] - identity[:, j]).abs().mean())
            m[f"psi_corr_{n}"] = _corr(psi[:, j], target[:, j])
    return m


def psi_accuracy(model: PostureAligner, images: torch.Tensor, psi_true: torch.Tensor) -> dict[str, float]:
    """How well ``model`` recovers exact postures: images (B, 1, H, W) in [0, 1] whose true
    posture psi is ``psi_true`` (B, 5). Per psi parameter the MAE of the predicted aligning psi
    (``psi_mae_*``) and of the untrained identity (``psi_mae_identity_*``), the mean of both over
    the parameters, and the error / correlation of r_align against the exact r_align."""
    psi = predict_psi(model, images).float()
    target = aligning_psi(psi_true.float())
    identity = torch.tensor(IDENTITY_PSI).expand_as(target)
    m: dict[str, float] = {"n": float(len(psi))}
    for j, n in enumerate(PSI_NAMES):
        m[f"psi_mae_{n}"] = float((psi[:, j] - target[:, j]).abs().mean())
        m[f"psi_mae_identity_{n}"] = float((identity[:, j] - target[:, j]).abs().mean())
    m["psi_mae_mean"] = float(np.mean([m[f"psi_mae_{n}"] for n in PSI_NAMES]))
    m["psi_mae_identity_mean"] = float(np.mean([m[f"psi_mae_identity_{n}"] for n in PSI_NAMES]))
    pred_r, true_r = align_reward(psi), align_reward(target)
    m["r_align_mae"] = float((pred_r - true_r).abs().mean())
    m["r_align_corr"] = _corr(pred_r, true_r)
    return m


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    if len(a) < 2 or float(a.std()) == 0.0 or float(b.std()) == 0.0:
        return 0.0
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def train_posture_aligner(
    pairs: pd.DataFrame,
    canonical: torch.Tensor,
    out_dir: str | Path,
    *,
    size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    ckpt_dir: str | Path,
    device: str = "cpu",
    base: str | Path | None = None,
    width: int = 64,
) -> dict[str, float]:
    """Self-supervised training as in CXRL: minimise L2(warp(x, aligner(x)), canonical) on
    the train split (no psi labels). Evaluates on the test split (psi error when the pairs
    carry true posture columns ``gt_sx..``/``sx..``, see ``_evaluate``), checkpoints every
    epoch to ``ckpt_dir/posture/`` (medrl.checkpoints) and resumes from it, and writes
    ``out_dir/{model.safetensors, config.json, eval.json}``. Returns the eval metrics."""
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    if canonical.ndim == 2:
        canonical = canonical[None]
    if canonical.ndim != 3 or canonical.shape[0] != 1:
        raise DataError(f"canonical: expected a (1, H, W) tensor in [0, 1], got shape {tuple(canonical.shape)}")
    can = F.interpolate(canonical[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False).to(device)
    train, test = split_rows(pairs, "train"), split_rows(pairs, "test")
    if len(train) == 0:
        raise DataError("pairs: no rows with split == 'train'; expected training images")
    x_train = images_from_pairs(train, size, base=base, desc="posture: load train")
    x_test = images_from_pairs(test, size, base=base, desc="posture: load test") if len(test) else x_train[:0]
    cols = psi_columns(test) if len(test) else None
    psi_true = torch.tensor(test[cols].to_numpy(np.float32)) if cols else None

    torch.manual_seed(seed)
    config = AlignerConfig(size=size, width=width)
    model = PostureAligner(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    ckpt = ckpt_dir / "posture"
    ckpt_config = {"fingerprint": fingerprint(n=len(train), size=size, batch_size=batch_size, lr=lr, seed=seed, width=width,
                                             images=list(train["path"]))}
    start, history = resume_epochs(ckpt, ckpt_config, model, opt)

    n = len(x_train)
    # a trailing batch of one image is dropped: BatchNorm cannot train on it (e.g. a judge's half of the pairs)
    steps = max(1, n // batch_size + int(n % batch_size > 1))
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
        total = 0.0
        for i in progress(range(steps), desc=f"posture epoch {epoch + 1}/{epochs}"):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = to_unit(x_train[idx]).to(device)
            psi = model(x)
            loss = _multiscale_l2(warp(x, psi), can.expand(len(x), -1, -1, -1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append({"epoch": epoch + 1, "train_loss": total / n, "seconds": time.perf_counter() - t0})
        save_epoch(ckpt, ckpt_config, model, opt, epoch + 1, history)

    # BN statistics from the final weights (train batches, fixed order)
    recalibrate_bn(model, [to_unit(x_train[i : i + 256]) for i in range(0, n, 256)], device)
    model.eval()
    metrics = _evaluate(model.cpu(), x_test, can.cpu(), psi_true) if len(x_test) else {}
    metrics["train_loss_final"] = float(history[-1]["train_loss"]) if history else float("nan")
    metrics["seconds_per_epoch"] = float(np.mean([h["seconds"] for h in history])) if history else float("nan")
    metrics["epochs"] = float(epochs)
    save_aligner(model, out_dir, {"metrics": metrics, "history": history, "psi_columns": cols})
    discard_train_state(ckpt)
    return metrics


def save_aligner(model: PostureAligner, out_dir: str | Path, eval_info: dict[str, Any] | None = None) -> None:
    """Write ``out_dir/{model.safetensors, config.json, eval.json}`` atomically."""
    with atomic_dir(Path(out_dir)) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        write_json(tmp / "config.json", asdict(model.config))
        write_json(tmp / "eval.json", eval_info or {})


def load_aligner(path: str | Path, device: str = "cpu") -> PostureAligner:
    """Load a directory written by ``train_posture_aligner`` (eval mode)."""
    path = Path(path)
    cfg = read_json(path / "config.json")
    try:
        config = AlignerConfig(**cfg)
    except TypeError as e:
        raise DataError(f"{path / 'config.json'}: bad aligner config ({e}); expected keys {list(asdict(AlignerConfig()))}") from None
    model = PostureAligner(config)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise DataError(f"{weights}: file not found; expected the aligner weights")
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()
