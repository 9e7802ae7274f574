"""VAE training, the latent store and supervised base fine-tuning (incl. exact resume)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from medrl.data.tokenizer import build_tokenizer
from medrl.errors import DataError
from medrl.io import read_json
from medrl.diffusion.finetune import finetune_base
from medrl.diffusion.latents import extract_latents, load_latents
from medrl.diffusion.stack import build_stack, build_tiny_stack, encode_prompts, load_components
from medrl.diffusion.vae_train import edge_loss, load_images, recon_metrics, train_vae

PROMPTS = ["melanoma", "nevus", "melanoma with hair", "nevus with hair"]
TINY = dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
            text_hidden_size=32, text_layers=1, text_heads=2, max_position_embeddings=77,
            vae_block_out_channels=[16, 32], latent_channels=4)
SIZE = 32
VAE_TRAIN = dict(steps=40, batch_size=4, lr=2e-3, kl_weight=1e-6, edge_weight=1.0, seed=0)


def _lesion(prompt: str, rng: np.random.Generator, mode: str = "RGB") -> Image.Image:
    """Skin-coloured background, a lesion whose colour depends on its label, optional hair."""
    im = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers([190, 130, 110], [230, 160, 140])))
    d = ImageDraw.Draw(im)
    cx, cy = rng.uniform(12, 20, 2)
    r = rng.uniform(5, 9)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(60, 30, 20) if "melanoma" in prompt else (150, 100, 70))
    if "hair" in prompt:
        for _ in range(3):
            d.line(list(rng.uniform(0, SIZE, 4)), fill=(20, 15, 10), width=1)
    return im.convert(mode)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("latents_ft")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        prompt = PROMPTS[i % 4]
        path = root / "images" / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        _lesion(prompt, rng).save(path)
        rows.append({"image": f"{i:04d}", "path": str(path), "prompt": prompt, "split": "train" if i < 12 else "test"})
    items = pd.DataFrame(rows)
    build_tokenizer(PROMPTS, root / "tokenizer", vocab_size=560)
    build_tiny_stack(root / "stack", root / "tokenizer", TINY, SIZE, seed=0)
    m = extract_latents(root / "stack", items, root / "latents", size=SIZE, mode="RGB", text_col="prompt", batch_size=5)
    return {"root": root, "items": items, "stack": root / "stack", "latents": root / "latents", "extract": m}


def _vae(stack: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(stack / "vae"))


# ----------------------------------------------------------------------------- VAE


def test_train_vae_resume_after_kill_is_exact(data, tmp_path: Path):
    paths = [Path(p) for p in data["items"]["path"]]
    kw = dict(size=SIZE, mode="RGB", steps=6, batch_size=4, lr=1e-3, kl_weight=1e-6, seed=3, checkpoint_every=2)
    vae_a = _vae(data["stack"])
    ma = train_vae(vae_a, paths, ckpt_dir=tmp_path / "a", **kw)
    assert not (tmp_path / "a").exists()
    assert vae_a.config.scaling_factor == pytest.approx(ma["vae_scaling_factor"]) and ma["vae_scaling_factor"] != 0.18215

    def kill(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train_vae(_vae(data["stack"]), paths, ckpt_dir=tmp_path / "b", callback=kill, **kw)
    assert (tmp_path / "b" / "latest" / "model.safetensors").is_file()
    vae_b = _vae(data["stack"])
    mb = train_vae(vae_b, paths, ckpt_dir=tmp_path / "b", **kw)
    for (k, va), vb in zip(vae_a.state_dict().items(), vae_b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=k)
    assert mb["vae_psnr"] == pytest.approx(ma["vae_psnr"], abs=1e-4)
    assert mb["vae_scaling_factor"] == pytest.approx(ma["vae_scaling_factor"], rel=1e-5)


def test_train_vae_sets_a_truncated_checkpoint_aside(data, tmp_path: Path):
    """Issue 17, item 5: a truncated latest checkpoint is reported (naming the file), renamed
    latest.corrupt, and training resumes from the previous checkpoint to the same weights."""
    from medrl.checkpoints import CorruptCheckpointWarning

    paths = [Path(p) for p in data["items"]["path"]]
    kw = dict(size=SIZE, mode="RGB", steps=6, batch_size=4, lr=1e-3, kl_weight=1e-6, seed=3, checkpoint_every=2)
    vae_a = _vae(data["stack"])
    train_vae(vae_a, paths, ckpt_dir=tmp_path / "a", **kw)

    def kill(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train_vae(_vae(data["stack"]), paths, ckpt_dir=tmp_path / "b", callback=kill, **kw)
    weights = tmp_path / "b" / "latest" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    steps: list[int] = []

    def watch(step: int, loss: float) -> None:
        if not steps:
            assert (tmp_path / "b" / "latest.corrupt" / "model.safetensors").is_file()
        steps.append(step)

    vae_b = _vae(data["stack"])
    with pytest.warns(CorruptCheckpointWarning, match=r"latest/model\.safetensors"):
        train_vae(vae_b, paths, ckpt_dir=tmp_path / "b", callback=watch, **kw)
    assert steps and steps[0] < 5, steps  # resumed from the previous checkpoint, not from scratch only
    for (k, va), vb in zip(vae_a.state_dict().items(), vae_b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=k)


def test_edge_loss_weighs_a_lost_hair_above_a_brightness_shift():
    x = torch.full((1, 3, 32, 32), 0.5)
    x[..., 16, 4:28] = -1.0  # a one-pixel dark hair
    no_hair = torch.full_like(x, 0.5)
    shifted = x + 0.1
    assert edge_loss(x, x) == 0 and edge_loss(shifted, x) < 1e-6  # only differences count
    # Dropping the hair costs L1 = 24*1.5/1024; its edge loss counts two vertical edges per
    # column crossed and its two ends (/ 32*31 differences), while the uniform shift has the
    # larger L1 and no edge loss.
    l1_hair, l1_shift = (no_hair - x).abs().mean(), (shifted - x).abs().mean()
    assert l1_shift > l1_hair
    assert float(edge_loss(no_hair, x)) == pytest.approx((2 * 24 + 2) * 1.5 / (32 * 31), rel=1e-5)
    rec = no_hair.clone().requires_grad_(True)  # it must train: the gradient points to the hair row
    edge_loss(rec, x).backward()
    assert rec.grad[..., 16, 8].abs().min() > 0 and rec.grad[..., 4, 8].abs().max() == 0


def test_train_vae_adds_an_experiments_extra_loss_and_keys_its_checkpoint(data, tmp_path: Path):
    """extra_losses terms change training, and a checkpoint written under other extra terms is
    not resumed (their names and weights are part of the checkpoint's settings)."""
    paths = [Path(p) for p in data["items"]["path"]]
    kw = dict(size=SIZE, mode="RGB", steps=4, batch_size=4, lr=1e-3, kl_weight=1e-6, seed=3, checkpoint_every=2)
    mean_l1 = (10.0, lambda rec, x: (rec.mean((2, 3)) - x.mean((2, 3))).abs().mean())
    vae_plain, vae_extra = _vae(data["stack"]), _vae(data["stack"])
    train_vae(vae_plain, paths, ckpt_dir=tmp_path / "p", **kw)
    train_vae(vae_extra, paths, ckpt_dir=tmp_path / "e", extra_losses={"mean_l1": mean_l1}, **kw)
    differ = [k for (k, a), b in zip(vae_plain.state_dict().items(), vae_extra.state_dict().values())
              if not torch.equal(a, b)]
    assert differ, "the extra loss term did not reach the gradient"

    def kill(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_vae(_vae(data["stack"]), paths, ckpt_dir=tmp_path / "k", callback=kill, **kw)
    steps: list[int] = []
    with pytest.warns(UserWarning, match=r"different settings \(\['extra_losses'\]\)"):
        train_vae(_vae(data["stack"]), paths, ckpt_dir=tmp_path / "k", extra_losses={"mean_l1": mean_l1},
                  callback=lambda step, loss: steps.append(step), **kw)
    assert steps[0] == 1  # started afresh: the plain run's checkpoint has other settings


def test_build_stack_trains_vae_and_copies_pretrained(data, tmp_path: Path):
    paths = [Path(p) for p in data["items"]["path"]]
    x = load_images(paths, SIZE, "RGB")
    before = recon_metrics(_vae(data["stack"]), x)["vae_psnr"]
    m = build_stack(tmp_path / "stack", pretrained=None, tokenizer_dir=data["root"] / "tokenizer",
                    train_images=paths, image_size=SIZE, channels_mode="RGB", tiny=TINY, vae_train=VAE_TRAIN,
                    ckpt_dir=tmp_path / "ckpt", seed=0)
    assert not (tmp_path / "ckpt").exists()
    c = load_components(str(tmp_path / "stack"))
    assert c.vae.config.scaling_factor == pytest.approx(m["vae_scaling_factor"])
    after = recon_metrics(c.vae, x)["vae_psnr"]
    assert after > before + 3.0, (before, after)
    # the saved scaling factor makes the training latents unit-variance
    with torch.no_grad():
        z = c.vae.encode(x).latent_dist.mean * c.vae.config.scaling_factor
    assert 0.7 < float(z.std()) < 1.3

    m2 = build_stack(tmp_path / "copy", pretrained=str(tmp_path / "stack"), tokenizer_dir=None, train_images=[],
                     image_size=SIZE, channels_mode="RGB", tiny=TINY, vae_train=VAE_TRAIN,
                     ckpt_dir=tmp_path / "ckpt2", seed=0)
    assert m2["vae_trained"] == 0.0
    c2 = load_components(str(tmp_path / "copy"))
    for a, b in zip(c.vae.state_dict().values(), c2.vae.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(DataError, match="channels_mode"):
        build_stack(tmp_path / "x", pretrained=None, tokenizer_dir=data["root"] / "tokenizer", train_images=paths,
                    image_size=SIZE, channels_mode="CMYK", tiny=TINY, vae_train=VAE_TRAIN, ckpt_dir=tmp_path / "c", seed=0)


# ----------------------------------------------------------------------------- latents


def test_latent_store_contents_and_hash_checks(data, tmp_path: Path):
    lat, index = load_latents(data["latents"], expect_vae=data["stack"])
    assert lat.shape == (16, 4, SIZE // 2, SIZE // 2) and lat.dtype == torch.float32
    assert list(index.columns) == ["image", "text", "split", "finetune", "prompt"]
    assert (index["finetune"] == "1").all()  # no finetune column in the items: every image is used
    assert index["prompt"].tolist() == index["text"].tolist()  # no prompt column given: the text
    assert index["image"].tolist() == data["items"]["image"].tolist()  # "0000" stays a string
    assert index["text"].tolist() == data["items"]["prompt"].tolist()
    assert (index["split"] == "train").sum() == 12

    # deterministic posterior mean times the scaling factor
    vae = _vae(data["stack"]).eval()
    x = load_images([Path(data["items"]["path"][3])], SIZE, "RGB")
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(lat[3:4], z, rtol=1e-4, atol=1e-5)

    # a CSV path gives the same store, byte for byte at the same batch size
    csv = tmp_path / "items.csv"
    data["items"].to_csv(csv, index=False)
    extract_latents(data["stack"], csv, tmp_path / "again", size=SIZE, mode="RGB", text_col="prompt", batch_size=5)
    m1, m2 = (read_json(d / "manifest.json") for d in (data["latents"], tmp_path / "again"))
    assert m1 == m2 and m1["encoding"] == "posterior_mean"
    extract_latents(data["stack"], csv, tmp_path / "b64", size=SIZE, mode="RGB", text_col="prompt", batch_size=64)
    torch.testing.assert_close(load_latents(tmp_path / "b64")[0], lat, rtol=1e-4, atol=1e-5)

    # latents of another VAE are refused
    other = tmp_path / "other"
    build_tiny_stack(other, data["root"] / "tokenizer", TINY, SIZE, seed=1)
    with pytest.raises(DataError, match="VAE"):
        load_latents(data["latents"], expect_vae=other)

    # a modified latents file is refused
    tampered = tmp_path / "tampered"
    shutil.copytree(data["latents"], tampered)
    save_file({"latents": lat + 1.0}, str(tampered / "latents.safetensors"))
    with pytest.raises(DataError, match="does not match manifest"):
        load_latents(tampered)

    with pytest.raises(DataError, match="missing columns"):
        extract_latents(data["stack"], data["items"].drop(columns=["prompt"]), tmp_path / "bad",
                        size=SIZE, mode="RGB", text_col="prompt")


def test_the_fine_tune_leaves_out_the_rows_marked_0(data, tmp_path: Path):
    """A planted under-representation: training rows with finetune 0 are not fine-tuned on."""
    from diffusers import UNet2DConditionModel

    from medrl.diffusion.finetune import _train_latents

    items = data["items"].assign(finetune=[0, 1] * 8)
    extract_latents(data["stack"], items, tmp_path / "lat", size=SIZE, mode="RGB", text_col="prompt", batch_size=8)
    unet = UNet2DConditionModel.from_pretrained(str(data["stack"] / "unet"))
    lat, texts, _ = _train_latents(tmp_path / "lat", data["stack"], unet)
    keep = (items["split"] == "train") & (items["finetune"] == 1)
    assert len(lat) == int(keep.sum()) == 6 and texts == items.loc[keep, "prompt"].tolist()
    all_lat, _ = load_latents(tmp_path / "lat")
    torch.testing.assert_close(lat, all_lat[torch.as_tensor(keep.to_numpy(copy=True))])
    extract_latents(data["stack"], items.assign(finetune=0), tmp_path / "none", size=SIZE, mode="RGB",
                    text_col="prompt", batch_size=8)
    with pytest.raises(DataError, match="finetune == 1"):
        _train_latents(tmp_path / "none", data["stack"], unet)
    # a store written before the column existed: every image is fine-tuned on
    legacy = tmp_path / "legacy"
    shutil.copytree(data["latents"], legacy)
    pd.read_csv(legacy / "index.csv", dtype=str).drop(columns=["finetune", "prompt"]).to_csv(legacy / "index.csv",
                                                                                          index=False)
    assert (load_latents(legacy)[1]["finetune"] == "1").all()
    pd.read_csv(tmp_path / "lat" / "index.csv", dtype=str).drop(columns=["prompt"]).to_csv(legacy / "index.csv",
                                                                                         index=False)
    index = load_latents(legacy)[1]  # written before the prompt column: the captions were the prompts
    assert index["prompt"].tolist() == index["text"].tolist() and index["finetune"].tolist() == ["0", "1"] * 8


def test_vae_roundtrips_are_added_for_the_training_split(data, tmp_path: Path):
    from medrl.diffusion.latents import add_vae_roundtrips

    items = data["items"]
    out = add_vae_roundtrips(data["stack"], items, "train", tmp_path / "rt", size=SIZE, batch_size=5)
    extra = out.iloc[len(items):]
    assert out.iloc[: len(items)].equals(items)  # the originals are kept as they were
    assert len(extra) == 12 and (extra["split"] == "train").all()
    assert extra["prompt"].tolist() == items.loc[items.split == "train", "prompt"].tolist()
    vae = _vae(data["stack"]).eval()
    x = load_images([Path(items["path"][0])], SIZE, "RGB")
    with torch.no_grad():
        rec = (vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2
    saved = load_images([Path(extra["path"].iloc[0])], SIZE, "RGB")
    assert torch.allclose((saved + 1) / 2, rec, atol=1 / 255 + 1e-6)  # the decode, 8-bit PNG
    assert not torch.allclose((saved + 1) / 2, (x + 1) / 2, atol=1 / 255 + 1e-6)  # not the original


def test_grayscale_latents(data, tmp_path: Path):
    rows = []
    for i in range(3):
        p = tmp_path / f"cxr{i}.png"
        _lesion("nevus", np.random.default_rng(i), mode="L").save(p)
        rows.append({"image": f"c{i}", "path": str(p), "impression": "", "split": "train"})
    extract_latents(data["stack"], pd.DataFrame(rows), tmp_path / "lat", size=SIZE, mode="L", text_col="impression")
    lat, index = load_latents(tmp_path / "lat")
    assert lat.shape == (3, 4, SIZE // 2, SIZE // 2) and index["text"].tolist() == ["", "", ""]


# ----------------------------------------------------------------------------- fine-tuning


@torch.no_grad()
def _denoise_loss(stack: Path, latents_dir: Path) -> float:
    """Epsilon-MSE on the train latents at fixed noise and timesteps."""
    c = load_components(str(stack))
    lat, index = load_latents(latents_dir)
    keep = torch.tensor((index["split"] == "train").to_numpy())
    x0, texts = lat[keep], index.loc[keep.numpy(), "text"].tolist()
    g = torch.Generator().manual_seed(123)
    losses = []
    for t in (100, 300, 500, 700, 900):
        noise = torch.randn(x0.shape, generator=g)
        tt = torch.full((len(x0),), t)
        pred = c.unet(c.scheduler.add_noise(x0, noise, tt), tt, encode_prompts(c, texts)).sample
        losses.append(float(((pred - noise) ** 2).mean()))
    return float(np.mean(losses))


def test_finetune_reduces_loss_and_writes_full_stack(data, tmp_path: Path):
    out = tmp_path / "ft"
    logged: list[tuple[int, dict]] = []
    m = finetune_base(data["stack"], data["latents"], out, steps=25, batch_size=8, lr=1e-3, cond_dropout=0.1,
                      checkpoint_every=20, seed=0, ckpt_dir=tmp_path / "ckpt",
                      log_fn=lambda metrics, step: logged.append((step, metrics)), log_every=10)
    assert not (tmp_path / "ckpt").exists()
    assert [s for s, _ in logged] == [10, 20, 25] and all(np.isfinite(d["finetune_loss"]) for _, d in logged)
    assert m["finetune_n_train"] == 12 and m["finetune_n_prompts"] == 4
    loss = pd.read_csv(out / "loss.csv")
    assert len(loss) == 25 and np.isfinite(loss["loss"]).all()
    assert loss["loss"].tail(10).mean() < loss["loss"].head(10).mean()
    before, after = _denoise_loss(data["stack"], data["latents"]), _denoise_loss(out, data["latents"])
    assert after < 0.8 * before, (before, after)
    # full stack, same VAE bytes: the latent store still matches it
    load_latents(data["latents"], expect_vae=out)
    c = load_components(str(out))
    assert not any(p.requires_grad for p in c.unet.parameters())


def test_finetune_can_train_the_text_encoder_and_resumes_exactly(data, tmp_path: Path):
    from medrl.io import hash_path

    kw = dict(steps=6, batch_size=4, lr=1e-3, cond_dropout=0.5, checkpoint_every=2, seed=1, train_text_encoder=True)
    finetune_base(data["stack"], data["latents"], tmp_path / "a", ckpt_dir=tmp_path / "ca", **kw)
    frozen = dict(kw, train_text_encoder=False)
    finetune_base(data["stack"], data["latents"], tmp_path / "f", ckpt_dir=tmp_path / "cf", **frozen)
    # trained: written with the stack and different from the input's; frozen: copied byte for byte
    assert hash_path(tmp_path / "a" / "text_encoder") != hash_path(data["stack"] / "text_encoder")
    assert hash_path(tmp_path / "f" / "text_encoder") == hash_path(data["stack"] / "text_encoder")
    assert hash_path(tmp_path / "a" / "unet") != hash_path(tmp_path / "f" / "unet")
    load_latents(data["latents"], expect_vae=tmp_path / "a")

    def kill(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_base(data["stack"], data["latents"], tmp_path / "b", ckpt_dir=tmp_path / "cb", callback=kill, **kw)
    finetune_base(data["stack"], data["latents"], tmp_path / "b", ckpt_dir=tmp_path / "cb", **kw)
    for sub in ("unet", "text_encoder"):
        assert hash_path(tmp_path / "a" / sub) == hash_path(tmp_path / "b" / sub), sub


def test_text_pretraining_learns_the_true_prompts_then_leaves_the_captions_to_the_unet(data, tmp_path: Path):
    """text_pretrain_steps: the text encoder trains on the true prompts only, so planted captions
    change the UNet and not the text encoder; the switch survives a kill and resume."""
    from medrl.io import hash_path

    planted = data["items"].assign(caption=[p.replace(" with hair", "") for p in data["items"]["prompt"]])
    extract_latents(data["stack"], planted, tmp_path / "lat", size=SIZE, mode="RGB", text_col="caption",
                    prompt_col="prompt", batch_size=8)
    assert load_latents(tmp_path / "lat")[1]["prompt"].tolist() == data["items"]["prompt"].tolist()
    kw = dict(steps=6, batch_size=4, lr=1e-3, cond_dropout=0.5, checkpoint_every=2, seed=1, train_text_encoder=True)
    finetune_base(data["stack"], tmp_path / "lat", tmp_path / "p", ckpt_dir=tmp_path / "cp", text_pretrain_steps=3, **kw)
    finetune_base(data["stack"], data["latents"], tmp_path / "t", ckpt_dir=tmp_path / "ct", text_pretrain_steps=3, **kw)
    finetune_base(data["stack"], tmp_path / "lat", tmp_path / "all", ckpt_dir=tmp_path / "ca", **kw)
    text = {run: hash_path(tmp_path / run / "text_encoder") for run in ("p", "t", "all")}
    assert text["p"] == text["t"] != hash_path(data["stack"] / "text_encoder")  # the captions never reached it
    assert text["all"] != text["p"]  # trained on the captions throughout: another encoder
    assert hash_path(tmp_path / "p" / "unet") != hash_path(tmp_path / "t" / "unet")  # the UNet saw the captions

    def kill(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # resumes from step 4, after the switch
        finetune_base(data["stack"], tmp_path / "lat", tmp_path / "k", ckpt_dir=tmp_path / "ck",
                      text_pretrain_steps=3, callback=kill, **kw)
    finetune_base(data["stack"], tmp_path / "lat", tmp_path / "k", ckpt_dir=tmp_path / "ck", text_pretrain_steps=3, **kw)
    for sub in ("unet", "text_encoder"):
        assert hash_path(tmp_path / "k" / sub) == hash_path(tmp_path / "p" / sub), sub
    for bad in (dict(kw, train_text_encoder=False), dict(kw, steps=3)):
        with pytest.raises(DataError, match="text_pretrain_steps=3"):
            finetune_base(data["stack"], tmp_path / "lat", tmp_path / "x", ckpt_dir=tmp_path / "cx",
                          text_pretrain_steps=3, **bad)


def test_finetune_resume_after_kill_matches_uninterrupted(data, tmp_path: Path):
    kw = dict(steps=6, batch_size=4, lr=1e-3, cond_dropout=0.5, checkpoint_every=2, seed=1)
    finetune_base(data["stack"], data["latents"], tmp_path / "a", ckpt_dir=tmp_path / "ca", **kw)

    def kill(step: int, loss: float) -> None:
        if step == 5:  # after the step-4 checkpoint, mid-interval
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        finetune_base(data["stack"], data["latents"], tmp_path / "b", ckpt_dir=tmp_path / "cb", callback=kill, **kw)
    assert (tmp_path / "cb" / "latest" / "state.json").is_file() and not (tmp_path / "b" / "unet").exists()
    m = finetune_base(data["stack"], data["latents"], tmp_path / "b", ckpt_dir=tmp_path / "cb", **kw)
    assert m["finetune_resumed_from"] == 4
    ua, ub = load_components(str(tmp_path / "a")).unet, load_components(str(tmp_path / "b")).unet
    for (k, va), vb in zip(ua.state_dict().items(), ub.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=k)
    la, lb = pd.read_csv(tmp_path / "a" / "loss.csv"), pd.read_csv(tmp_path / "b" / "loss.csv")
    np.testing.assert_allclose(la["loss"], lb["loss"], rtol=1e-6)

    # a checkpoint from other settings is not resumed
    with pytest.raises(KeyboardInterrupt):
        finetune_base(data["stack"], data["latents"], tmp_path / "c", ckpt_dir=tmp_path / "cc", callback=kill, **kw)
    with pytest.warns(UserWarning, match="different settings"):
        m = finetune_base(data["stack"], data["latents"], tmp_path / "c", ckpt_dir=tmp_path / "cc", **{**kw, "lr": 2e-3})
    assert m["finetune_resumed_from"] == 0


def test_finetune_with_unet_weights_skips_training(data, tmp_path: Path):
    c = load_components(str(data["stack"]))
    sd = {k: v + 0.5 for k, v in c.unet.state_dict().items()}
    save_file(sd, str(tmp_path / "pretrained_unet.safetensors"))
    m = finetune_base(data["stack"], data["latents"], tmp_path / "out", steps=100, batch_size=4, lr=1e-3,
                      cond_dropout=0.1, checkpoint_every=10, seed=0, ckpt_dir=tmp_path / "ckpt",
                      unet_weights=str(tmp_path / "pretrained_unet.safetensors"))
    assert m["finetune_steps"] == 0.0
    for k, v in load_components(str(tmp_path / "out")).unet.state_dict().items():
        assert torch.equal(v, sd[k]), k
    load_latents(data["latents"], expect_vae=tmp_path / "out")


def test_the_one_lr_schedule_of_the_step_based_trainers():
    """vae_train: warm-up then cosine to lr/10; finetune: warm-up then constant; both from warmup_lr."""
    from medrl.lr_schedule import cosine_lr, default_warmup, warmup_lr

    steps, lr = 800, 1e-3
    w = default_warmup(steps)
    assert w == 40 and default_warmup(10) == 1 and default_warmup(10_000) == 100
    vae = [warmup_lr(lr, s, steps, warmup=w, floor=0.1) for s in range(steps)]
    assert vae[0] == pytest.approx(lr / w) and vae[w] == pytest.approx(lr) and vae[-1] == pytest.approx(0.1 * lr, rel=1e-3)
    assert all(a >= b for a, b in zip(vae[w:], vae[w + 1:]))  # decays monotonically after the warm-up
    const = [warmup_lr(lr, s, steps, warmup=w, decay="constant") for s in range(steps)]
    assert const[w - 1:] == [lr] * (steps - w + 1) and const[0] == pytest.approx(lr / w)
    assert cosine_lr(lr, steps, steps) == pytest.approx(0.0) and cosine_lr(lr, 0, steps, warmup=4) == lr / 4
