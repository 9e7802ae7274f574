"""Latent store: the VAE latents of a track's images, computed once and content-hashed.

Layout of ``out_dir``:
- ``latents.safetensors``: key ``latents``, (N, 4, h, w) float32, already multiplied by
  ``vae.config.scaling_factor`` (so they are what the UNet sees).
- ``index.csv``: ``image,text,split,finetune,prompt`` in the same row order (text = the caption
  or impression the base model is fine-tuned on; finetune 0 = left out of that fine-tune;
  prompt = the image's true prompt, which differs from text where captions were planted).
- ``manifest.json``: sha256 of the latents file, of the stack's ``vae/`` directory and of
  the items table, plus shape / size / mode, so readers can check that they are reading
  latents of the VAE they expect (``load_latents(dir, expect_vae=stack_dir)``).

Encoding uses the posterior *mean*, not a sample. The trained KL-VAE's posterior std is
tiny (kl_weight 1e-6), so a sample differs from the mean by noise the diffusion model
would only have to learn as data; the mean makes the store a deterministic function of
(VAE, images), which is what content hashing and re-runs need. (diffusers' SD training
script samples instead; the difference is within that posterior noise.)
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pandas as pd
import torch

from medrl.errors import DataError
from medrl.io import atomic_path, hash_file, hash_path, load_image, read_json, read_table, write_json, write_table
from medrl.progress import progress

INDEX_COLUMNS = ["image", "text", "split", "finetune", "prompt"]


def table_digest(df: pd.DataFrame) -> str:
    """sha256 of a table's canonical CSV text (independent of where it was read from)."""
    return hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()


def _vae_dir(stack_or_vae: Path) -> Path:
    p = Path(stack_or_vae)
    if (p / "vae").is_dir():
        return p / "vae"
    if (p / "config.json").is_file():  # already a vae/ directory
        return p
    raise DataError(f"{p}: no vae/ directory; expected a model stack directory (SD v1.5 layout)")


def _read_items(items: pd.DataFrame | Path, required: list[str]) -> pd.DataFrame:
    """The items table (a DataFrame or a CSV path), checked for ``required`` columns and rows."""
    if isinstance(items, (str, Path)):
        where = str(items)
        read_table(items, required=required)
        # Re-read the key columns as strings: ids like "0001" must not become integers.
        df = pd.read_csv(items, dtype={c: str for c in required})
    else:
        df, where = items, "items table"
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise DataError(f"{where}: missing columns {missing}; expected at least {required}")
    if len(df) == 0:
        raise DataError(f"{where}: no rows; expected at least one image")
    return df


@torch.no_grad()
def extract_latents(
    stack_dir: Path,
    items: pd.DataFrame | Path,
    out_dir: Path,
    *,
    size: int,
    mode: str,
    text_col: str,
    prompt_col: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict:
    """Encode every row's image (column ``path``) with the stack's VAE into ``out_dir``.

    ``mode`` "RGB" or "L" (grayscale, repeated to 3 channels for the VAE). ``text_col`` holds
    the fine-tune text, ``prompt_col`` the true prompt (None: the same column)."""
    from safetensors.torch import save_file

    from medrl.diffusion.stack import load_vae

    if mode not in ("RGB", "L"):
        raise DataError(f"image mode {mode!r}: expected 'RGB' or 'L'")
    prompt_col = prompt_col or text_col
    df = _read_items(items, list(dict.fromkeys(["image", "path", "split", text_col, prompt_col])))
    stack_dir, out_dir = Path(stack_dir), Path(out_dir)
    vae_dir = _vae_dir(stack_dir)
    vae = load_vae(str(stack_dir), device=device)
    sf = float(vae.config.scaling_factor)

    t0 = time.perf_counter()
    paths = df["path"].astype(str).tolist()
    chunks = []
    for i in progress(range(0, len(paths), batch_size), desc="extract latents", total=-(-len(paths) // batch_size)):
        imgs = [load_image(p, size=size, mode=mode) for p in paths[i:i + batch_size]]
        x = torch.stack([im.expand(3, -1, -1) if mode == "L" else im for im in imgs]) * 2.0 - 1.0
        z = vae.encode(x.to(device=device, dtype=vae.dtype)).latent_dist.mean * sf
        chunks.append(z.float().cpu())
    latents = torch.cat(chunks).contiguous()
    elapsed = time.perf_counter() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "latents.safetensors") as tmp:
        save_file({"latents": latents}, str(tmp))
    index = pd.DataFrame({
        "image": df["image"].astype(str).to_numpy(),
        "text": df[text_col].fillna("").astype(str).to_numpy(),
        "split": df["split"].astype(str).to_numpy(),
        # 0: the base model's fine-tune leaves the image out (a planted under-representation)
        "finetune": df["finetune"].astype(int).to_numpy() if "finetune" in df.columns else 1,
        "prompt": df[prompt_col].fillna("").astype(str).to_numpy(),
    })[INDEX_COLUMNS]
    write_table(index, out_dir / "index.csv")
    write_json(out_dir / "manifest.json", {
        "latents_sha256": hash_file(out_dir / "latents.safetensors"),
        "vae_sha256": hash_path(vae_dir),
        "items_sha256": table_digest(df),
        "index_sha256": hash_file(out_dir / "index.csv"),
        "shape": list(latents.shape),
        "scaling_factor": sf,
        "size": size,
        "mode": mode,
        "text_col": text_col,
        "prompt_col": prompt_col,
        "encoding": "posterior_mean",
    })
    return {
        "latents_n": float(len(latents)),
        "latents_mean": float(latents.mean()),
        "latents_std": float(latents.std()),
        "latents_seconds": elapsed,
        "latents_per_s": len(latents) / elapsed if elapsed > 0 else float("nan"),
    }


def load_latents(latents_dir: Path, expect_vae: Path | None = None) -> tuple[torch.Tensor, pd.DataFrame]:
    """(latents (N,4,h,w) float32, index DataFrame ``image,text,split,finetune,prompt``).

    Verifies the latents file against the manifest, and with ``expect_vae`` (a stack
    directory, or its vae/ directory) that they were encoded by exactly that VAE."""
    from safetensors.torch import load_file

    d = Path(latents_dir)
    for name in ("latents.safetensors", "index.csv", "manifest.json"):
        if not (d / name).is_file():
            raise DataError(f"{d / name}: not found; expected a latent store (latents.safetensors, index.csv, manifest.json)")
    manifest = read_json(d / "manifest.json")
    for key in ("latents_sha256", "vae_sha256"):
        if key not in manifest:
            raise DataError(f"{d / 'manifest.json'}: missing field '{key}'")
    actual = hash_file(d / "latents.safetensors")
    if actual != manifest["latents_sha256"]:
        raise DataError(f"{d / 'latents.safetensors'}: sha256 {actual[:12]} does not match manifest "
                        f"{manifest['latents_sha256'][:12]}; the file was modified or is corrupt")
    if expect_vae is not None:
        vae_dir = _vae_dir(Path(expect_vae))
        vh = hash_path(vae_dir)
        if vh != manifest["vae_sha256"]:
            raise DataError(f"{d}: latents were encoded by a VAE with sha256 {manifest['vae_sha256'][:12]}, "
                            f"but {vae_dir} has sha256 {vh[:12]}; expected latents of this stack's VAE "
                            "(re-run latent extraction)")
    tensors = load_file(str(d / "latents.safetensors"))
    if "latents" not in tensors:
        raise DataError(f"{d / 'latents.safetensors'}: no 'latents' tensor; found {sorted(tensors)}")
    latents = tensors["latents"]
    # All-string read: image ids like "0001" and empty prompts must round-trip unchanged.
    index = pd.read_csv(d / "index.csv", dtype=str, keep_default_na=False)
    # written before a column existed: every image used, captions true
    if list(index.columns) == INDEX_COLUMNS[:3]:
        index["finetune"] = "1"
    if list(index.columns) == INDEX_COLUMNS[:4]:
        index["prompt"] = index["text"]
    if list(index.columns) != INDEX_COLUMNS:
        raise DataError(f"{d / 'index.csv'}: columns {list(index.columns)}; expected {INDEX_COLUMNS}")
    if latents.ndim != 4 or latents.shape[0] != len(index):
        raise DataError(f"{d}: latents shape {tuple(latents.shape)} does not match {len(index)} index rows; "
                        "expected (N, C, h, w) with N = rows of index.csv")
    return latents, index


def add_vae_roundtrips(stack_dir: Path, items: pd.DataFrame, split: str, out_dir: Path, *, size: int,
                       mode: str = "RGB", device: str = "cpu", batch_size: int = 64) -> pd.DataFrame:
    """``items`` plus a copy of its ``split`` rows whose images are their round trips through the
    stack's VAE (encode, posterior mode, decode), written as PNGs to ``out_dir``. A judge trained on
    both recognises what a generator in this latent space can draw, not only sharp renders."""
    rows = items[items["split"] == split]
    from medrl.io import save_image
    from medrl.diffusion.stack import load_vae
    from medrl.diffusion.vae_train import load_images

    vae = load_vae(str(stack_dir), device=device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in rows["path"]]
    written: list[str] = []
    with torch.no_grad():
        for i in progress(range(0, len(paths), batch_size), desc="VAE round trips", total=-(-len(paths) // batch_size)):
            x = load_images(paths[i:i + batch_size], size, mode).to(device)
            rec = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mode()).sample.float().clamp(-1, 1)
            for j, img in enumerate(rec.cpu()):
                target = out_dir / f"{i + j:06d}.png"
                save_image((img + 1) / 2, target)
                written.append(str(target))
    return pd.concat([items, rows.assign(path=written)], ignore_index=True)
