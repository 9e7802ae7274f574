"""Build, save and load Stable-Diffusion-v1.5-shaped model stacks.

One on-disk layout for everything: the diffusers ``save_pretrained`` layout of SD v1.5 /
RoentGen (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``). The embedded default builds a *tiny* random-init stack with the real
architectures (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
DDIMScheduler) and trains its VAE here; real runs point ``load_components`` at a local SD
v1.5 / RoentGen directory or a hub id in the HF cache. Both go through the same code.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medrl.errors import DataError

STACK_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_LAYOUT = "a diffusers StableDiffusionPipeline directory (model_index.json, " + ", ".join(
    f"{s}/" for s in STACK_SUBFOLDERS
) + ") as saved by save_pretrained, e.g. SD v1.5 or RoentGen"

# SD v1.5's noise schedule (its scheduler/scheduler_config.json), used with DDIM sampling.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


@dataclass
class SDComponents:
    """The five parts of an SD v1.5 pipeline (diffusers / transformers objects)."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler: Any  # diffusers.DDIMScheduler

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def as_pipeline(self):
        """A StableDiffusionPipeline over these (shared, not copied) modules."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


# ----------------------------------------------------------------------------- build


def vae_downsample_factor(vae_block_out_channels: list[int]) -> int:
    """AutoencoderKL halves the resolution in every encoder block but the last."""
    return 2 ** (len(vae_block_out_channels) - 1)


def _tiny_modules(tokenizer, tiny: dict, sample_size: int, seed: int):
    need = ("block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
            "text_hidden_size", "text_layers", "text_heads", "max_position_embeddings",
            "vae_block_out_channels", "latent_channels")
    missing = [k for k in need if k not in tiny]
    if missing:
        raise DataError(f"models.tiny: missing keys {missing}; expected {list(need)}")
    if tiny["cross_attention_dim"] != tiny["text_hidden_size"]:
        # The UNet cross-attends to the text encoder's last hidden state, so they must agree.
        raise DataError(
            f"models.tiny.cross_attention_dim={tiny['cross_attention_dim']} must equal "
            f"models.tiny.text_hidden_size={tiny['text_hidden_size']}"
        )
    _check_vae_groups(tiny)
    factor = vae_downsample_factor(tiny["vae_block_out_channels"])
    if sample_size % factor:
        raise DataError(f"image size {sample_size} is not divisible by the VAE downsample factor {factor} "
                        f"(models.tiny.vae_block_out_channels={tiny['vae_block_out_channels']})")
    if tokenizer.model_max_length > tiny["max_position_embeddings"]:
        raise DataError(f"tokenizer model_max_length {tokenizer.model_max_length} exceeds "
                        f"models.tiny.max_position_embeddings={tiny['max_position_embeddings']}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is None:
            raise DataError(f"tokenizer has no {name}; expected a CLIP tokenizer with "
                            "<|startoftext|>/<|endoftext|> special tokens")

    with torch.random.fork_rng(devices=[]):
        # diffusers/transformers init draws from the global RNG: seed it without leaking.
        torch.manual_seed(seed)
        return _init_modules(tokenizer, tiny, sample_size, factor)


def _check_vae_groups(tiny: dict) -> None:
    groups = tiny.get("vae_norm_groups")
    bad = [w for w in tiny["vae_block_out_channels"] if groups and w % groups]
    if bad:
        raise DataError(f"models.tiny.vae_norm_groups={groups} must divide every VAE width "
                        f"(models.tiny.vae_block_out_channels={tiny['vae_block_out_channels']}; {bad} do not)")


def _vae_module(tiny: dict, sample_size: int):
    from diffusers import AutoencoderKL

    nv = len(tiny["vae_block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * nv,
        up_block_types=("UpDecoderBlock2D",) * nv,
        block_out_channels=tuple(tiny["vae_block_out_channels"]),
        layers_per_block=tiny["layers_per_block"],
        latent_channels=tiny["latent_channels"],
        # null: min(32, smallest width), one channel per group in a 16-wide block (instance norm)
        norm_num_groups=tiny.get("vae_norm_groups") or min(32, min(tiny["vae_block_out_channels"])),
        sample_size=sample_size,
    )


def build_tiny_vae(tiny: dict, sample_size: int, seed: int):
    """A fresh AutoencoderKL with the ``models.tiny`` VAE settings alone (no UNet / text
    encoder), seeded without touching the global RNG: for VAE experiments."""
    _check_vae_groups(tiny)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _vae_module(tiny, sample_size)


def _init_modules(tokenizer, tiny: dict, sample_size: int, factor: int):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n = len(tiny["block_out_channels"])
    # SD v1.5's pattern: cross-attention in every resolution but the lowest, whose down/up
    # blocks are plain ResNets (the mid block there still cross-attends).
    down = tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]) if n > 1 else ("CrossAttnDownBlock2D",)
    up = tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)) if n > 1 else ("CrossAttnUpBlock2D",)
    unet = UNet2DConditionModel(
        sample_size=sample_size // factor,
        in_channels=tiny["latent_channels"],
        out_channels=tiny["latent_channels"],
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(tiny["block_out_channels"]),
        layers_per_block=tiny["layers_per_block"],
        cross_attention_dim=tiny["text_hidden_size"],
        # As in SD v1.5's config, diffusers reads this as the number of heads.
        attention_head_dim=tiny["attention_head_dim"],
        norm_num_groups=min(32, min(tiny["block_out_channels"])),
    )
    vae = _vae_module(tiny, sample_size)
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny["text_hidden_size"],
        intermediate_size=4 * tiny["text_hidden_size"],
        num_hidden_layers=tiny["text_layers"],
        num_attention_heads=tiny["text_heads"],
        max_position_embeddings=tiny["max_position_embeddings"],
        hidden_act="quick_gelu",  # CLIP ViT-L/14's text tower, as in SD v1.5
        projection_dim=tiny["text_hidden_size"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_cfg)
    scheduler = DDIMScheduler(**SD15_SCHEDULER)
    return unet, vae, text_encoder, scheduler


def _n_params(m: torch.nn.Module) -> float:
    return float(sum(p.numel() for p in m.parameters()))


def build_tiny_stack(out_dir: Path, tokenizer_dir: Path, tiny: dict, sample_size: int, seed: int) -> dict:
    """Random-init tiny SD stack (real architectures, sizes from ``models.tiny``) saved in
    SD v1.5's layout under ``out_dir``. ``sample_size`` is the image size in pixels."""
    from transformers import CLIPTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise DataError(f"{tokenizer_dir}: tokenizer directory not found; expected a CLIPTokenizer "
                        "save_pretrained directory (vocab.json/merges.txt or tokenizer.json)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as e:
        raise DataError(f"{tokenizer_dir}: cannot load a CLIPTokenizer ({e})") from None
    unet, vae, text_encoder, scheduler = _tiny_modules(tokenizer, tiny, sample_size, seed)
    c = SDComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    save_stack(c, out_dir)
    factor = vae_downsample_factor(tiny["vae_block_out_channels"])
    return {
        "unet_params": _n_params(unet),
        "vae_params": _n_params(vae),
        "text_encoder_params": _n_params(text_encoder),
        "latent_size": float(sample_size // factor),
        "vocab_size": float(len(tokenizer)),
    }


def save_stack(c: SDComponents, out_dir: Path) -> None:
    """Save in SD v1.5's layout (loadable by load_components and StableDiffusionPipeline)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c.as_pipeline().save_pretrained(str(out_dir), safe_serialization=True)
    tok_dir = out_dir / "tokenizer"
    backend = getattr(c.tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend.model, "save"):
        # transformers >= 5 saves only tokenizer.json; SD v1.5's tokenizer/ also has the BPE
        # vocab.json + merges.txt that older (slow) CLIPTokenizers and other tools read.
        backend.model.save(str(tok_dir))


# ----------------------------------------------------------------------------- load


def _resolve(path_or_id: str) -> tuple[str, bool]:
    """(source string for from_pretrained, is_local_dir); checks a local dir's layout."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise DataError(f"{p}: is a file; expected {_LAYOUT}")
        missing = [s for s in STACK_SUBFOLDERS if not (p / s).is_dir()]
        if missing:
            raise DataError(f"{p}: missing {', '.join(s + '/' for s in missing)}; expected {_LAYOUT}")
        return str(p), True
    s = str(path_or_id)
    # A hub id is "name" or "org/name"; anything else that does not exist is a missing path.
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s:
        raise DataError(f"{s}: no such directory; expected {_LAYOUT}")
    return s, False


def _load(cls, source: str, subfolder: str, is_local: bool, local_files_only: bool, **kw):
    try:
        return cls.from_pretrained(source, subfolder=subfolder, local_files_only=local_files_only, **kw)
    except (OSError, ValueError) as e:  # diffusers/transformers/hub raise OSError subclasses
        where = f"{source}/{subfolder}" if is_local else f"hub id {source!r} ({subfolder}/)"
        hint = (" and not in the local Hugging Face cache (local_files_only=True: nothing is downloaded;"
                " pre-fetch it with `huggingface-cli download` or give a local directory)"
                if (local_files_only and not is_local) else "")
        raise DataError(f"{where}: cannot load {cls.__name__}{hint}; expected {_LAYOUT} ({type(e).__name__}: {e})") from None


def load_vae(path_or_id: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
             local_files_only: bool = True):
    """Only the AutoencoderKL of a stack (for latent extraction), frozen, eval()."""
    from diffusers import AutoencoderKL

    source, is_local = _resolve(str(path_or_id))
    vae = _load(AutoencoderKL, source, "vae", is_local, local_files_only, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def load_unet_weights(unet: torch.nn.Module, weights: str | Path) -> None:
    """Load a UNet state dict from .safetensors with strict key (and shape) checking."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(weights)
    if not weights.is_file():
        raise DataError(f"{weights}: UNet weights file not found; expected a .safetensors UNet state dict")
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise DataError(f"{weights}: not a readable .safetensors file ({e})") from None
    own = unet.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise DataError(
            f"{weights}: UNet state dict does not match the stack's UNet: "
            f"{len(missing)} missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
            "expected exactly the keys of UNet2DConditionModel.state_dict()"
        )
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise DataError(f"{weights}: {len(bad)} UNet tensors have the wrong shape (file vs model): {bad[:5]}")
    unet.load_state_dict(sd, strict=True)


def load_components(
    path_or_id: str,
    *,
    unet_weights: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = True,
) -> SDComponents:
    """Load a stack from a local SD-layout directory or a hub id (via the HF cache).

    Every module is eval() with requires_grad False; callers enable what they train.
    ``unet_weights`` replaces the UNet's weights with a .safetensors state dict."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source, is_local = _resolve(str(path_or_id))
    # diffusers wants the dtype at load time (it keeps its fp32-only modules in fp32).
    unet = _load(UNet2DConditionModel, source, "unet", is_local, local_files_only, torch_dtype=dtype)
    vae = _load(AutoencoderKL, source, "vae", is_local, local_files_only, torch_dtype=dtype)
    text_encoder = _load(CLIPTextModel, source, "text_encoder", is_local, local_files_only).to(dtype=dtype)
    tokenizer = _load(CLIPTokenizer, source, "tokenizer", is_local, local_files_only)
    # SD v1.5 ships a PNDM config; the RL code samples with DDIM over the same betas.
    scheduler = _load(DDIMScheduler, source, "scheduler", is_local, local_files_only)
    if unet_weights is not None:
        load_unet_weights(unet, unet_weights)
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    return SDComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def tokenize_prompts(c: SDComponents, prompts: list[str]) -> torch.Tensor:
    """(B, L) token ids on the text encoder's device, prompts padded to model_max_length."""
    tok = c.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=c.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return tok.input_ids.to(c.text_encoder.device)


def encode_prompts(c: SDComponents, prompts: list[str]) -> torch.Tensor:
    """(B, L, D) last hidden state of the text encoder, prompts padded to model_max_length."""
    return c.text_encoder(tokenize_prompts(c, prompts))[0]


# ----------------------------------------------------------------------------- stage


def build_stack(
    out_dir: Path,
    *,
    pretrained: str | None,
    tokenizer_dir: Path | None,
    train_images: list[Path],
    image_size: int,
    channels_mode: str,
    tiny: dict,
    vae_train: dict,
    ckpt_dir: Path,
    seed: int,
    device: str = "cpu",
) -> dict:
    """Stage function. ``pretrained`` None: build the tiny stack and train its VAE on
    ``train_images``; else copy the pretrained stack into ``out_dir`` (no training).

    ``channels_mode`` "RGB" (dermoscopy: horizontal flips are label-preserving) or "L"
    (CXR, repeated to 3 channels; no horizontal flips: the heart is on the left)."""
    from diffusers import AutoencoderKL

    from medrl.diffusion.vae_train import train_vae

    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    if channels_mode not in ("RGB", "L"):
        raise DataError(f"channels_mode {channels_mode!r}: expected 'RGB' or 'L'")
    if pretrained is not None:
        c = load_components(pretrained)
        save_stack(c, out_dir)
        return {"unet_params": _n_params(c.unet), "vae_params": _n_params(c.vae),
                "text_encoder_params": _n_params(c.text_encoder), "vae_trained": 0.0}
    if tokenizer_dir is None:
        raise DataError("build_stack: tokenizer_dir is required when pretrained is null (tiny stack)")
    if not train_images:
        raise DataError("build_stack: no train_images; the tiny stack's VAE needs training images")
    metrics = build_tiny_stack(out_dir, Path(tokenizer_dir), tiny, image_size, seed)
    vae = AutoencoderKL.from_pretrained(str(out_dir / "vae"))
    vt = dict(vae_train)
    try:
        m = train_vae(
            vae, [Path(p) for p in train_images], size=image_size, mode=channels_mode,
            steps=int(vt["steps"]), batch_size=int(vt["batch_size"]), lr=float(vt["lr"]),
            kl_weight=float(vt["kl_weight"]), seed=int(vt.get("seed", seed)),
            edge_weight=float(vt["edge_weight"]),
            ckpt_dir=ckpt_dir / "vae", hflip=channels_mode == "RGB", device=device,
        )
    except KeyError as e:
        raise DataError(f"models.vae_train: missing key {e}; expected steps, batch_size, lr, kl_weight, edge_weight, seed") from None
    vae.to("cpu").save_pretrained(str(out_dir / "vae"), safe_serialization=True)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    metrics.update(m)
    metrics["vae_trained"] = 1.0
    return metrics
