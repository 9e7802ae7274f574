"""LoRA on the UNet attention projections (peft, via diffusers' PEFT integration) and,
optionally, on the text encoder's (peft's ``inject_adapter_in_model``); save/load.

On disk an adapter directory holds
  adapter_config.json            {"kind": "lora"|"full", "rank", "alpha", "target_modules", "ace_tokens",
                                  "text_lora": {"rank", "alpha", "target_modules"} | absent}
  adapter_model.safetensors      peft LoRA state dict (kind "lora"), keys without adapter name
  unet.safetensors               full UNet state dict (kind "full", from full_finetune)
  text_encoder_lora.safetensors  the text encoder's LoRA weights, when RL adapted it
  ace.safetensors                ACE embeddings, when ACE was trained
so generation loads "base stack + adapter" and the adapter stays a few hundred KB.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medrl.errors import DataError
from medrl.io import atomic_path, write_json
from medrl.diffusion.ace import ACE, ACE_FILE

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP text encoder attention
CONFIG_FILE = "adapter_config.json"
LORA_FILE = "adapter_model.safetensors"
FULL_FILE = "unet.safetensors"
TEXT_FILE = "text_encoder_lora.safetensors"


def has_lora(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def add_lora(
    unet,
    rank: int,
    alpha: int | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    *,
    seed: int = 0,
):
    """Freeze the UNet and inject a LoRA adapter (named "default"); only LoRA params train.

    B is zero-initialised ("gaussian" init: A ~ N(0, 1/r), B = 0), so the adapted UNet starts
    exactly equal to the base model. A is drawn under a forked, seeded RNG so the same seed
    gives the same adapter without touching the global torch RNG. alpha defaults to rank
    (scale alpha/rank = 1)."""
    unet.requires_grad_(False)
    cfg = _lora_config(rank, alpha, target_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(cfg)
    # diffusers' add_adapter leaves LoRA params trainable; make the invariant explicit.
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    return unet


def _lora_config(rank: int, alpha: int | None, target_modules: Sequence[str]) -> LoraConfig:
    if rank < 1:
        raise ValueError(f"LoRA rank {rank}; expected >= 1")
    return LoraConfig(r=int(rank), lora_alpha=int(alpha if alpha is not None else rank),
                      init_lora_weights="gaussian", target_modules=list(target_modules))


def add_text_lora(text_encoder, rank: int, alpha: int | None = None, target_modules: Sequence[str] = TEXT_TARGETS,
                  *, seed: int = 0):
    """As :func:`add_lora`, on the text encoder's attention: frozen encoder, trainable LoRA that
    starts as the identity (B = 0). peft's model-agnostic injection (transformers' own
    ``add_adapter`` wants a newer peft)."""
    text_encoder.requires_grad_(False)
    cfg = _lora_config(rank, alpha, target_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(cfg, text_encoder)
    return text_encoder


def text_lora_config(text_encoder) -> dict | None:
    """The rank / alpha / targets of the text encoder's LoRA, read from its layers (None: none)."""
    layers = {name.rsplit(".", 1)[-1]: m for name, m in text_encoder.named_modules() if isinstance(m, BaseTunerLayer)}
    if not layers:
        return None
    first = next(iter(layers.values()))
    return {"rank": int(first.r["default"]), "alpha": int(first.lora_alpha["default"]), "target_modules": sorted(layers)}


def set_adapters_enabled(module, enabled: bool) -> None:
    """Switch every peft LoRA layer in ``module`` on or off (off = the base weights exactly).
    peft also toggles those layers' requires_grad; callers restore what they need."""
    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def _meta(unet, ace: ACE | None, kind: str) -> dict:
    meta: dict = {"kind": kind, "ace_tokens": ace.n_tokens if ace is not None else 0}
    if kind == "lora":
        cfg = unet.peft_config["default"]
        meta.update(rank=int(cfg.r), alpha=int(cfg.lora_alpha), target_modules=sorted(cfg.target_modules))
    return meta


def save_adapter(unet, ace: ACE | None, out_dir: str | Path, text_encoder=None) -> Path:
    """Write the trained part of the policy: LoRA weights (or the full UNet), ACE, and the text
    encoder's LoRA when ``text_encoder`` carries one (:func:`add_text_lora`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "lora" if has_lora(unet) else "full"
    if kind == "lora":
        sd = get_peft_model_state_dict(unet, adapter_name="default")
        fname = LORA_FILE
    else:
        sd = unet.state_dict()
        fname = FULL_FILE
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    with atomic_path(out_dir / fname) as tmp:
        save_file(sd, str(tmp))
    if ace is not None:
        ace.save(out_dir)
    meta = _meta(unet, ace, kind)
    text_cfg = text_lora_config(text_encoder) if text_encoder is not None else None
    if text_cfg is not None:
        text_sd = {n: p.detach().to("cpu").contiguous() for n, p in text_encoder.named_parameters() if "lora_" in n}
        with atomic_path(out_dir / TEXT_FILE) as tmp:
            save_file(text_sd, str(tmp))
        meta["text_lora"] = text_cfg
    write_json(out_dir / CONFIG_FILE, meta)
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise DataError(f"{path}: adapter config not found; expected a directory written by medrl.diffusion.lora.save_adapter")
    meta = json.loads(path.read_text())
    if meta.get("kind") not in ("lora", "full"):
        raise DataError(f"{path}: field 'kind' is {meta.get('kind')!r}; expected 'lora' or 'full'")
    return meta


def load_adapter(unet, out_dir: str | Path, text_encoder=None) -> ACE | None:
    """Apply a saved adapter to a *base* UNet (and base text encoder) in place; return its ACE
    (or None).

    LoRA: injects the adapter with the saved rank/alpha/targets and loads its weights (every
    key must match). Full fine-tune: loads the whole UNet state dict. An adapter with a text
    encoder LoRA needs ``text_encoder``, which gets that LoRA the same way."""
    out_dir = Path(out_dir)
    meta = read_adapter_config(out_dir)
    dev = next(unet.parameters()).device
    if meta["kind"] == "lora":
        path = out_dir / LORA_FILE
        sd = _load_st(path)
        if has_lora(unet):
            raise ValueError(f"{out_dir}: the UNet already has a LoRA adapter; load_adapter expects a base UNet")
        add_lora(unet, meta["rank"], meta["alpha"], meta["target_modules"])
        result = set_peft_model_state_dict(unet, {k: v.to(dev) for k, v in sd.items()}, adapter_name="default")
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        n_lora = sum(1 for n, _ in unet.named_parameters() if "lora_" in n)
        if unexpected or n_lora != len(sd):
            raise DataError(
                f"{path}: LoRA weights do not fit this UNet ({len(sd)} tensors in file, {n_lora} LoRA params in model, "
                f"unexpected keys {unexpected[:5]}); expected an adapter trained on the same base stack"
            )
    else:
        path = out_dir / FULL_FILE
        sd = _load_st(path)
        try:
            unet.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise DataError(f"{path}: UNet weights do not fit the base UNet ({str(e)[:300]}); expected the same architecture") from None
    unet.requires_grad_(False)
    if meta.get("text_lora"):
        _load_text_lora(text_encoder, out_dir, meta["text_lora"])
    ace = None
    if meta.get("ace_tokens", 0):
        ace = ACE.load(out_dir / ACE_FILE).to(dev)
        ace.requires_grad_(False)
    return ace


def _load_text_lora(text_encoder, out_dir: Path, cfg: dict) -> None:
    path = out_dir / TEXT_FILE
    if text_encoder is None:
        raise DataError(f"{out_dir}: the adapter adapts the text encoder too ({TEXT_FILE}); expected a text encoder "
                        "to load it into")
    if text_lora_config(text_encoder) is not None:
        raise ValueError(f"{out_dir}: the text encoder already has a LoRA adapter; load_adapter expects a base one")
    sd = _load_st(path)
    add_text_lora(text_encoder, cfg["rank"], cfg["alpha"], cfg["target_modules"])
    params = dict(text_encoder.named_parameters())
    names = {n for n in params if "lora_" in n}
    if names != set(sd):
        raise DataError(f"{path}: text-encoder LoRA weights do not fit this text encoder ({len(sd)} tensors in file, "
                        f"{len(names)} LoRA params in model); expected an adapter trained on the same base stack")
    with torch.no_grad():
        for n, v in sd.items():
            params[n].copy_(v.to(params[n].device, params[n].dtype))
    text_encoder.requires_grad_(False)


def _load_st(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"{path}: adapter weights not found; expected a safetensors file")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise DataError(f"{path}: unreadable safetensors file ({e})") from None
