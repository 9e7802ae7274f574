"""Generation with fixed per-image seeds, base vs base + adapter (LoRA / full / ACE)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medrl.errors import DataError
from medrl.io import load_image
from medrl.diffusion.generate import MANIFEST_COLUMNS, generate, image_seed, slugify

torch.set_num_threads(1)

TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 8,
            "text_hidden_size": 32, "text_layers": 1, "text_heads": 2, "max_position_embeddings": 16,
            "vae_block_out_channels": [16, 32], "latent_channels": 4}
PROMPTS = ["melanoma with hair", "nevus, ruler", "Nevus ruler"]
GEN = {"num_steps": 3, "guidance_scale": 2.0, "eta": 1.0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    from medrl.bench import tiny_stack

    return tiny_stack(tmp_path_factory.mktemp("gen") / "stack", size=16, tiny=TINY, seed=0, max_length=16)


def _images(out: Path) -> dict[str, np.ndarray]:
    m = pd.read_csv(out / "manifest.csv")
    return {p: load_image(out / p).numpy() for p in m["path"]}


def _adapter(stack: Path, out: Path, *, perturb: float = 0.0, ace: bool = False, full: bool = False) -> Path:
    from medrl.diffusion.stack import load_components
    from medrl.diffusion.ace import ACE
    from medrl.diffusion.lora import add_lora, save_adapter

    c = load_components(str(stack))
    if full:
        with torch.no_grad():
            c.unet.conv_out.bias.add_(perturb)
    else:
        add_lora(c.unet, 2, seed=1)
        if perturb:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for n, p in c.unet.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=g) * perturb)
    a = ACE(2, TINY["text_hidden_size"], seed=0, init_std=0.5) if ace else None
    return save_adapter(c.unet, a, out)


def test_deterministic_layout_and_manifest(stack, tmp_path):
    m1 = generate(stack, tmp_path / "a", prompts=PROMPTS, n_per_prompt=2, seed=7, batch_size=4, **GEN)
    generate(stack, tmp_path / "b", prompts=PROMPTS, n_per_prompt=2, seed=7, batch_size=4, **GEN)
    assert m1["n_images"] == 6.0 and m1["n_prompts"] == 3.0
    man = pd.read_csv(tmp_path / "a" / "manifest.csv")
    assert list(man.columns) == MANIFEST_COLUMNS and len(man) == 6
    assert set(man["prompt_id"]) == {slugify(p) for p in PROMPTS}
    assert len(set(man["prompt_id"])) == 3  # "nevus, ruler" and "Nevus ruler" stay apart
    assert man["seed"].tolist() == [image_seed(7, i, j) for i in range(3) for j in range(2)]
    assert (man["model"] == str(stack)).all()
    for rel in man["path"]:
        a, b = tmp_path / "a" / rel, tmp_path / "b" / rel
        assert a.is_file() and a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / man["path"][0]).parent.name == slugify(PROMPTS[0])
    assert (tmp_path / "a" / man["path"][0]).name == "0.png"
    # a different seed gives different images
    generate(stack, tmp_path / "c", prompts=PROMPTS, n_per_prompt=2, seed=8, batch_size=4, **GEN)
    ia, ic = _images(tmp_path / "a"), _images(tmp_path / "c")
    assert any(np.abs(ia[k] - ic[k]).max() > 0 for k in ia)


def test_images_do_not_depend_on_batch_size(stack, tmp_path):
    ids = ["p0", "p1", "p2"]
    generate(stack, tmp_path / "b1", prompts=PROMPTS, n_per_prompt=2, seed=3, batch_size=1, prompt_ids=ids, **GEN)
    generate(stack, tmp_path / "b4", prompts=PROMPTS, n_per_prompt=2, seed=3, batch_size=4, prompt_ids=ids, **GEN)
    i1, i4 = _images(tmp_path / "b1"), _images(tmp_path / "b4")
    assert i1.keys() == i4.keys() == {f"p{i}/{j}.png" for i in range(3) for j in range(2)}
    for k in i1:
        # batched convolutions may differ in the last float bit -> at most one PNG level
        assert np.abs(i1[k] - i4[k]).max() <= 1.0 / 255 + 1e-6, k
    # n_per_prompt grows without changing the first images (seed depends on (seed, i, j) only)
    generate(stack, tmp_path / "n3", prompts=PROMPTS[:1], n_per_prompt=3, seed=3, batch_size=3, prompt_ids=ids[:1], **GEN)
    i3 = _images(tmp_path / "n3")
    assert np.abs(i3["p0/1.png"] - i1["p0/1.png"]).max() <= 1.0 / 255 + 1e-6


def test_zero_init_lora_equals_base_and_trained_adapter_differs(stack, tmp_path):
    kw = dict(prompts=PROMPTS[:2], n_per_prompt=2, seed=11, batch_size=4, **GEN)
    generate(stack, tmp_path / "base", **kw)
    zero = _adapter(stack, tmp_path / "ad_zero")
    m = generate(stack, tmp_path / "zero", adapter_dir=zero, **kw)
    assert m["with_adapter"] == 1.0 and m["with_ace"] == 0.0
    ib, iz = _images(tmp_path / "base"), _images(tmp_path / "zero")
    for k in ib:
        assert np.array_equal(ib[k], iz[k]), k
    man = pd.read_csv(tmp_path / "zero" / "manifest.csv")
    assert (man["model"] == f"{stack}+{zero}").all()

    trained = _adapter(stack, tmp_path / "ad_lora", perturb=0.3)
    generate(stack, tmp_path / "lora", adapter_dir=trained, **kw)
    il = _images(tmp_path / "lora")
    assert max(np.abs(ib[k] - il[k]).max() for k in ib) > 0.01

    with_ace = _adapter(stack, tmp_path / "ad_ace", ace=True)  # zero LoRA, ACE only
    m = generate(stack, tmp_path / "ace", adapter_dir=with_ace, **kw)
    assert m["with_ace"] == 1.0
    ia = _images(tmp_path / "ace")
    assert max(np.abs(ib[k] - ia[k]).max() for k in ib) > 0.0

    full = _adapter(stack, tmp_path / "ad_full", perturb=0.5, full=True)
    assert (full / "unet.safetensors").is_file()
    generate(stack, tmp_path / "full", adapter_dir=full, **kw)
    ifu = _images(tmp_path / "full")
    assert max(np.abs(ib[k] - ifu[k]).max() for k in ib) > 0.0


def test_bad_inputs(stack, tmp_path):
    with pytest.raises(DataError, match="prompt_ids"):
        generate(stack, tmp_path / "x", prompts=PROMPTS, n_per_prompt=1, seed=0, prompt_ids=["a", "b"], **GEN)
    with pytest.raises(DataError, match="safe folder"):
        generate(stack, tmp_path / "x", prompts=PROMPTS[:1], n_per_prompt=1, seed=0, prompt_ids=["../up"], **GEN)
    with pytest.raises(DataError, match="adapter config"):
        generate(stack, tmp_path / "x", prompts=PROMPTS[:1], n_per_prompt=1, seed=0, adapter_dir=tmp_path / "nope", **GEN)


def test_slugify():
    assert slugify("Melanoma, with HAIR & ruler!").startswith("melanoma_with_hair_ruler_")
    assert slugify("a") != slugify("A.")
    assert len(slugify("x" * 500)) <= 80 + 9
    assert slugify("!!!").startswith("prompt_")


def test_bench_smoke(tmp_path):
    import json

    from medrl.bench import main

    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--steps", "2", "--batch", "2", "--train-batch", "2", "--train-micro-steps", "1",
                 "--tiny-size", "16", "--params", str(tmp_path / "absent.yaml"), "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    for k in ("trajectories_per_s", "sample_timesteps_per_s", "peak_mem_sample_MB", "peak_mem_train_MB"):
        assert row[k] > 0, k
    assert row["image"] == [3, 16, 16] and row["num_steps"] == 2
