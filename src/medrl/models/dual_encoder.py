"""CXRL multimodal-consistency model: a CXR-CLIP-style dual encoder (paper Sec. 2.3.3).

Architecture mirrors CXR-CLIP (You et al., MICCAI 2023, kakaobrain/cxr-clip, config
``clip_resnet_clinical``) module for module, so its checkpoints load by key:

* ``image_encoder.resnet``: torchvision ``ResNet(Bottleneck, layers)`` without ``fc``,
  global-average-pooled 2048-d features. CXR-CLIP: ResNet-50 (layers [3, 4, 6, 3]) at
  224 px, ImageNet mean/std, gray replicated to RGB. Embedded default: the same family with
  one bottleneck per stage ([1, 1, 1, 1], standard widths) at the prepare size (64 px).
* ``text_encoder.text_encoder``: a transformers ``BertModel``; features = the [SEP] ("eos")
  token's hidden state (CXR-CLIP's ``pooling: eos``). CXR-CLIP: BioClinicalBERT config
  (768-d, 12 layers), max 256 tokens. Embedded default: a small ``BertConfig`` with a
  WordPiece vocabulary trained here on the training reports (``tokenizers``) and saved as a
  ``BertTokenizerFast`` directory.
* ``image_projection`` / ``text_projection``: linear (CXR-CLIP default) or MLP heads to the
  joint space; ``logit_scale`` is the learnable CLIP temperature (init log(1/0.07)).

Saved directory: ``model.safetensors`` (that state dict), ``config.json``
(``DualEncoderConfig``), ``tokenizer/`` and ``eval.json``.

CXR-CLIP checkpoints (``model-best.tar``): ``torch.save({"model": state_dict, "optimizer",
"scheduler", "config": cfg, ...})`` where ``cfg`` is an OmegaConf ``DictConfig``, which
``torch.load(weights_only=True)`` refuses (unpickling arbitrary classes can run code).
Convert once, on a machine you trust and with omegaconf installed::

    python -c "import torch,sys; from omegaconf import OmegaConf; c=torch.load(sys.argv[1], map_location='cpu', weights_only=False); torch.save({'model': c['model'], 'config': OmegaConf.to_container(c['config'], resolve=True)}, sys.argv[2])" model-best.tar model-best.plain.tar

``load_dual_encoder`` then reads it with weights_only=True. The checkpoint holds no
tokenizer: put the BioClinicalBERT tokenizer files in ``tokenizer/`` beside it (or pass
``tokenizer=``). Tower sizes are read from the tensor shapes; BERT heads = hidden / 64
unless ``tokenizer/config.json`` or ``text_config=`` says otherwise.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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
    TORCH_LOAD_ERRORS,
    images_from_pairs,
    recalibrate_bn,
    resume_epochs,
    save_epoch,
    split_rows,
    to_unit,
)
from medrl.progress import progress

__all__ = [
    "DualEncoder",
    "DualEncoderConfig",
    "build_dual_encoder",
    "build_wordpiece_tokenizer",
    "clip_loss",
    "embed_images",
    "embed_texts",
    "load_dual_encoder",
    "retrieval_metrics",
    "save_dual_encoder",
    "train_dual_encoder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DualEncoderConfig:
    image_layers: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # ResNet-50: [3, 4, 6, 3]
    image_width_per_group: int = 64
    image_size: int = 64                       # CXR-CLIP: 224
    text: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 256, "max_position_embeddings": 128})
    text_pooling: str = "eos"                  # eos | bos | mean (CXR-CLIP resnet config: eos)
    max_length: int = 128                      # CXR-CLIP: 256
    projection: str = "linear"                 # linear | mlp
    embed_dim: int = 64                        # CXR-CLIP: 512
    dropout: float = 0.1
    temperature: float = 0.07


class _ImageEncoder(nn.Module):
    def __init__(self, layers: Sequence[int], width_per_group: int) -> None:
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        self.resnet = ResNet(Bottleneck, list(layers), width_per_group=width_per_group)
        del self.resnet.fc
        self.out_dim = 512 * Bottleneck.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        return torch.flatten(r.avgpool(x), 1)


class _TextEncoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        from transformers import BertModel

        self.text_encoder = BertModel(config)
        self.out_dim = config.hidden_size

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.text_encoder(**tokens).last_hidden_state


class _LinearHead(nn.Module):
    def __init__(self, dim: int, proj: int) -> None:
        super().__init__()
        self.projection = nn.Linear(dim, proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


class _MLPHead(nn.Module):
    def __init__(self, dim: int, proj: int, dropout: float) -> None:
        super().__init__()
        self.projection = nn.Linear(dim, proj)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(proj, proj)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.projection(x)
        return self.layer_norm(self.dropout(self.fc(self.gelu(p))) + p)


class DualEncoder(nn.Module):
    """Image tower + text tower + projections + CLIP temperature (CXR-CLIP key layout)."""

    def __init__(self, config: DualEncoderConfig, tokenizer) -> None:
        super().__init__()
        from transformers import BertConfig

        self.config = config
        self.tokenizer = tokenizer
        text_kw = dict(config.text)
        text_kw.setdefault("vocab_size", len(tokenizer))
        text_kw.setdefault("pad_token_id", tokenizer.pad_token_id or 0)
        self.bert_config = BertConfig(**text_kw)
        self.image_encoder = _ImageEncoder(config.image_layers, config.image_width_per_group)
        self.text_encoder = _TextEncoder(self.bert_config)

        def head(dim: int) -> nn.Module:
            if config.projection == "linear":
                return _LinearHead(dim, config.embed_dim)
            if config.projection == "mlp":
                return _MLPHead(dim, config.embed_dim, config.dropout)
            raise DataError(f"projection: {config.projection!r}; expected 'linear' or 'mlp'")

        self.image_projection = head(self.image_encoder.out_dim)
        self.text_projection = head(self.text_encoder.out_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature)))

    # -- preprocessing -------------------------------------------------------------------
    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] (B, 1|3, H, W) -> resized, RGB, ImageNet-normalised (CXR-CLIP 'imagenet')."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images: expected (B, 1|3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        s = self.config.image_size
        if x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def tokenize(self, texts: Sequence[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        tok = self.tokenizer([t if isinstance(t, str) else "" for t in texts], padding=True, truncation=True,
                             max_length=self.config.max_length, return_tensors="pt")
        return {k: v.to(device) for k, v in tok.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    # -- towers ---------------------------------------------------------------------------
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> unnormalised joint-space embeddings."""
        return self.image_projection(self.image_encoder(x))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.text_encoder(tokens)
        mask = tokens["attention_mask"]
        if self.config.text_pooling == "eos":
            feats = h[torch.arange(h.shape[0], device=h.device), mask.sum(-1) - 1]
        elif self.config.text_pooling == "bos":
            feats = h[:, 0]
        elif self.config.text_pooling == "mean":
            m = mask.unsqueeze(-1).to(h.dtype)
            feats = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        else:
            raise DataError(f"text_pooling: {self.config.text_pooling!r}; expected eos, bos or mean")
        return self.text_projection(feats)


# ----------------------------------------------------------------------------- tokenizer


def build_wordpiece_tokenizer(texts: Sequence[str], out_dir: str | Path, *, vocab_size: int = 2000, min_frequency: int = 2):
    """A lower-casing WordPiece vocabulary for ``texts``, saved as a transformers
    ``BertTokenizerFast`` directory; returns the loaded tokenizer.

    Built here rather than with the ``tokenizers`` WordPieceTrainer, whose BPE merge loop
    breaks count ties in hash-map order: its vocabulary (ids and even the token set) changed
    from one process to the next, and with it the trained dual encoder. Vocabulary: the
    special tokens, every character alone and as a ``##`` continuation (so any word can be
    spelled), then whole words (BERT normalisation and pre-tokenisation) seen at least
    ``min_frequency`` times, most frequent first, ties in lexicographic order, up to
    ``vocab_size``."""
    import tempfile
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertTokenizerFast

    norm, pre = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts: Counter = Counter()
    for t in texts:
        if isinstance(t, str):
            counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    if not counts:
        raise DataError("build_wordpiece_tokenizer: no text given; expected report strings")
    chars = sorted({c for w in counts for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    seen = set(vocab)
    for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size or c < min_frequency:
            break
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tok = BertTokenizerFast.from_pretrained(tmp, do_lower_case=True, local_files_only=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return BertTokenizerFast.from_pretrained(str(out_dir), local_files_only=True)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise DataError(f"{path}: tokenizer directory not found; expected a transformers tokenizer (vocab.txt / tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path}: not a loadable transformers tokenizer ({e})") from None


# ----------------------------------------------------------------------------- inference


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_images(model: DualEncoder, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised image embeddings (B, D) for [0, 1] images (B, 1|3, H, W)."""
    was = model.training
    model.eval()
    dev = _device(model)
    out = [F.normalize(model.encode_image(model.preprocess_images(images[i : i + batch_size].to(dev))), dim=-1).float().cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


@torch.no_grad()
def embed_texts(model: DualEncoder, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (B, D)."""
    was = model.training
    model.eval()
    dev = _device(model)
    texts = list(texts)
    out = [F.normalize(model.encode_text(model.tokenize(texts[i : i + batch_size], dev)), dim=-1).float().cpu()
           for i in range(0, len(texts), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


# ----------------------------------------------------------------------------- loss / metrics


def _same_text(texts: Sequence[str]) -> torch.Tensor:
    codes = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    ids = torch.tensor([codes[t] for t in texts])
    return (ids[:, None] == ids[None, :]).float()


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised embeddings. Pairs whose reports are the identical
    string are all treated as positives (soft targets): phantom and real impressions repeat
    ("No acute cardiopulmonary process."), and pushing those apart would be noise."""
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.t()
    same = _same_text(texts).to(img.device)
    target = same / same.sum(1, keepdim=True)
    li = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    lt = -(target * F.log_softmax(logits.t(), 1)).sum(1).mean()
    return 0.5 * (li + lt)


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, texts: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image->text and text->image recall@k (a hit is any retrieved item whose report is the
    same string as the query's), mean cosine of matched vs unmatched pairs, and ``i2t_auroc``
    (per image, the share of different reports its own report outranks)."""
    sim = img @ txt.t()
    same = _same_text(texts).bool()
    out: dict[str, float] = {}
    for k in ks:
        kk = min(k, sim.shape[1])
        i2t = same.gather(1, sim.topk(kk, dim=1).indices).any(1).float().mean()
        t2i = same.gather(1, sim.t().topk(kk, dim=1).indices).any(1).float().mean()
        out[f"i2t_recall@{k}"] = float(i2t)
        out[f"t2i_recall@{k}"] = float(t2i)
    out["cosine_matched"] = float(sim.diag().mean())
    out["cosine_unmatched"] = float(sim[~same].mean()) if (~same).any() else float("nan")
    # How a consistency reward uses the model: does an image score its own report above a
    # different one? Per image, the share of other reports ranked below its own (ties 1/2),
    # averaged; 0.5 = chance. Unlike recall@1 it is not swamped by near-duplicate reports.
    diff = ~same
    if diff.any():
        own = sim.diag()[:, None]
        wins = ((own > sim).float() + 0.5 * (own == sim).float()) * diff
        rows = diff.any(1)
        out["i2t_auroc"] = float((wins.sum(1)[rows] / diff.sum(1)[rows]).mean())
    else:
        out["i2t_auroc"] = float("nan")
    return out


# ----------------------------------------------------------------------------- build / save / load


def build_dual_encoder(config: DualEncoderConfig, tokenizer) -> DualEncoder:
    return DualEncoder(config, tokenizer)


def save_dual_encoder(model: DualEncoder, out_dir: str | Path, metrics: dict[str, Any] | None = None) -> None:
    """Write ``out_dir/{model.safetensors, config.json, tokenizer/, eval.json}`` atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        cfg = asdict(model.config)
        cfg["text"] = {k: v for k, v in model.bert_config.to_dict().items()
                       if k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                "max_position_embeddings", "type_vocab_size", "pad_token_id", "layer_norm_eps", "hidden_act")}
        write_json(tmp / "config.json", cfg)
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        write_json(tmp / "eval.json", metrics or {})


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in sd):
        n += 1
    return n


def _config_from_cxrclip(sd: dict[str, torch.Tensor], cfg: dict[str, Any], text_dir: Path | None, source: Path) -> DualEncoderConfig:
    """DualEncoderConfig for a CXR-CLIP state dict: sizes from tensor shapes, the rest from
    its (plain-dict) hydra config when present."""
    mcfg = (cfg or {}).get("model", {}) or {}
    enc = mcfg.get("image_encoder", {}) or {}
    if enc and enc.get("name") != "resnet":
        raise DataError(f"{source}: image encoder {enc.get('name')!r} is not supported; expected CXR-CLIP's 'resnet' (ResNet-50)")
    rk = "image_encoder.resnet."
    if f"{rk}conv1.weight" not in sd:
        raise DataError(f"{source}: no '{rk}conv1.weight'; expected a CXR-CLIP ResNet image encoder state dict")
    layers = [_count(sd, f"{rk}layer{i}.") for i in range(1, 5)]
    if f"{rk}layer1.0.conv3.weight" not in sd:
        raise DataError(f"{source}: image encoder is not a Bottleneck ResNet (no layer1.0.conv3)")
    width = int(sd[f"{rk}layer1.0.conv1.weight"].shape[0])
    tk = "text_encoder.text_encoder."
    if f"{tk}embeddings.word_embeddings.weight" not in sd:
        raise DataError(f"{source}: no '{tk}embeddings.word_embeddings.weight'; expected a HF BERT text encoder")
    vocab, hidden = sd[f"{tk}embeddings.word_embeddings.weight"].shape
    text = {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "num_hidden_layers": _count(sd, f"{tk}encoder.layer."),
        "num_attention_heads": max(1, int(hidden) // 64),
        "intermediate_size": int(sd[f"{tk}encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "max_position_embeddings": int(sd[f"{tk}embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(sd[f"{tk}embeddings.token_type_embeddings.weight"].shape[0]),
    }
    if text_dir is not None and (text_dir / "config.json").is_file():
        hf = read_json(text_dir / "config.json")
        for k in ("num_attention_heads", "layer_norm_eps", "hidden_act", "pad_token_id"):
            if k in hf:
                text[k] = hf[k]
    proj = mcfg.get("projection_head", {}) or {}
    if "image_projection.fc.weight" in sd:
        kind = "mlp"
    elif "image_projection.projection.weight" in sd:
        kind = "linear"
    else:
        raise DataError(f"{source}: no image_projection weights; CXR-CLIP checkpoints without a projection head are not supported")
    base = (cfg or {}).get("base", {}) or {}
    return DualEncoderConfig(
        image_layers=layers,
        image_width_per_group=width,
        image_size=int(base.get("image_size", 224)),
        text=text,
        text_pooling=str((mcfg.get("text_encoder", {}) or {}).get("pooling", "eos")),
        max_length=int(base.get("text_max_length", 256)),
        projection=kind,
        embed_dim=int(sd["image_projection.projection.weight"].shape[0]),
        dropout=float(proj.get("dropout", 0.1)),
        temperature=float(mcfg.get("temperature", 0.07)),
    )


def _load_cxrclip(ckpt: Path, tokenizer: str | Path | None, text_config: str | Path | None) -> DualEncoder:
    try:
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as e:
        raise DataError(
            f"{ckpt}: torch.load(weights_only=True) failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "CXR-CLIP saves its hydra config as an OmegaConf object, which weights_only cannot load; convert the "
            "checkpoint once with the command in medrl.models.dual_encoder's docstring"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise DataError(f"{ckpt}: expected a CXR-CLIP checkpoint dict with a 'model' state dict (and 'config')")
    sd = {k.removeprefix("module."): v for k, v in obj["model"].items()}
    cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    tok_dir = Path(tokenizer) if tokenizer else ckpt.parent / "tokenizer"
    if not tok_dir.is_dir():
        name = ((cfg.get("model", {}) or {}).get("text_encoder", {}) or {}).get("name")
        if name and Path(name).is_dir():
            tok_dir = Path(name)
    tok = _load_tokenizer(tok_dir)
    config = _config_from_cxrclip(sd, cfg, Path(text_config) if text_config else tok_dir, ckpt)
    model = DualEncoder(config, tok)
    ours = model.state_dict()
    keep = {k: v for k, v in sd.items() if k in ours}
    missing = [k for k in ours if k not in keep and ".pooler." not in k]  # the pooler is unused
    if missing:
        raise DataError(f"{ckpt}: CXR-CLIP checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    if len(tok) > config.text["vocab_size"]:
        raise DataError(f"{tok_dir}: tokenizer has {len(tok)} tokens but the checkpoint's BERT vocabulary is {config.text['vocab_size']}")
    try:
        model.load_state_dict(keep, strict=False)
    except RuntimeError as e:
        raise DataError(f"{ckpt}: tensor shapes do not fit the inferred architecture ({e})") from None
    return model


def load_dual_encoder(path: str | Path, device: str = "cpu", *, tokenizer: str | Path | None = None,
                      text_config: str | Path | None = None) -> DualEncoder:
    """Load our saved directory (model.safetensors + config.json + tokenizer/), a CXR-CLIP
    checkpoint file, or a directory holding one (``*.tar``/``*.pt``/``*.pth`` + ``tokenizer/``)."""
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        cfg = read_json(path / "config.json")
        try:
            config = DualEncoderConfig(**cfg)
        except TypeError as e:
            raise DataError(f"{path / 'config.json'}: bad dual-encoder config ({e})") from None
        model = DualEncoder(config, _load_tokenizer(Path(tokenizer) if tokenizer else path / "tokenizer"))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    elif path.is_dir():
        cands = sorted(p for ext in ("*.tar", "*.pt", "*.pth") for p in path.glob(ext))
        if len(cands) != 1:
            raise DataError(f"{path}: expected model.safetensors (ours) or exactly one CXR-CLIP checkpoint (*.tar/*.pt/*.pth), found {[c.name for c in cands]}")
        model = _load_cxrclip(cands[0], tokenizer, text_config)
    elif path.is_file():
        model = _load_cxrclip(path, tokenizer, text_config)
    else:
        raise DataError(f"{path}: dual encoder not found; expected a directory or a CXR-CLIP checkpoint file")
    return model.to(device).eval()


# ----------------------------------------------------------------------------- training


def _texts(df: pd.DataFrame) -> list[str]:
    for col in ("impression", "report", "text"):
        if col in df.columns:
            return [t if isinstance(t, str) else "" for t in df[col]]
    raise DataError(f"pairs: no report column; expected 'impression' (pairs.csv), found {list(df.columns)}")


def augment_cxr(x: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Label-preserving jitter of a (B, C, H, W) batch in [0, 1] for contrastive training:
    a random similarity warp (scale 1 +- 0.1 s, shift +- 0.06 s of the width, rotation
    +- 0.05 s rad; no flips, the heart is on the left) and contrast/brightness +- 0.1 s.
    Findings and their report do not change under it; the memorised pixel pattern does,
    which is what a from-scratch encoder on a few hundred pairs overfits to."""
    if strength <= 0:
        return x
    b = x.shape[0]
    u = lambda: (torch.rand(b, generator=generator) * 2 - 1) * strength  # noqa: E731
    scale, theta = 1 + 0.1 * u(), 0.05 * u()
    tx, ty = 0.12 * u(), 0.12 * u()  # affine_grid units: the image spans [-1, 1]
    cos, sin = torch.cos(theta) / scale, torch.sin(theta) / scale
    mat = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1).to(x)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast, bright = (1 + 0.1 * u()).to(x), (0.1 * u()).to(x)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    return ((y - mean) * contrast[:, None, None, None] + mean + bright[:, None, None, None]).clamp(0, 1)


def train_dual_encoder(
    pairs: pd.DataFrame,
    out_dir: str | Path,
    *,
    size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    embed_dim: int,
    seed: int,
    ckpt_dir: str | Path,
    device: str = "cpu",
    base: str | Path | None = None,
    config: DualEncoderConfig | None = None,
    augment: float = 0.0,
    weight_decay: float = 1e-4,
) -> dict[str, float]:
    """CLIP training of the embedded-default dual encoder on (image, impression) pairs of
    ``split == train``: WordPiece tokenizer trained on those impressions, AdamW + cosine
    schedule, checkpoint/resume per epoch, BatchNorm re-estimated at the end. Reports on
    ``split == test``: image->text / text->image recall@1/5 and matched vs unmatched cosine
    (``retrieval_metrics``). Writes ``out_dir`` (``save_dual_encoder`` layout).
    ``augment``: strength of ``augment_cxr`` on training batches (0 = none)."""
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    train, test = split_rows(pairs, "train"), split_rows(pairs, "test")
    if len(train) == 0:
        raise DataError("pairs: no rows with split == 'train'")
    t_train = _texts(train)
    x_train = images_from_pairs(train, size, base=base, desc="dualenc: load train")
    cfg = config or DualEncoderConfig(image_size=size, embed_dim=embed_dim)
    tok_dir = ckpt_dir / "dualenc_tokenizer"
    tokenizer = build_wordpiece_tokenizer(t_train, tok_dir)

    torch.manual_seed(seed)
    model = DualEncoder(cfg, tokenizer).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(x_train)
    steps = max(1, n // batch_size) if n >= batch_size else 1  # drop the ragged batch: tiny batches make CLIP noisy
    total_steps = steps * epochs
    ckpt = ckpt_dir / "dualenc"
    ckpt_config = {"fingerprint": fingerprint(
        n=n, size=size, epochs=epochs, batch_size=batch_size, lr=lr, embed_dim=embed_dim, seed=seed, augment=augment,
        weight_decay=weight_decay, cfg=asdict(cfg), vocab=len(tokenizer), images=list(train["path"]))}
    start, history = resume_epochs(ckpt, ckpt_config, model, opt)

    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
        aug_gen = torch.Generator().manual_seed(seed * 100_003 + epoch)  # per epoch: resume-exact
        total = 0.0
        for i in progress(range(steps), desc=f"dualenc epoch {epoch + 1}/{epochs}"):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(lr, epoch * steps + i, total_steps, warmup=min(steps, total_steps // 10))
            idx = perm[i * batch_size : (i + 1) * batch_size]
            total += _clip_step(model, opt, x_train, t_train, idx, aug_gen, augment, device)
        history.append({"epoch": epoch + 1, "train_loss": total / steps, "seconds": time.perf_counter() - t0,
                        "temperature": float(1.0 / model.logit_scale.detach().exp().clamp(max=100.0))})
        save_epoch(ckpt, ckpt_config, model, opt, epoch + 1, history)

    recalibrate_bn(model.image_encoder, [model.preprocess_images(to_unit(x_train[i : i + 256])) for i in range(0, n, 256)], device)
    model = model.cpu().eval()
    metrics: dict[str, float] = {
        "train_loss_final": float(history[-1]["train_loss"]) if history else float("nan"),
        "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])) if history else float("nan"),
        "epochs": float(epochs),
        "temperature": float(1.0 / model.logit_scale.detach().exp().clamp(max=100.0)),
        "vocab_size": float(len(tokenizer)),
    }
    if len(test):
        metrics.update(_retrieval_test_metrics(model, test, size, base))
    save_dual_encoder(model, out_dir, {"metrics": metrics, "history": history})
    discard_train_state(ckpt)
    return metrics


def _clip_step(model: DualEncoder, opt: torch.optim.Optimizer, x_train: torch.Tensor, t_train: list[str],
               idx: torch.Tensor, aug_gen: torch.Generator, augment: float, device: str) -> float:
    """One CLIP step on the (augmented) batch ``idx``; returns its loss."""
    texts = [t_train[j] for j in idx.tolist()]
    xb = augment_cxr(to_unit(x_train[idx]), aug_gen, augment)
    img = F.normalize(model.encode_image(model.preprocess_images(xb.to(device))), dim=-1)
    txt = F.normalize(model.encode_text(model.tokenize(texts, device)), dim=-1)
    loss = clip_loss(img, txt, model.logit_scale, texts)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _retrieval_test_metrics(model: DualEncoder, test: pd.DataFrame, size: int, base: str | Path | None
                            ) -> dict[str, float]:
    """Image<->text retrieval on the test pairs (``test_``-prefixed ``retrieval_metrics``) and counts."""
    x_test = to_unit(images_from_pairs(test, size, base=base, desc="dualenc: load test"))
    t_test = _texts(test)
    m = retrieval_metrics(embed_images(model, x_test), embed_texts(model, t_test), t_test)
    metrics = {f"test_{k}": v for k, v in m.items()}
    metrics["test_n"] = float(len(test))
    metrics["test_unique_reports"] = float(len(set(t_test)))
    return metrics
