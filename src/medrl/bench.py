"""``medrl bench``: DDPO sampling / training throughput and peak memory.

Measures, for the tiny stack of params ``models.tiny`` (random weights, CPU or CUDA) and, with
``--sd15``, an SD-v1.5-sized UNet + VAE (random weights; CUDA, or CPU with ``--allow-cpu-sd15``):
  * sampling: trajectories/s of ``sample_with_logprob`` (DDIM + CFG + log-probs + VAE decode);
  * training: sample-timesteps/s of the PPO update (CFG forward of the LoRA UNet, DDIM log-prob,
    clipped loss, backward, AdamW step);
  * peak memory: CUDA ``max_memory_allocated`` per phase, or the process's peak RSS
    (``resource.getrusage``) on CPU (monotone over the process: it includes model building).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medrl.io import write_json

# SD v1.5's UNet / VAE configs (diffusers' defaults differ: cross_attention_dim 1280, no sample_size).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


# ----------------------------------------------------------------------------- tiny stack


def write_byte_tokenizer(out_dir: Path, max_length: int = 77) -> Path:
    """A byte-level CLIPTokenizer (no merges beyond bytes) saved to ``out_dir``.

    Enough for benchmarks and tests that need a real tokenizer without downloading CLIP's."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from medrl.data.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(chars)}
    vocab.update({ch + "</w>": len(chars) + i for i, ch in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    raw = out_dir / "_raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(str(out_dir))
    return out_dir


def tiny_stack(out_dir: Path, *, size: int = 64, tiny: dict | None = None, seed: int = 0, max_length: int = 77) -> Path:
    """Build a random-init tiny SD stack (``models.tiny`` defaults unless ``tiny`` is given)
    in ``out_dir`` via ``medrl.models.tiny_sd.build_tiny_stack``; returns ``out_dir``."""
    from medrl.config import Tiny
    from medrl.models.tiny_sd import build_tiny_stack

    out_dir = Path(out_dir)
    cfg = Tiny().model_dump()
    cfg.update(tiny or {})
    tok_dir = write_byte_tokenizer(out_dir.parent / f".{out_dir.name}.tokenizer", max_length=max_length)
    build_tiny_stack(out_dir, tok_dir, cfg, size, seed)
    return out_dir


# ----------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench_model(
    name: str,
    unet,
    vae,
    scheduler,
    *,
    embed_len: int,
    embed_dim: int,
    device: torch.device,
    batch: int,
    num_steps: int,
    train_batch: int,
    train_micro_steps: int,
    guidance_scale: float = 5.0,
    lora_rank: int = 4,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one sampling call of ``batch`` trajectories and ``train_micro_steps`` PPO micro-steps."""
    from medrl.rl.ddim import ddim_step_with_logprob
    from medrl.rl.lora import add_lora, lora_parameters
    from medrl.rl.ppo import ppo_loss
    from medrl.rl.sampling import guided_eps, sample_with_logprob

    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, embed_len, embed_dim, generator=g).to(device)
    uncond = torch.randn(1, embed_len, embed_dim, generator=g).to(device).expand(batch, -1, -1)
    add_lora(unet, lora_rank, seed=seed)
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else torch.autocast(device.type, enabled=False))

    def sample(steps: int, b: int):
        with amp:
            return sample_with_logprob(unet, vae, scheduler, cond[:b], uncond[:b], num_steps=steps,
                                       guidance_scale=guidance_scale, eta=1.0,
                                       generator=torch.Generator(device).manual_seed(seed))

    sample(2, min(batch, 2))  # warm-up (allocator, kernels, lazy init)
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    traj = sample(num_steps, batch)
    _sync(device)
    t_sample = time.perf_counter() - t0
    mem_sample = _peak_mb(device)

    params = lora_parameters(unet)
    opt = torch.optim.AdamW(params, lr=1e-4)
    unet.train()

    def micro(k: int):
        i = torch.arange(train_batch, device=device) % batch
        s = torch.full((train_batch,), k % num_steps, device=device)
        with amp:
            eps = guided_eps(unet, traj.latents[i, s], traj.timesteps[i, s], cond[i], uncond[i], guidance_scale)
        _, logp = ddim_step_with_logprob(scheduler, eps.float(), traj.timesteps[i, s], traj.latents[i, s],
                                         eta=1.0, prev_sample=traj.latents[i, s + 1])
        loss, _ = ppo_loss(logp, traj.log_probs[i, s], torch.randn(train_batch, device=device), 1e-4, 5.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    micro(0)  # warm-up
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    for k in range(train_micro_steps):
        micro(k)
    _sync(device)
    t_train = time.perf_counter() - t0
    mem_train = _peak_mb(device)
    n_unet = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
    return {
        "model": name,
        "device": str(device),
        "unet_params_M": n_unet / 1e6,
        "lora_params_M": sum(p.numel() for p in params) / 1e6,
        "latent": list(traj.latents.shape[-3:]),
        "image": list(traj.images.shape[-3:]),
        "batch": batch,
        "num_steps": num_steps,
        "sample_s": t_sample,
        "trajectories_per_s": batch / t_sample,
        "train_batch": train_batch,
        "train_micro_steps": train_micro_steps,
        "train_s": t_train,
        "sample_timesteps_per_s": train_batch * train_micro_steps / t_train,
        "peak_mem_sample_MB": mem_sample,
        "peak_mem_train_MB": mem_train,
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
    }


def _tiny_cfg(params_path: Path | None) -> dict:
    """models.tiny from params.yaml when given and present, else the schema defaults."""
    from medrl.config import Tiny, load_params

    if params_path is not None and Path(params_path).is_file():
        return load_params(params_path, check_paths=False).models.tiny.model_dump()
    return Tiny().model_dump()


def _tiny(args, device: torch.device) -> dict[str, Any]:
    from medrl.models.tiny_sd import load_components

    with tempfile.TemporaryDirectory(prefix="medrl-bench-") as tmp:
        stack = tiny_stack(Path(tmp) / "stack", size=args.tiny_size, tiny=_tiny_cfg(args.params), seed=args.seed)
        c = load_components(str(stack), device=str(device))
    return bench_model(
        f"tiny({args.tiny_size}px)", c.unet, c.vae, c.scheduler,
        embed_len=c.tokenizer.model_max_length, embed_dim=c.text_encoder.config.hidden_size,
        device=device, batch=args.batch, num_steps=args.steps, train_batch=args.train_batch,
        train_micro_steps=args.train_micro_steps, lora_rank=args.lora_rank, seed=args.seed,
    )


def _sd15(args, device: torch.device) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from medrl.models.tiny_sd import SD15_SCHEDULER

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        unet = UNet2DConditionModel(**SD15_UNET).to(device).eval().requires_grad_(False)
        vae = AutoencoderKL(**SD15_VAE).to(device).eval().requires_grad_(False)
    amp = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    return bench_model(
        "sd15(512px)", unet, vae, DDIMScheduler(**SD15_SCHEDULER),
        embed_len=77, embed_dim=768, device=device, batch=args.sd15_batch, num_steps=args.steps,
        train_batch=args.sd15_train_batch, train_micro_steps=args.train_micro_steps,
        lora_rank=args.lora_rank, autocast_dtype=amp, seed=args.seed,
    )


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [("model", "model"), ("device", "device"), ("batch", "B"), ("num_steps", "T"),
            ("trajectories_per_s", "traj/s"), ("sample_timesteps_per_s", "sample-t/s"),
            ("peak_mem_sample_MB", "peak MB (sample)"), ("peak_mem_train_MB", "peak MB (train)")]
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    cells = [[h for _, h in cols]] + [[fmt(r[k]) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="medrl bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (tiny model)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"),
                    help="read models.tiny from this params file if it exists (else schema defaults)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps per trajectory (rl.common.num_steps)")
    ap.add_argument("--batch", type=int, default=8, help="trajectories per sampling call (tiny)")
    ap.add_argument("--train-batch", type=int, default=8, help="samples per PPO micro-step (tiny)")
    ap.add_argument("--train-micro-steps", type=int, default=10, help="timed PPO micro-steps")
    ap.add_argument("--tiny-size", type=int, default=64, help="tiny model image size (isic.prepare.size)")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--sd15", action="store_true", help="also an SD-v1.5-sized UNet+VAE (random weights) on CUDA")
    ap.add_argument("--allow-cpu-sd15", action="store_true", help="run --sd15 on CPU too (very slow)")
    ap.add_argument("--sd15-batch", type=int, default=4)
    ap.add_argument("--sd15-train-batch", type=int, default=2)
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast for --sd15")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if (args.device == "auto" and cuda) else ("cpu" if args.device == "auto" else args.device))

    rows = [_tiny(args, device)]
    notes = []
    if args.sd15:
        if cuda:
            rows.append(_sd15(args, torch.device("cuda")))
        elif args.allow_cpu_sd15:
            rows.append(_sd15(args, torch.device("cpu")))
        else:
            notes.append("--sd15 skipped: no CUDA device (pass --allow-cpu-sd15 to run it on CPU)")
    print(_table(rows))
    for n in notes:
        print(n)
    if args.out is not None:
        write_json(args.out, {
            "results": rows,
            "notes": notes,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if cuda else None,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
