"""The tiny SD stack: SD v1.5 on-disk layout, one loader for local dirs / hub ids, UNet
weight files, prompt encoding."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medrl.data.tokenizer import build_tokenizer
from medrl.errors import DataError
from medrl.diffusion.stack import (
    SDComponents,
    build_tiny_stack,
    build_tiny_vae,
    encode_prompts,
    load_components,
    save_stack,
)

TEXTS = [
    "melanoma with hair and ruler", "nevus with gel bubble", "melanoma with ink", "nevus",
    "small left pleural effusion", "no acute cardiopulmonary process", "mild cardiomegaly",
]
# Small but structurally like models.tiny (two UNet levels, factor-2 VAE on 32 px images).
TINY = dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
            text_hidden_size=32, text_layers=1, text_heads=2, max_position_embeddings=77,
            vae_block_out_channels=[16, 32], latent_channels=4)
SIZE = 32


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_sd")
    build_tokenizer(TEXTS, root / "tokenizer", vocab_size=600)
    m = build_tiny_stack(root / "stack", root / "tokenizer", TINY, SIZE, seed=0)
    assert m["latent_size"] == SIZE // 2
    return root / "stack"


@torch.no_grad()
def _unet_sum(unet) -> float:
    return float(sum(p.double().sum() for p in unet.parameters()))


def test_layout_matches_sd15_and_both_loaders_read_it(stack: Path):
    for sub, files in {
        "unet": ["config.json", "diffusion_pytorch_model.safetensors"],
        "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
        "text_encoder": ["config.json", "model.safetensors"],
        "scheduler": ["scheduler_config.json"],
    }.items():
        for f in files:
            assert (stack / sub / f).is_file(), f"{sub}/{f} missing"
    # SD v1.5's tokenizer/ holds the BPE files (vocab.json, merges.txt) too
    assert (stack / "tokenizer" / "vocab.json").is_file() and (stack / "tokenizer" / "merges.txt").is_file()
    index = json.loads((stack / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert not list(stack.rglob("*.bin")), "weights must be safetensors"

    c = load_components(str(stack))
    assert isinstance(c, SDComponents)
    assert type(c.unet).__name__ == "UNet2DConditionModel" and type(c.vae).__name__ == "AutoencoderKL"
    assert type(c.text_encoder).__name__ == "CLIPTextModel" and type(c.tokenizer).__name__ == "CLIPTokenizer"
    assert type(c.scheduler).__name__ == "DDIMScheduler"
    for m in (c.unet, c.vae, c.text_encoder):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert c.unet.config.cross_attention_dim == c.text_encoder.config.hidden_size == 32
    assert c.unet.config.sample_size == SIZE // 2 and c.vae.config.latent_channels == 4
    assert "CrossAttnDownBlock2D" in c.unet.config.down_block_types
    assert "CrossAttnUpBlock2D" in c.unet.config.up_block_types
    assert c.text_encoder.config.vocab_size == len(c.tokenizer)
    assert c.text_encoder.config.eos_token_id == c.tokenizer.eos_token_id
    sc = c.scheduler.config
    assert (sc.beta_schedule, sc.beta_start, sc.beta_end, sc.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)
    assert (sc.clip_sample, sc.set_alpha_to_one, sc.steps_offset, sc.prediction_type) == (False, False, 1, "epsilon")

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(stack))
    assert _unet_sum(pipe.unet) == pytest.approx(_unet_sum(c.unet), rel=1e-9)
    out = pipe("melanoma with hair", num_inference_steps=2, height=SIZE, width=SIZE, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, SIZE, SIZE) and torch.isfinite(out.images).all()


def test_encode_prompts_shapes_padding_and_truncation(stack: Path):
    c = load_components(str(stack))
    long = " ".join(["melanoma with hair and ruler"] * 40)  # far beyond 77 tokens
    e = encode_prompts(c, ["melanoma with hair", "nevus", "", long])
    assert e.shape == (4, c.tokenizer.model_max_length, c.text_encoder.config.hidden_size) == (4, 77, 32)
    assert torch.isfinite(e).all()
    assert not torch.allclose(e[0], e[1])
    # same prompt, same embedding, whatever else is in the batch
    assert torch.allclose(encode_prompts(c, ["nevus"])[0], e[1], atol=1e-6)


def test_unet_weights_round_trip_and_mismatch(stack: Path, tmp_path: Path):
    c = load_components(str(stack))
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in c.unet.state_dict().items()}
    f = tmp_path / "pretrained_unet.safetensors"
    save_file(sd, str(f))
    c2 = load_components(str(stack), unet_weights=str(f))
    for k, v in c2.unet.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not any(p.requires_grad for p in c2.unet.parameters())

    bad = dict(sd)
    dropped = min(bad)
    del bad[dropped]
    bad["not_a_unet.weight"] = torch.zeros(3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DataError) as ei:
        load_components(str(stack), unet_weights=str(tmp_path / "bad.safetensors"))
    msg = str(ei.value)
    assert dropped in msg and "not_a_unet.weight" in msg and "bad.safetensors" in msg

    wrong = dict(sd)
    k0 = next(k for k in wrong if wrong[k].ndim == 4)
    wrong[k0] = torch.zeros(1, 1, 1, 1)
    save_file(wrong, str(tmp_path / "shape.safetensors"))
    with pytest.raises(DataError, match="wrong shape"):
        load_components(str(stack), unet_weights=str(tmp_path / "shape.safetensors"))
    with pytest.raises(DataError, match="not found"):
        load_components(str(stack), unet_weights=str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="not a readable"):
        load_components(str(stack), unet_weights=str(tmp_path / "junk.safetensors"))


def test_missing_stack_errors_name_path_and_layout(stack: Path, tmp_path: Path):
    with pytest.raises(DataError) as ei:
        load_components(str(tmp_path / "nowhere" / "stack"))
    assert "nowhere" in str(ei.value) and "model_index.json" in str(ei.value)

    broken = tmp_path / "broken"
    shutil.copytree(stack, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(DataError, match="text_encoder/"):
        load_components(str(broken))

    # a hub id that is not in the HF cache: nothing is downloaded, the error says why
    with pytest.raises(DataError) as ei:
        load_components("medrl-test/definitely-not-cached")
    assert "medrl-test/definitely-not-cached" in str(ei.value) and "cache" in str(ei.value)


def test_hub_id_resolves_through_hf_cache(stack: Path, tmp_path: Path, monkeypatch):
    """A hub id goes through the same loader, reading the HF cache layout offline."""
    import huggingface_hub.constants as hf_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--medrl-test--tiny-sd"
    shutil.copytree(stack, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    c = load_components("medrl-test/tiny-sd")
    assert _unet_sum(c.unet) == pytest.approx(_unet_sum(load_components(str(stack)).unet), rel=1e-12)
    assert type(c.scheduler).__name__ == "DDIMScheduler"


def test_save_stack_round_trip_and_bad_tiny_params(stack: Path, tmp_path: Path):
    c = load_components(str(stack))
    c.unet.conv_out.bias.data += 1.0
    save_stack(c, tmp_path / "copy")
    c2 = load_components(str(tmp_path / "copy"))
    assert torch.equal(c2.unet.conv_out.bias, c.unet.conv_out.bias)

    bad = dict(TINY, cross_attention_dim=48)
    with pytest.raises(DataError, match="cross_attention_dim"):
        build_tiny_stack(tmp_path / "bad", stack / "tokenizer", bad, SIZE, seed=0)
    with pytest.raises(DataError, match="not divisible"):
        build_tiny_stack(tmp_path / "bad2", stack / "tokenizer", TINY, 33, seed=0)


def test_default_tiny_params_give_16x16_latents_for_64px(stack: Path, tmp_path: Path):
    """The embedded default keeps the UNet at 16x16 latents (32x32 is ~8x slower on CPU)."""
    from medrl.config import load_params

    params = load_params(Path(__file__).resolve().parent.parent / "params.yaml", check_paths=False)
    tiny = params.models.tiny.model_dump()
    m = build_tiny_stack(tmp_path / "default", stack / "tokenizer", tiny, 64, seed=0)
    assert m["latent_size"] == 16
    c = load_components(str(tmp_path / "default"))
    with torch.no_grad():
        z = c.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 16, 16) and c.unet.config.sample_size == 16


def test_vae_norm_groups_sets_channels_per_group(tmp_path: Path):
    """models.tiny.vae_norm_groups reaches the saved VAE (SD v1.5's VAE has >= 4 channels per
    GroupNorm group; one per group is instance norm, which discards each image's colour), and a
    value that does not divide a VAE width is refused naming the key."""
    build_tokenizer(TEXTS, tmp_path / "tok", vocab_size=600)
    build_tiny_stack(tmp_path / "s", tmp_path / "tok", {**TINY, "vae_norm_groups": 4}, SIZE, seed=0)
    vae = load_components(str(tmp_path / "s")).vae
    assert vae.config.norm_num_groups == 4
    assert {m.num_groups for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)} == {4}
    build_tiny_stack(tmp_path / "d", tmp_path / "tok", TINY, SIZE, seed=0)
    assert load_components(str(tmp_path / "d")).vae.config.norm_num_groups == min(TINY["vae_block_out_channels"])
    with pytest.raises(DataError, match=r"vae_norm_groups=3 must divide"):
        build_tiny_stack(tmp_path / "x", tmp_path / "tok", {**TINY, "vae_norm_groups": 3}, SIZE, seed=0)
    # The VAE alone (for VAE experiments) is the stack's VAE architecture, seeded reproducibly.
    alone = build_tiny_vae({**TINY, "vae_norm_groups": 4}, SIZE, seed=1)
    assert alone.config.norm_num_groups == 4 and alone.config.latent_channels == TINY["latent_channels"]
    same = build_tiny_vae({**TINY, "vae_norm_groups": 4}, SIZE, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), same.state_dict().values()))
