"""Train the tiny stack's AutoencoderKL on the track's training images (embedded default).

Loss as in the LDM autoencoder minus the adversarial/LPIPS terms: L1 + MSE reconstruction
plus ``kl_weight`` x KL to N(0, I). ``kl_weight`` keeps LDM's meaning (KL summed over the
latent, relative to a reconstruction loss summed over pixels), so SD's 1e-6 is a sensible
value; both are divided by the number of pixel values to keep the loss O(1).

Training checkpoints to ``ckpt_dir`` and resumes from it bit-exactly (model, optimizer, step
and the data/noise generator state, medrl.checkpoints); the checkpoint is deleted on success.
"""
from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from medrl.checkpoints import TrainState, load_train_state, save_train_state
from medrl.errors import DataError
from medrl.io import load_image
from medrl.lr_schedule import default_warmup, warmup_lr
from medrl.progress import progress

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (reconstruction, target) -> scalar


def paths_digest(paths: list[Path]) -> str:
    """Identity of an ordered image list for checkpoint fingerprints (names, not contents)."""
    return hashlib.sha256("\n".join(str(p) for p in paths).encode()).hexdigest()


# ----------------------------------------------------------------------------- data


def load_images(paths: list[Path], size: int, mode: str) -> torch.Tensor:
    """(N, 3, size, size) float32 in [-1, 1]; grayscale ("L") repeated to 3 channels."""
    if mode not in ("RGB", "L"):
        raise DataError(f"image mode {mode!r}: expected 'RGB' or 'L'")
    if not paths:
        raise DataError("no images given; expected at least one image path")
    out = torch.empty(len(paths), 3, size, size)
    for i, p in enumerate(progress(paths, desc="load images")):
        img = load_image(p, size=size, mode=mode)
        out[i] = img.expand(3, -1, -1) if mode == "L" else img
    return out * 2.0 - 1.0


def edge_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of ``rec`` and ``x``.

    A 1-2 px hair or ruler tick is a few per cent of an image's pixels, so L1/MSE lets the
    autoencoder blur it away at little cost; its gradients are most of the image's edge
    energy, so matching them makes thin structures expensive to drop (the role LPIPS and
    the adversarial loss play in the LDM autoencoder, without weights to download)."""
    dx = (rec[..., :, 1:] - rec[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
    dy = (rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def latent_std(vae, x: torch.Tensor, batch_size: int = 64) -> float:
    """Std of the posterior means of ``x`` (in [-1, 1]) over all latent elements."""
    device = next(vae.parameters()).device
    zs = [vae.encode(x[i:i + batch_size].to(device)).latent_dist.mean.float().cpu() for i in range(0, len(x), batch_size)]
    return float(torch.cat(zs).std())


@torch.no_grad()
def recon_metrics(vae, x: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """MSE and PSNR in [0, 1] pixel space, encoding with the posterior mean."""
    device = next(vae.parameters()).device
    mses = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        rec = vae.decode(vae.encode(xb).latent_dist.mean).sample.clamp(-1, 1)
        mses.append((((rec - xb) / 2.0) ** 2).flatten(1).mean(1).float().cpu())
    mse = torch.cat(mses)
    psnr = 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return {"vae_recon_mse": float(mse.mean()), "vae_psnr": float(psnr.mean())}


# ----------------------------------------------------------------------------- training


def train_vae(
    vae,
    images: list[Path],
    *,
    size: int,
    mode: str,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    seed: int,
    ckpt_dir: Path,
    edge_weight: float = 0.0,
    extra_losses: Mapping[str, tuple[float, LossFn]] | None = None,
    device: str = "cpu",
    hflip: bool = True,
    checkpoint_every: int = 250,
    n_holdout: int = 64,
    callback: Callable[[int, float], None] | None = None,
) -> dict:
    """Train ``vae`` (an AutoencoderKL, modified in place) and set its scaling_factor to
    1/std of the training latents, as SD did to arrive at 0.18215.

    ``hflip``: random horizontal flips (label-preserving for dermoscopy; not for CXR, whose
    heart is on the left). A held-out slice of up to ``n_holdout`` images (10 %) is kept
    out of training and scored at the end. Returns final recon MSE / PSNR on it.
    ``callback(step, loss)`` runs after each step (and its checkpoint); an exception there
    aborts the run as a kill would, and the next call resumes from the checkpoint.
    ``extra_losses``: {name: (weight, loss(reconstruction, target))} added to the loss (an
    experiment's own terms; the names and weights are part of the checkpoint's settings)."""
    from torch.nn.utils import clip_grad_norm_

    images = [Path(p) for p in images]
    ckpt_dir = Path(ckpt_dir)
    x = load_images(images, size, mode)
    n = len(x)
    held, train, n_hold = _holdout_split(x, seed, n_holdout)
    weights = {"kl": kl_weight, "edge": edge_weight}
    extra = dict(extra_losses or {})
    config = _vae_run_config(vae, images, n=n, size=size, mode=mode, batch_size=batch_size, lr=lr, seed=seed,
                             hflip=hflip, steps=steps, weights=weights,
                             extra={k: w for k, (w, _) in extra.items()})
    gen = torch.Generator().manual_seed(seed + 1)
    vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start, losses = _resume_vae(vae, opt, gen, ckpt_dir, config)

    t0 = time.perf_counter()
    for step in progress(range(start, steps), desc="train vae", total=steps - start):
        for g in opt.param_groups:
            g["lr"] = warmup_lr(lr, step, steps, warmup=default_warmup(steps), floor=0.1)  # cosine to lr/10
        loss = _vae_step_loss(vae, train, gen, batch_size=batch_size, hflip=hflip, device=device, size=size,
                              weights=weights, extra=extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if done % checkpoint_every == 0 and done < steps:
            save_train_state(ckpt_dir, TrainState(tensors={"model": vae.state_dict(), "rng": {"generator": gen.get_state()}},
                                                  objects={"optimizer": opt.state_dict()},
                                                  meta={"step": done, "losses": losses}), config)
        if callback is not None:
            callback(done, losses[-1])
    elapsed = time.perf_counter() - t0

    metrics = _set_scaling_and_score(vae, train, held)
    metrics.update({
        "vae_steps": float(steps),
        "vae_loss_last": float(sum(losses[-50:]) / max(1, len(losses[-50:]))) if losses else float("nan"),
        "vae_steps_per_s": (steps - start) / elapsed if steps > start and elapsed > 0 else float("nan"),
        "vae_n_holdout": float(n_hold),
    })
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics


def _vae_run_config(vae, images: list[Path], *, n: int, size: int, mode: str, batch_size: int, lr: float, seed: int,
                    hflip: bool, steps: int, weights: dict[str, float], extra: dict[str, float]) -> dict:
    """What a checkpoint must match to be resumed (inputs, settings, VAE architecture)."""
    return {"kind": "vae", "images": paths_digest(images), "n": n, "size": size, "mode": mode,
            "batch_size": batch_size, "lr": lr, "kl_weight": weights["kl"], "seed": seed, "hflip": hflip,
            "edge_weight": weights["edge"],
            **({"extra_losses": extra} if extra else {}),
            "steps": steps,
            "vae_config": {k: v for k, v in vae.config.items() if not k.startswith("_")}}


def _holdout_split(x: torch.Tensor, seed: int, n_holdout: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(held-out images, training images, number held out): a seeded random ``min(n_holdout, 10 %)``
    slice is held out; with too few images to hold any out, the training set is scored (flagged)."""
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = min(n_holdout, n // 10)
    held, train = x[order[:n_hold]], x[order[n_hold:]]
    if n_hold == 0:  # too few images to hold any out: score on the training set (flagged)
        held = train
    return held, train, n_hold


def _resume_vae(vae, opt: torch.optim.Optimizer, gen: torch.Generator, ckpt_dir: Path, config: dict
                ) -> tuple[int, list[float]]:
    """Restore model, optimiser and sampling RNG from the checkpoint of the same ``config``, if any;
    returns (first step, losses so far)."""
    start, losses = 0, []
    resumed = load_train_state(ckpt_dir, config)
    if resumed is not None:
        vae.load_state_dict(resumed.tensors["model"])
        opt.load_state_dict(resumed.objects["optimizer"])
        gen.set_state(resumed.tensors["rng"]["generator"])
        start, losses = int(resumed.meta["step"]), [float(x) for x in resumed.meta["losses"]]
    return start, losses


def _vae_step_loss(vae, train: torch.Tensor, gen: torch.Generator, *, batch_size: int, hflip: bool, device: str,
                   size: int, weights: dict[str, float], extra: Mapping[str, tuple[float, LossFn]]) -> torch.Tensor:
    """Loss of one random (optionally flipped) batch: L1 + L2 reconstruction + weighted KL, plus the
    optional edge term (``weights``) and ``extra`` terms."""
    n_pix = 3 * size * size
    idx = torch.randint(len(train), (batch_size,), generator=gen)
    xb = train[idx]
    if hflip:
        flip = torch.rand(batch_size, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
    xb = xb.to(device)
    post = vae.encode(xb).latent_dist
    z = post.sample(generator=gen)
    rec = vae.decode(z).sample
    err = rec.float() - xb
    loss = err.abs().mean() + err.pow(2).mean() + weights["kl"] * post.kl().float().mean() / n_pix
    if weights["edge"]:
        loss = loss + weights["edge"] * edge_loss(rec.float(), xb)
    for w, fn in extra.values():
        loss = loss + w * fn(rec.float(), xb)
    return loss


def _set_scaling_and_score(vae, train: torch.Tensor, held: torch.Tensor) -> dict[str, float]:
    """Freeze ``vae``, set scaling_factor = 1/std of the training latents; reconstruction metrics on ``held``
    (plus ``vae_scaling_factor``)."""
    vae.eval().requires_grad_(False)
    std = latent_std(vae, train)
    if not math.isfinite(std) or std <= 0:
        raise RuntimeError(f"VAE latents have std {std}; training diverged")
    vae.register_to_config(scaling_factor=1.0 / std)
    metrics = recon_metrics(vae, held)
    metrics["vae_scaling_factor"] = 1.0 / std
    return metrics
