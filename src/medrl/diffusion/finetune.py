"""Supervised text-to-image fine-tuning of the stack's UNet on the latent store (the "base"
model that RL starts from: RL4Med fine-tunes SD v1.5 on ISIC; CXRL starts from RoentGen).

Standard SD training: noise the cached latents at uniform random timesteps and regress the
UNet's prediction onto the noise (or v, if the scheduler predicts v) with MSE. Prompts are
replaced by "" with probability ``cond_dropout`` so classifier-free guidance works. With
``train_text_encoder`` the text encoder is trained with the UNet (the embedded stack's tiny CLIP
is random: frozen, it passes the later words of a prompt to the UNet as little more than noise);
otherwise it is frozen and the embedding of every distinct prompt is computed once. With
``text_pretrain_steps`` N the first N steps train the text encoder (and the UNet) on each image's
true prompt and the rest train the UNet alone on the captions: as SD's CLIP learnt its words
elsewhere, planted caption noise then lands in the UNet, which RL's LoRA can change, and not in
the text condition, which it cannot (NOTEBOOK ISIC-13).

Every random draw of step ``s`` comes from a generator seeded by (seed, s) (batch order by
(seed, epoch)), so a run resumed from a checkpoint follows exactly the same trajectory as
an uninterrupted one; the checkpoint holds the UNet, AdamW state and loss history.
"""
from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from medrl.errors import DataError
from medrl.io import hash_path, write_table
from medrl.lr_schedule import default_warmup, warmup_lr
from medrl.progress import progress

# Step / epoch generators are seeded by seed * _MIX + counter: distinct streams per step.
_MIX = 1_000_003


def _gen(seed: int, counter: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _MIX + counter) % (2**63))


def _batch_indices(n: int, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This process's slice of the global batch: epoch-wise shuffled (drop-last); with
    fewer rows than a global batch, sampled with replacement. A pure function of
    (seed, step, rank) so resumption needs no sampler state."""
    if n < batch_size * world:
        return torch.randint(n, (batch_size,), generator=_gen(seed + 7 + 7919 * rank, step))
    per_epoch = n // (batch_size * world)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=_gen(seed + 13, epoch))
    start = (k * world + rank) * batch_size
    return perm[start:start + batch_size]


def _lr(step: int, steps: int, lr: float) -> float:
    return warmup_lr(lr, step, steps, warmup=default_warmup(steps), decay="constant")  # warm-up, then constant


def write_stack_with_unet(stack_dir: Path, unet, out_dir: Path, text_encoder=None) -> None:
    """``out_dir`` = ``stack_dir`` with its UNet (and, if given, its text encoder) replaced: the
    other parts are copied byte-for-byte, so the VAE hash (checked by the latent store) stays the same."""
    stack_dir, out_dir = Path(stack_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(stack_dir / "model_index.json", out_dir / "model_index.json")
    copied = ("vae", "tokenizer", "scheduler") + (("text_encoder",) if text_encoder is None else ())
    for sub in copied:
        shutil.copytree(stack_dir / sub, out_dir / sub, dirs_exist_ok=True)
    trained = {"unet": unet} if text_encoder is None else {"unet": unet, "text_encoder": text_encoder}
    for sub, module in trained.items():
        if (out_dir / sub).exists():
            shutil.rmtree(out_dir / sub)
        module.save_pretrained(str(out_dir / sub), safe_serialization=True)


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def finetune_base(
    stack_dir: Path,
    latents_dir: Path,
    out_dir: Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    cond_dropout: float,
    checkpoint_every: int,
    seed: int,
    ckpt_dir: Path,
    unet_weights: str | None = None,
    train_text_encoder: bool = False,
    text_pretrain_steps: int = 0,
    device: str = "cpu",
    mixed_precision: str = "no",
    callback: Callable[[int, float], None] | None = None,
    log_fn: Callable[[dict[str, float], int], None] | None = None,
    log_every: int = 50,
) -> dict:
    """Fine-tune the UNet of ``stack_dir`` on the ``split == "train"`` rows of the latent
    store and write the full stack to ``out_dir`` (plus ``out_dir/loss.csv``).

    ``unet_weights``: load that UNet state dict instead of training (e.g. the RL4Med
    authors' ``pretrained_unet.safetensors``). ``train_text_encoder``: train the text encoder
    too (written to ``out_dir/text_encoder``); with ``text_pretrain_steps`` only for that many first
    steps, on the true prompts (index column ``prompt``). ``callback(step, loss)`` runs after each
    step (and after its checkpoint); an exception there aborts the run as a kill would.
    ``log_fn(metrics, step)`` gets the running loss every ``log_every`` steps (main
    process). Under ``accelerate launch`` each process draws its own slice of the batch
    and only the main process writes checkpoints and outputs. Resumes from ``ckpt_dir``
    when it holds a checkpoint of the same settings, and deletes ``ckpt_dir`` on success."""
    from medrl.diffusion.stack import load_components

    stack_dir, latents_dir, out_dir, ckpt_dir = Path(stack_dir), Path(latents_dir), Path(out_dir), Path(ckpt_dir)
    _check_settings(cond_dropout, steps, train_text_encoder, text_pretrain_steps)
    accelerator = _accelerator(device, mixed_precision)
    dev, world, main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    c = load_components(str(stack_dir), unet_weights=unet_weights)
    if unet_weights is not None:
        return _install_given_unet(accelerator, c.unet, stack_dir, out_dir, ckpt_dir)
    lat, texts, truths = _train_latents(latents_dir, stack_dir, c.unet)
    # the true prompts are only read while the text encoder pre-trains
    prompts, (text_idx, truth_idx), emb = _prompt_conditions(c, [texts, truths if text_pretrain_steps else texts],
                                                             train_text_encoder)
    n_train_t, pred_type = _noise_target(c.scheduler, stack_dir)

    unet = Denoiser(c.unet, c.text_encoder if train_text_encoder else None)
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    config = _run_config(stack_dir, latents_dir, steps=steps, batch_size=batch_size, lr=lr, cond_dropout=cond_dropout,
                         seed=seed, mixed_precision=mixed_precision, processes=world,
                         train_text_encoder=train_text_encoder, text_pretrain_steps=text_pretrain_steps)
    unet, opt, start, losses = _prepare_or_resume(accelerator, unet, opt, ckpt_dir, config)
    emb, lat, text_idx, truth_idx = emb.to(dev), lat.to(dev), text_idx.to(dev), truth_idx.to(dev)
    denoiser = accelerator.unwrap_model(unet)
    t0 = time.perf_counter()
    for step in progress(range(start, steps), desc="finetune unet", total=steps - start):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        pretraining = step < text_pretrain_steps
        denoiser.text_frozen = bool(text_pretrain_steps) and not pretraining
        loss = _denoising_loss(accelerator, unet, c.scheduler, lat, emb, truth_idx if pretraining else text_idx,
                               step=step, seed=seed, batch_size=batch_size, cond_dropout=cond_dropout,
                               n_train_t=n_train_t, pred_type=pred_type)
        value = _optimizer_step(accelerator, unet, opt, loss, step)
        losses.append(value)
        done = step + 1
        if done % checkpoint_every == 0 and done < steps:
            _checkpoint(accelerator, unet, opt, ckpt_dir, done, losses, config)
        if log_fn is not None and main and (done % log_every == 0 or done == steps):
            log_fn({"finetune_loss": _mean(losses[-log_every:]), "finetune_lr": _lr(step, steps, lr)}, done)
        if callback is not None:
            callback(done, value)
    elapsed = time.perf_counter() - t0

    _write_finetuned(accelerator, unet, stack_dir, out_dir, ckpt_dir, losses)
    return _finetune_metrics(steps, start, losses, elapsed, n_train=len(lat), n_prompts=len(prompts) - 1)


def _run_config(stack_dir: Path, latents_dir: Path, *, train_text_encoder: bool, text_pretrain_steps: int,
                **settings: Any) -> dict:
    """What a checkpoint must match to be resumed: inputs, settings and the number of processes."""
    config = {"kind": "finetune_base", "unet": hash_path(stack_dir / "unet"),
              "latents": (latents_dir / "manifest.json").read_text(), **settings}
    if train_text_encoder:
        config["text_encoder"] = hash_path(stack_dir / "text_encoder")
    if text_pretrain_steps:
        config["text_pretrain_steps"] = text_pretrain_steps
    return config


def _check_settings(cond_dropout: float, steps: int, train_text_encoder: bool, text_pretrain_steps: int) -> None:
    if not 0.0 <= cond_dropout < 1.0:
        raise DataError(f"cond_dropout={cond_dropout}: expected a probability in [0, 1)")
    if text_pretrain_steps and not (train_text_encoder and text_pretrain_steps < steps):
        raise DataError(f"text_pretrain_steps={text_pretrain_steps}: expected 0, or fewer than steps={steps} "
                        f"with train_text_encoder (got {train_text_encoder})")


def _finetune_metrics(steps: int, start: int, losses: list[float], elapsed: float, *, n_train: int,
                      n_prompts: int) -> dict[str, float]:
    return {
        "finetune_steps": float(steps),
        "finetune_resumed_from": float(start),
        "finetune_loss_first100": _mean(losses[:100]),
        "finetune_loss_last100": _mean(losses[-100:]),
        "finetune_steps_per_s": (steps - start) / elapsed if steps > start and elapsed > 0 else float("nan"),
        "finetune_n_train": float(n_train),
        "finetune_n_prompts": float(n_prompts),
    }


def _accelerator(device: str, mixed_precision: str):
    """The accelerate ``Accelerator`` for ``device`` ("cpu", "auto" or a device name)."""
    from accelerate import Accelerator

    device = str(device)
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _optimizer_step(accelerator, unet, opt, loss: torch.Tensor, step: int) -> float:
    """Backward, clip to norm 1, step; returns the loss value (a non-finite loss stops the run)."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise RuntimeError(f"finetune_base: loss is {value} at step {step}; lower models.finetune_base.lr")
    return value


def _checkpoint(accelerator, unet, opt, ckpt_dir: Path, done: int, losses: list[float], config: dict) -> None:
    """Main process: save model, optimiser, step and losses to ``ckpt_dir``; every process waits for it."""
    from medrl.checkpoints import TrainState, save_train_state

    if accelerator.is_main_process:
        save_train_state(ckpt_dir, TrainState(tensors={"model": accelerator.unwrap_model(unet).state_dict()},
                                              objects={"optimizer": opt.state_dict()},
                                              meta={"step": done, "losses": losses}), config)
    accelerator.wait_for_everyone()


def _install_given_unet(accelerator, unet, stack_dir: Path, out_dir: Path, ckpt_dir: Path) -> dict:
    """``unet_weights`` given: write the stack with that UNet (no training) and an empty loss.csv."""
    if accelerator.is_main_process:
        write_stack_with_unet(stack_dir, unet, out_dir)
        write_table(pd.DataFrame({"step": [], "loss": []}), out_dir / "loss.csv")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return {"finetune_steps": 0.0, "unet_weights_loaded": 1.0}


def _train_latents(latents_dir: Path, stack_dir: Path, unet) -> tuple[torch.Tensor, list[str], list[str]]:
    """The latents, texts and true prompts of the ``split == "train"`` rows of the latent store
    that the fine-tune uses (``finetune`` 1), checked against the UNet."""
    from medrl.diffusion.latents import load_latents

    latents, index = load_latents(latents_dir, expect_vae=stack_dir)
    train = (index["split"] == "train").to_numpy() & (index["finetune"] == "1").to_numpy()
    if not train.any():
        raise DataError(f"{latents_dir / 'index.csv'}: no rows with split == 'train' (and finetune == 1)")
    lat = latents[torch.as_tensor(train.copy())]
    texts = index.loc[train, "text"].astype(str).tolist()
    truths = index.loc[train, "prompt"].astype(str).tolist()
    if tuple(lat.shape[1:2]) != (unet.config.in_channels,):
        raise DataError(f"{latents_dir}: latents have {lat.shape[1]} channels; the UNet of {stack_dir} "
                        f"expects {unet.config.in_channels}")
    return lat, texts, truths


class Denoiser(torch.nn.Module):
    """The UNet conditioned on prompt embeddings or, with a (trained) text encoder, on token ids;
    ``text_frozen`` runs that encoder without gradients (it then gets no update)."""

    def __init__(self, unet, text_encoder=None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.text_frozen = False

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.text_encoder is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text_frozen):
                cond = self.text_encoder(cond)[0]
        return self.unet(noisy, t, cond).sample


def _prompt_conditions(c, columns: list[list[str]], token_ids: bool) -> tuple[list[str], list[torch.Tensor], torch.Tensor]:
    """(prompts, per text column the index of each row's prompt, one condition per prompt): the
    frozen text encoder's embeddings, or with ``token_ids`` the padded token ids a trained encoder
    reads. Row 0 is the unconditional ("") prompt used for dropped prompts."""
    from medrl.diffusion.stack import encode_prompts

    prompts = [""] + sorted(set().union(*columns))
    pos = {p: i for i, p in enumerate(prompts)}
    text_idx = [torch.tensor([pos[t] for t in texts]) for texts in columns]
    if token_ids:
        tok = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
        return prompts, text_idx, tok.input_ids
    with torch.no_grad():
        emb = torch.cat([encode_prompts(c, prompts[i:i + 64]).float() for i in range(0, len(prompts), 64)])
    return prompts, text_idx, emb


def _noise_target(sched, stack_dir: Path) -> tuple[int, str]:
    """(number of training timesteps, prediction type) of the stack's scheduler."""
    n_train_t = int(sched.config.num_train_timesteps)
    pred_type = sched.config.prediction_type
    if pred_type not in ("epsilon", "v_prediction"):
        raise DataError(f"{stack_dir}/scheduler: prediction_type {pred_type!r}; expected epsilon or v_prediction")
    return n_train_t, pred_type


def _prepare_or_resume(accelerator, unet, opt, ckpt_dir: Path, config: dict) -> tuple[Any, Any, int, list[float]]:
    """Load the checkpoint of the same ``config`` if any, then hand model and optimiser to accelerate;
    returns (unet, optimiser, first step, losses so far)."""
    from medrl.checkpoints import load_train_state

    start, losses = 0, []
    resumed = load_train_state(ckpt_dir, config)
    if resumed is not None:
        unet.load_state_dict(resumed.tensors["model"])
        start, losses = int(resumed.meta["step"]), [float(x) for x in resumed.meta["losses"]]
    unet, opt = accelerator.prepare(unet, opt)
    if resumed is not None:
        opt.load_state_dict(resumed.objects["optimizer"])
    return unet, opt, start, losses


def _denoising_loss(accelerator, unet, sched, lat: torch.Tensor, emb: torch.Tensor, text_idx: torch.Tensor, *,
                    step: int, seed: int, batch_size: int, cond_dropout: float, n_train_t: int,
                    pred_type: str) -> torch.Tensor:
    """The diffusion loss of step ``step``'s batch (this process's slice; noise, timesteps and prompt
    dropout drawn from the step's own generator)."""
    dev = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    idx = _batch_indices(len(lat), batch_size, seed, step, rank, world).to(dev)
    gen = _gen(seed + 7919 * rank, step)
    noise = torch.randn((batch_size, *lat.shape[1:]), generator=gen).to(dev)
    t = torch.randint(0, n_train_t, (batch_size,), generator=gen).to(dev)
    drop = (torch.rand(batch_size, generator=gen) < cond_dropout).to(dev)
    x0 = lat[idx]
    cond = emb[torch.where(drop, torch.zeros_like(idx), text_idx[idx])]
    noisy = sched.add_noise(x0, noise, t)
    target = noise if pred_type == "epsilon" else sched.get_velocity(x0, noise, t)
    with accelerator.autocast():
        pred = unet(noisy, t, cond)
    return F.mse_loss(pred.float(), target.float())


def _write_finetuned(accelerator, unet, stack_dir: Path, out_dir: Path, ckpt_dir: Path, losses: list[float]) -> None:
    """Main process: the stack with the trained UNet, loss.csv; the checkpoint is removed."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(unet).to("cpu", dtype=torch.float32).eval().requires_grad_(False)
        write_stack_with_unet(stack_dir, final.unet, out_dir, text_encoder=final.text_encoder)
        # the main process's loss trajectory (with several processes, its own batches)
        write_table(pd.DataFrame({"step": range(1, len(losses) + 1), "loss": losses}), out_dir / "loss.csv")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
