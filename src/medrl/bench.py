"""``medrl bench``: DDPO sampling / training throughput, peak memory and the ratio to a baseline.

Measures, for the tiny stack of params ``models.tiny`` (random weights, CPU or CUDA) and, with
``--sd15``, an SD-v1.5-shaped UNet + VAE (random weights; CUDA, CPU with ``--allow-cpu-sd15``,
or CPU-sized with ``--sd15-tiny``):
  * sampling: trajectories/s of ``sample_with_logprob`` (DDIM + CFG + log-probs + VAE decode);
  * training: sample-timesteps/s of the PPO update (CFG forward of the LoRA (or full) UNet, DDIM
    log-prob, clipped loss, backward, AdamW step); ``--accumulate N`` steps the optimizer every N
    micro-steps (default 1, the baseline's workload) and ``--fuse K`` runs K micro-steps of a group
    in one forward/backward, as the trainer's ``fuse_micro_steps`` does (same gradient);
  * ``--merge-lora`` samples with LoRA merged into the base weights (Sampler.merge_lora);
  * ``--attention-heads N`` builds the tiny UNet with N heads instead of ``models.tiny``'s: the
    head count is part of the workload, so only the baseline's 8 are compared with it;
  * peak memory: CUDA ``max_memory_allocated`` per phase, or the process's peak RSS
    (``resource.getrusage``) on CPU (monotone over the process: it includes model building);
  * with ``--mixed-precision``/``--compile``/``--channels-last``: ``logprob_drift``, the largest
    difference of the recorded steps' log-probs re-evaluated under that setting vs fp32 eager;
  * with ``--flops`` (always with ``--sd15`` on CUDA): UNet FLOPs counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on one CFG forward (sampling step) and one
    forward+backward (PPO micro-step), the achieved TFLOP/s and MFU against the device's dense
    bf16 peak (``--peak-tflops`` to override the table);
  * ``--gpu-check``: the one-script GPU run (SD-v1.5 shapes, bf16, FLOPs/MFU, and one DDPO epoch at
    RL4Med's per-GPU shape: 64 trajectories, 50 DDIM steps, LoRA);
  * ``--cost-table``: CPU epoch time (``train_ddpo``, one epoch) against trajectories per epoch,
    DDIM steps and latent size, as a markdown table.
Results are compared with the saved baseline JSON (``--baseline``, default the committed
``bench_baseline.json`` of the code before issue 19) when the workload matches.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import resource
import statistics
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
# The same architecture (blocks, layers, heads, 768-wide text) at 1/10 of the width and 64 px:
# the CPU form of --sd15 / --gpu-check that a test runs.
SD15_TINY_UNET = {**SD15_UNET, "sample_size": 8, "block_out_channels": (32, 64, 128, 128)}
SD15_TINY_VAE = {**SD15_VAE, "block_out_channels": (32, 32, 64, 64), "sample_size": 64}
# Dense bf16 tensor-core peaks (TFLOP/s, SXM parts) for MFU; matched against the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
BASELINE = Path(__file__).with_name("bench_baseline.json")
# Workload keys that must match the baseline's for a ratio to mean anything.
_SAME = ("model", "batch", "num_steps", "train_batch", "train_micro_steps", "latent", "unet_params_M", "lora_params_M",
         "accumulate", "attention_heads")
# What a baseline without the key ran. The head count leaves the parameter count unchanged but
# sets the attention's cost, so it is part of the workload.
_SAME_DEFAULT = {"accumulate": 1, "attention_heads": 8}


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
    in ``out_dir`` via ``medrl.diffusion.stack.build_tiny_stack``; returns ``out_dir``."""
    from medrl.config import Tiny
    from medrl.diffusion.stack import build_tiny_stack

    out_dir = Path(out_dir)
    cfg = Tiny().model_dump()
    cfg.update(tiny or {})
    tok_dir = write_byte_tokenizer(out_dir.parent / f".{out_dir.name}.tokenizer", max_length=max_length)
    build_tiny_stack(out_dir, tok_dir, cfg, size, seed)
    return out_dir


# ----------------------------------------------------------------------------- measurement


@dataclasses.dataclass
class Workload:
    """What one bench row runs: sampling ``batch`` trajectories of ``num_steps`` DDIM steps, and
    ``train_micro_steps`` PPO micro-steps of ``train_batch`` recorded steps each."""

    batch: int = 8
    num_steps: int = 20
    train_batch: int = 8
    train_micro_steps: int = 10
    guidance_scale: float = 5.0
    lora_rank: int = 4
    full_finetune: bool = False
    mixed_precision: str = "no"  # no | fp16 | bf16 (autocast)
    compile: bool = False  # torch.compile the UNet (inductor)
    channels_last: bool = False
    repeats: int = 1  # timed repetitions of each phase; the median is reported
    seed: int = 0
    accumulate: int = 1  # PPO micro-steps per optimizer step (1: the baseline's workload)
    fuse: int = 1  # micro-steps of one accumulation group per forward/backward (the trainer's fuse_micro_steps)
    merge_lora: bool = False  # sample with LoRA merged into the base weights (Sampler.merge_lora)


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


def _amp(device: torch.device, mixed_precision: str):
    dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _timed(fn, device: torch.device, repeats: int, warmup=None) -> tuple[list[float], Any]:
    """Run ``warmup`` (default ``fn``) once, then ``fn`` ``repeats`` times; (seconds per run, last result)."""
    out = (warmup or fn)()
    _sync(device)
    _reset_peak(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


def _trainable(unet, w: Workload) -> list[torch.nn.Parameter]:
    from medrl.diffusion.lora import add_lora, lora_parameters

    if w.full_finetune:
        unet.requires_grad_(True)
        return [p for p in unet.parameters() if p.requires_grad]
    add_lora(unet, w.lora_rank, seed=w.seed)
    return lora_parameters(unet)


def _fast(unet, w: Workload):
    """The UNet as the workload runs it: channels-last memory format and/or torch.compile."""
    if w.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if w.compile:
        unet = torch.compile(unet, dynamic=False)
    return unet


@dataclasses.dataclass
class _Bench:
    """The models and inputs of one bench row."""

    unet: Any  # eager, fp32 weights (the log-prob reference)
    run_unet: Any  # as the workload runs it (_fast)
    vae: Any
    scheduler: Any
    cond: torch.Tensor
    uncond: torch.Tensor
    device: torch.device
    w: Workload

    def sample(self, steps: int, b: int):
        """``b`` trajectories of ``steps`` steps, all noise from one generator seeded w.seed."""
        from medrl.diffusion.sampler import Noise, Sampler

        sampler = Sampler(self.run_unet, self.vae, self.scheduler, self.uncond, num_steps=steps,
                          guidance_scale=self.w.guidance_scale, eta=1.0, merge_lora=self.w.merge_lora)
        with _amp(self.device, self.w.mixed_precision):
            return sampler.sample(self.cond[:b], Noise(self.w.seed))

    def step_logp(self, unet, traj, i: torch.Tensor, s: torch.Tensor, amp: bool = True) -> torch.Tensor:
        """Log-probs of the recorded steps s of samples i under ``unet`` (CFG forward, DDIM step)."""
        from medrl.diffusion.ddim import ddim_step_with_logprob
        from medrl.diffusion.rollout import guided_eps

        with _amp(self.device, self.w.mixed_precision if amp else "no"):
            eps = guided_eps(unet, traj.latents[i, s], traj.timesteps[i, s], self.cond[i], self.uncond[i],
                             self.w.guidance_scale)
        return ddim_step_with_logprob(self.scheduler, eps.float(), traj.timesteps[i, s], traj.latents[i, s],
                                      eta=1.0, prev_sample=traj.latents[i, s + 1])[1]


def _train_group(b: _Bench, traj, opt, params, ks: Sequence[int]) -> None:
    """One optimizer step over the PPO micro-steps ``ks`` (micro-step k: train_batch recorded
    steps, sample i, step k mod T), run w.fuse at a time in one forward/backward; the loss is
    their mean, as in the trainer's accumulation group."""
    from medrl.rl.ppo import ppo_loss

    w, device, n = b.w, b.device, b.w.train_batch
    i1 = torch.arange(n, device=device) % traj.latents.shape[0]
    for c0 in range(0, len(ks), w.fuse):
        chunk = ks[c0:c0 + w.fuse]
        i = i1.repeat(len(chunk))
        s = torch.tensor([k % w.num_steps for k in chunk], device=device).repeat_interleave(n)
        logp = b.step_logp(b.run_unet, traj, i, s)
        losses = [ppo_loss(logp[j * n:(j + 1) * n], traj.log_probs[i1, s[j * n]], torch.randn(n, device=device),
                           1e-4, 5.0)[0] for j in range(len(chunk))]
        (torch.stack(losses).sum() / len(ks)).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _train(b: _Bench, traj, opt, params) -> None:
    """The timed training phase: w.train_micro_steps micro-steps in groups of w.accumulate."""
    m, a = b.w.train_micro_steps, b.w.accumulate
    for g0 in range(0, m, a):
        _train_group(b, traj, opt, params, range(g0, min(g0 + a, m)))


@torch.no_grad()
def logprob_drift(b: _Bench, traj) -> float:
    """max |log pi_setting - log pi_fp32| over the recorded steps of ``traj``: the error the
    workload's precision / compile / memory format puts into the PPO ratio's log-probs."""
    n, T = traj.log_probs.shape
    i = torch.arange(n, device=b.device)
    worst = 0.0
    for k in range(T):
        s = torch.full((n,), k, device=b.device)
        ref = b.step_logp(b.unet, traj, i, s, amp=False)
        worst = max(worst, (b.step_logp(b.run_unet, traj, i, s) - ref).abs().max().item())
    return worst


def unet_flops(b: _Bench, traj) -> tuple[float, float]:
    """UNet FLOPs counted by FlopCounterMode: one sampling step (CFG forward of the sampling
    batch) and one PPO micro-step (CFG forward + backward of train_batch recorded steps)."""
    from torch.utils.flop_counter import FlopCounterMode

    from medrl.diffusion.rollout import guided_eps

    n = traj.latents.shape[0]
    with FlopCounterMode(display=False) as fc, torch.no_grad(), _amp(b.device, b.w.mixed_precision):
        guided_eps(b.unet, traj.latents[:, 0], traj.timesteps[:, 0], b.cond[:n], b.uncond[:n], b.w.guidance_scale)
    sample_step = float(fc.get_total_flops())
    i = torch.arange(b.w.train_batch, device=b.device) % n
    s = torch.zeros(b.w.train_batch, dtype=torch.long, device=b.device)
    with FlopCounterMode(display=False) as fc:
        b.step_logp(b.unet, traj, i, s).sum().backward()
    b.unet.zero_grad(set_to_none=True)
    return sample_step, float(fc.get_total_flops())


def _peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def bench_model(name: str, unet, vae, scheduler, *, embed_len: int, embed_dim: int, device: torch.device,
                w: Workload, flops: bool = False, peak_tflops: float | None = None) -> dict[str, Any]:
    """Time sampling ``w.batch`` trajectories and ``w.train_micro_steps`` PPO micro-steps."""
    g = torch.Generator().manual_seed(w.seed)
    cond = torch.randn(w.batch, embed_len, embed_dim, generator=g).to(device)
    uncond = torch.randn(1, embed_len, embed_dim, generator=g).to(device).expand(w.batch, -1, -1)
    params = _trainable(unet, w)
    b = _Bench(unet, _fast(unet, w), vae, scheduler, cond, uncond, device, w)
    b.sample(2, min(w.batch, 2))  # warm-up (allocator, kernels, lazy init, compilation)
    t_sample, traj = _timed(lambda: b.sample(w.num_steps, w.batch), device, w.repeats)
    mem_sample = _peak_mb(device)
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    unet.train()
    t_train, _ = _timed(lambda: _train(b, traj, opt, params), device, w.repeats,
                        warmup=lambda: _train_group(b, traj, opt, params, range(min(w.accumulate, w.train_micro_steps))))
    row = {
        "model": name, "device": str(device), **dataclasses.asdict(w),
        "unet_params_M": sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n) / 1e6,
        "attention_heads": unet.config.attention_head_dim,
        "lora_params_M": 0.0 if w.full_finetune else sum(p.numel() for p in params) / 1e6,
        "trainable_params_M": sum(p.numel() for p in params) / 1e6,
        "latent": list(traj.latents.shape[-3:]), "image": list(traj.images.shape[-3:]),
        "sample_s": statistics.median(t_sample), "sample_s_runs": t_sample,
        "train_s": statistics.median(t_train), "train_s_runs": t_train,
        "peak_mem_sample_MB": mem_sample, "peak_mem_train_MB": _peak_mb(device),
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
    }
    row["trajectories_per_s"] = w.batch / row["sample_s"]
    row["sample_timesteps_per_s"] = w.train_batch * w.train_micro_steps / row["train_s"]
    if w.mixed_precision != "no" or w.compile or w.channels_last:
        unet.eval()
        row["logprob_drift"] = logprob_drift(b, traj)
    if flops:
        row.update(_mfu(b, traj, row, _peak_tflops(device, peak_tflops)))
    return row


def _mfu(b: _Bench, traj, row: dict[str, Any], peak: float | None) -> dict[str, Any]:
    """Achieved UNet TFLOP/s and MFU of both phases (VAE decode and the DDIM step not counted)."""
    f_sample, f_train = unet_flops(b, traj)
    out = {"unet_gflop_per_sample_step": f_sample / 1e9, "unet_gflop_per_train_micro_step": f_train / 1e9,
           "sample_tflops": f_sample * b.w.num_steps / row["sample_s"] / 1e12,
           "train_tflops": f_train * b.w.train_micro_steps / row["train_s"] / 1e12, "peak_tflops": peak}
    out["sample_mfu"] = out["sample_tflops"] / peak if peak else None
    out["train_mfu"] = out["train_tflops"] / peak if peak else None
    return out


# ----------------------------------------------------------------------------- models and runs


def _tiny_cfg(params_path: Path | None) -> dict:
    """models.tiny from params.yaml when given and present, else the schema defaults."""
    from medrl.config import Tiny, load_params

    if params_path is not None and Path(params_path).is_file():
        return load_params(params_path, check_paths=False).models.tiny.model_dump()
    return Tiny().model_dump()


def _workload(args, sd15: bool = False) -> Workload:
    return Workload(
        batch=args.sd15_batch if sd15 else args.batch, num_steps=args.steps,
        train_batch=args.sd15_train_batch if sd15 else args.train_batch, train_micro_steps=args.train_micro_steps,
        lora_rank=args.lora_rank, full_finetune=args.full_finetune, mixed_precision=args.mixed_precision,
        compile=args.compile, channels_last=args.channels_last, repeats=args.repeats, seed=args.seed,
        accumulate=args.accumulate, fuse=args.fuse or args.accumulate, merge_lora=args.merge_lora,
    )


def _tiny(args, device: torch.device) -> dict[str, Any]:
    from medrl.diffusion.stack import load_components

    with tempfile.TemporaryDirectory(prefix="medrl-bench-") as tmp:
        tiny = _tiny_cfg(args.params)
        if args.attention_heads:
            tiny["attention_head_dim"] = args.attention_heads
        stack = tiny_stack(Path(tmp) / "stack", size=args.tiny_size, tiny=tiny, seed=args.seed)
        c = load_components(str(stack), device=str(device))
    return bench_model(
        f"tiny({args.tiny_size}px)", c.unet, c.vae, c.scheduler, embed_len=c.tokenizer.model_max_length,
        embed_dim=c.text_encoder.config.hidden_size, device=device, w=_workload(args), flops=args.flops,
        peak_tflops=args.peak_tflops,
    )


def sd15_models(device: torch.device, *, tiny: bool = False, seed: int = 0):
    """(name, unet, vae, scheduler) of SD v1.5's shapes with random weights (``tiny``: 1/10 width, 64 px)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from medrl.diffusion.stack import SD15_SCHEDULER

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(SD15_TINY_UNET if tiny else SD15_UNET)).to(device).eval().requires_grad_(False)
        vae = AutoencoderKL(**(SD15_TINY_VAE if tiny else SD15_VAE)).to(device).eval().requires_grad_(False)
    return ("sd15-tiny(64px)" if tiny else "sd15(512px)"), unet, vae, DDIMScheduler(**SD15_SCHEDULER)


def _sd15(args, device: torch.device) -> dict[str, Any]:
    name, unet, vae, scheduler = sd15_models(device, tiny=args.sd15_tiny, seed=args.seed)
    return bench_model(name, unet, vae, scheduler, embed_len=77, embed_dim=768, device=device,
                       w=_workload(args, sd15=True), flops=True, peak_tflops=args.peak_tflops)


def ddpo_epoch(device: torch.device, *, tiny: bool, trajectories: int = 64, num_steps: int = 50,
               sample_batch: int = 16, train_batch: int = 8, mixed_precision: str = "bf16", lora_rank: int = 4,
               seed: int = 0) -> dict[str, Any]:
    """One DDPO epoch at SD-v1.5 shapes, the trainer's steps without a reward model: sample
    ``trajectories`` in batches of ``sample_batch``, then PPO micro-steps over every recorded
    (sample, step) pair in batches of ``train_batch`` (LoRA, AdamW, grad clipping)."""
    from medrl.rl.ppo import ppo_loss

    _, unet, vae, scheduler = sd15_models(device, tiny=tiny, seed=seed)
    w = Workload(batch=sample_batch, num_steps=num_steps, train_batch=train_batch, lora_rank=lora_rank,
                 mixed_precision=mixed_precision, seed=seed)
    g = torch.Generator().manual_seed(seed)
    params = _trainable(unet, w)
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    cond = torch.randn(trajectories, 77, 768, generator=g).to(device)
    b = _Bench(unet, unet, vae, scheduler, cond, torch.zeros_like(cond), device, w)
    _reset_peak(device)
    t0 = time.perf_counter()
    parts = [b.sample(num_steps, sample_batch) for _ in range(-(-trajectories // sample_batch))]
    traj = dataclasses.replace(parts[0], **{k: torch.cat([getattr(p, k) for p in parts])[:trajectories]
                                           for k in ("latents", "log_probs", "timesteps")})
    _sync(device)
    t_sample = time.perf_counter() - t0
    unet.train()
    pairs = torch.randperm(trajectories * num_steps, generator=g).to(device)
    for start in range(0, len(pairs), train_batch):
        p = pairs[start:start + train_batch]
        i, s = p // num_steps, p % num_steps
        logp = b.step_logp(unet, traj, i, s)
        loss, _ = ppo_loss(logp, traj.log_probs[i, s], torch.randn(len(p), generator=g).to(device), 1e-4, 5.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    t_epoch = time.perf_counter() - t0
    return {"trajectories": trajectories, "num_steps": num_steps, "sample_batch": sample_batch, "train_batch": train_batch,
            "mixed_precision": mixed_precision, "sample_s": t_sample, "train_s": t_epoch - t_sample, "epoch_s": t_epoch,
            "peak_mem_MB": _peak_mb(device)}


def cost_table(size: int = 64, base: dict[str, Any] | None = None, params_path: Path | None = None) -> list[dict]:
    """CPU epoch time of ``train_ddpo`` (one epoch, params' rl.common + rl.isic, no reward model,
    no base comparison) varying trajectories per epoch, DDIM steps and latent size, 3 points each."""
    base = {"trajectories": 32, "num_steps": 10, "size": size, **(base or {})}
    points = [{**base, "trajectories": n} for n in (16, 32, 64)] + [{**base, "num_steps": n} for n in (5, 10, 20)]
    points += [{**base, "size": s} for s in (size // 2, size, size * 2)]
    rows, seen = [], {}
    for p in points:
        key = tuple(sorted(p.items()))
        if key not in seen:
            seen[key] = epoch_time(p["trajectories"], p["num_steps"], p["size"], params_path=params_path)
        rows.append({**p, "latent": p["size"] // 4, "epoch_s": seen[key]})
    return rows


def epoch_time(trajectories: int, num_steps: int, size: int, *, epochs: int = 1, params_path: Path | None = None,
               **settings: Any) -> float | list[float]:
    """Wall time of ``train_ddpo`` epochs on a random tiny stack of ``size`` px with the params'
    rl settings (rl.common + rl.isic; schema defaults without a params file) and ``settings`` over
    them; a mean-brightness reward. One epoch: seconds; several: the list of epoch_time_s."""
    import pandas as pd

    from medrl.config import RL, load_params
    from medrl.rl.trainer import DDPOConfig, train_ddpo

    rl = load_params(params_path, check_paths=False).rl if params_path and Path(params_path).is_file() else RL()
    flat = {**rl.common.model_dump(), **{k: v for k, v in rl.isic.model_dump().items() if v is not None}}
    batch = min(trajectories, flat["sample_batch_size"])
    flat.update(epochs=epochs, sample_batch_size=batch, sample_batches_per_epoch=-(-trajectories // batch),
                num_steps=num_steps, skip_last_steps=min(flat["skip_last_steps"], num_steps - 1), log_base_reward=False,
                checkpoint_every=max(epochs, 1) + 1)
    flat.update(settings)
    with tempfile.TemporaryDirectory(prefix="medrl-cost-") as tmp:
        stack = tiny_stack(Path(tmp) / "stack", size=size, tiny=_tiny_cfg(params_path))
        train_ddpo(stack, Path(tmp) / "out", reward_fn=lambda im, pr, anchor_images=None: (im.mean((1, 2, 3)), {}),
                   prompt_fn=lambda rng, n: [("nevus", "melanoma", "nevus with ruler", "lesion")[i % 4] for i in range(n)],
                   cfg=DDPOConfig.from_flat(**flat), ckpt_dir=Path(tmp) / "ckpt")
        times = pd.read_csv(Path(tmp) / "out" / "rewards.csv")["epoch_time_s"].tolist()
    return times[0] if epochs == 1 else times


# ----------------------------------------------------------------------------- reporting


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return "-" if v is None else str(v)


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with (key, header) columns."""
    cells = [[h for _, h in cols]] + [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


ROW_COLS = [("model", "model"), ("device", "device"), ("mixed_precision", "amp"), ("batch", "B"), ("num_steps", "T"),
            ("trajectories_per_s", "traj/s"), ("sample_timesteps_per_s", "sample-t/s"),
            ("peak_mem_sample_MB", "peak MB (sample)"), ("peak_mem_train_MB", "peak MB (train)"),
            ("logprob_drift", "logp drift"), ("sample_mfu", "MFU (sample)"), ("train_mfu", "MFU (train)"),
            ("vs_baseline_sampling", "x baseline (sample)"), ("vs_baseline_training", "x baseline (train)")]


def compare_baseline(row: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, float]:
    """Throughput ratios against the baseline JSON's median when its workload matches the row's."""
    if not baseline:
        return {}
    cfg, med = baseline.get("config", {}), baseline.get("median", {})
    cfg = {**_SAME_DEFAULT, **cfg}
    if any(k in cfg and json.dumps(cfg[k]) != json.dumps(row.get(k, _SAME_DEFAULT.get(k))) for k in _SAME) or not med:
        return {}
    return {"vs_baseline_sampling": row["trajectories_per_s"] / med["trajectories_per_s"],
            "vs_baseline_training": row["sample_timesteps_per_s"] / med["sample_timesteps_per_s"]}


def _read_baseline(path: Path | None) -> dict[str, Any] | None:
    return json.loads(Path(path).read_text()) if path is not None and Path(path).is_file() else None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="medrl bench", description=__doc__.split("\n\n")[0])
    add = ap.add_argument
    add("--device", default="auto", help="auto | cpu | cuda (tiny model)")
    add("--params", type=Path, default=Path("params.yaml"),
        help="read models.tiny (and, for --cost-table, rl) from this params file if it exists (else schema defaults)")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add("--steps", type=int, default=20, help="DDIM steps per trajectory (rl.common.num_steps)")
    add("--batch", type=int, default=8, help="trajectories per sampling call (tiny)")
    add("--train-batch", type=int, default=8, help="samples per PPO micro-step (tiny)")
    add("--train-micro-steps", type=int, default=10, help="timed PPO micro-steps")
    add("--tiny-size", type=int, default=64, help="tiny model image size (isic.prepare.size)")
    add("--attention-heads", type=int, default=None,
        help="UNet attention heads (default: models.tiny.attention_head_dim; the baseline ran 8)")
    add("--lora-rank", type=int, default=4)
    add("--full-finetune", action="store_true", help="train the whole UNet instead of LoRA")
    add("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast (run.mixed_precision)")
    add("--compile", action="store_true", help="torch.compile the UNet (inductor)")
    add("--channels-last", action="store_true", help="channels-last UNet")
    add("--repeats", type=int, default=1, help="timed repetitions per phase (median reported)")
    add("--accumulate", type=int, default=1,
        help="PPO micro-steps per optimizer step (1: the baseline's workload; the trainer's default group is 8)")
    add("--fuse", type=int, default=None,
        help="micro-steps per forward/backward within a group (default: all of it, capped by --accumulate)")
    add("--merge-lora", action="store_true", help="sample with LoRA merged into the base weights")
    add("--flops", action="store_true", help="count UNet FLOPs and report TFLOP/s and MFU")
    add("--peak-tflops", type=float, default=None, help="device peak for MFU (default: bf16 table for CUDA)")
    add("--baseline", type=Path, default=BASELINE, help="baseline JSON for the speed-up ratio ('' = none)")
    add("--sd15", action="store_true", help="also an SD-v1.5-shaped UNet+VAE (random weights) on CUDA")
    add("--sd15-tiny", action="store_true", help="--sd15 at 1/10 width and 64 px (runs on CPU; for tests)")
    add("--allow-cpu-sd15", action="store_true", help="run --sd15 on CPU too (very slow)")
    add("--sd15-batch", type=int, default=4)
    add("--sd15-train-batch", type=int, default=2)
    add("--gpu-check", action="store_true",
        help="the GPU script: --sd15 in bf16 with FLOPs/MFU + one DDPO epoch at RL4Med's per-GPU shape")
    add("--epoch-trajectories", type=int, default=64, help="--gpu-check epoch: trajectories")
    add("--epoch-steps", type=int, default=50, help="--gpu-check epoch: DDIM steps")
    add("--epoch-sample-batch", type=int, default=16, help="--gpu-check epoch: trajectories per sampling call")
    add("--epoch-train-batch", type=int, default=8, help="--gpu-check epoch: samples per PPO micro-step")
    add("--cost-table", action="store_true", help="CPU epoch time vs trajectories, DDIM steps, latent size")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=None, help="write results as JSON here")
    return ap


def _run_rows(args, device: torch.device, cuda: bool) -> tuple[list[dict[str, Any]], list[str]]:
    rows, notes = [], []
    if not args.gpu_check or not cuda:
        rows.append(_tiny(args, device))
        rows[-1].update(compare_baseline(rows[-1], _read_baseline(args.baseline) if str(args.baseline) else None))
    if args.sd15:
        if cuda or args.sd15_tiny or args.allow_cpu_sd15:
            rows.append(_sd15(args, torch.device("cuda") if cuda else torch.device("cpu")))
        else:
            notes.append("--sd15 skipped: no CUDA device (pass --allow-cpu-sd15, or --sd15-tiny, to run it on CPU)")
    return rows, notes


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.accumulate < 1 or (args.fuse is not None and args.fuse < 1):
        ap.error(f"--accumulate {args.accumulate} / --fuse {args.fuse}: expected >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if (args.device == "auto" and cuda) else ("cpu" if args.device == "auto" else args.device))
    if args.gpu_check:
        args.sd15, args.mixed_precision, args.flops = True, "bf16", True
        args.sd15_tiny = args.sd15_tiny or not cuda
    result: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "cpu": platform.processor() or platform.machine(),
                              "cuda": torch.cuda.get_device_name(0) if cuda else None}
    if args.cost_table:
        rows = cost_table(args.tiny_size, params_path=args.params)
        print(_table(rows, [("trajectories", "trajectories/epoch"), ("num_steps", "DDIM steps"),
                            ("latent", "latent (px)"), ("epoch_s", "epoch (s)")]))
        result["cost_table"] = rows
    else:
        rows, notes = _run_rows(args, device, cuda)
        print(_table(rows, ROW_COLS))
        for n in notes:
            print(n)
        result.update(results=rows, notes=notes)
    if args.gpu_check:
        ep = ddpo_epoch(torch.device("cuda") if cuda else torch.device("cpu"), tiny=args.sd15_tiny,
                        trajectories=args.epoch_trajectories, num_steps=args.epoch_steps,
                        sample_batch=args.epoch_sample_batch, train_batch=args.epoch_train_batch, seed=args.seed)
        print(_table([ep], [(k, k) for k in ep]))
        result["ddpo_epoch"] = ep
    if args.out is not None:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
