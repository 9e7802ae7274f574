"""N images per prompt with fixed per-image seeds, from a base stack or base + RL adapter.

Image j of prompt i starts from noise seeded by (seed, i, j) alone and draws its per-step noise
from that same per-image generator, so an image does not depend on the batch it was made in,
and the SD (base) and RL (base + adapter) samples of one prompt/seed share their initial noise:
differences between them are the fine-tuning's doing.
"""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import pandas as pd
import torch

from medrl.errors import DataError
from medrl.io import save_image, write_table
from medrl.progress import progress

MANIFEST_COLUMNS = ["prompt_id", "prompt", "seed", "model", "path"]


def slugify(prompt: str, max_len: int = 80) -> str:
    """Filesystem-safe, readable, collision-resistant folder name for a prompt.

    Lower-case alphanumerics joined by '_', cut to ``max_len``, plus 8 hex chars of the prompt's
    sha1 so prompts that differ only in punctuation or beyond the cut stay apart."""
    base = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:max_len].rstrip("_") or "prompt"
    return f"{base}_{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """Seed of image j of prompt i: a hash of (seed, i, j), independent of batching."""
    from medrl.diffusion.sampler import derive_seed

    return derive_seed(seed, prompt_index, image_index)


_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def generate(
    base_dir: Path,
    out_dir: Path,
    *,
    prompts: list[str],
    n_per_prompt: int,
    seed: int,
    adapter_dir: Path | None = None,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    batch_size: int = 32,
    device: str = "cpu",
    prompt_ids: list[str] | None = None,
) -> dict[str, float]:
    """Write ``out_dir/<prompt_id or slug>/<j>.png`` and ``out_dir/manifest.csv``.

    manifest columns: prompt_id, prompt, seed (the image's own seed), model ("<base_dir>" or
    "<base_dir>+<adapter_dir>"), path (relative to ``out_dir``). With ``adapter_dir`` the LoRA (or
    full fine-tuned UNet), the ACE tokens and the text-encoder LoRA saved by
    ``medrl.diffusion.lora.save_adapter`` are applied.
    """
    from medrl.diffusion.stack import encode_prompts, load_components
    from medrl.diffusion.lora import load_adapter
    from medrl.diffusion.sampler import Noise, Sampler

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not prompts:
        raise DataError("generate: prompts is empty; expected at least one prompt")
    if n_per_prompt < 1 or batch_size < 1:
        raise DataError(f"generate: n_per_prompt={n_per_prompt}, batch_size={batch_size}; expected >= 1")
    if prompt_ids is None:
        prompt_ids = [slugify(p) for p in prompts]
    if len(prompt_ids) != len(prompts):
        raise DataError(f"generate: {len(prompt_ids)} prompt_ids for {len(prompts)} prompts; expected one per prompt")
    bad = [p for p in prompt_ids if not _SAFE_ID.match(str(p))]
    if bad:
        raise DataError(f"generate: prompt_ids {bad[:3]} are not safe folder names; expected [A-Za-z0-9._-]+")
    if len(set(prompt_ids)) != len(prompt_ids):
        raise DataError("generate: prompt_ids are not unique; expected one folder per prompt")

    c = load_components(str(base_dir), device=device)
    with torch.no_grad():  # "" is the base text encoder's, also under a text LoRA (as in training)
        negative = encode_prompts(c, [""]).float()
    ace = load_adapter(c.unet, adapter_dir, text_encoder=c.text_encoder) if adapter_dir is not None else None
    model_name = str(base_dir) if adapter_dir is None else f"{base_dir}+{adapter_dir}"

    # Flat job list (prompt index, image index), cut into batches regardless of prompt borders.
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n_per_prompt)]
    rows = []
    t0 = time.time()
    with torch.no_grad():
        # inference only, so LoRA runs merged into the base weights (faster; latents differ ~1e-5)
        sampler = Sampler(c.unet, c.vae, c.scheduler, negative, num_steps=num_steps,
                          guidance_scale=guidance_scale, eta=eta, merge_lora=True)
        for start in progress(range(0, len(jobs), batch_size), desc="generate", total=-(-len(jobs) // batch_size)):
            batch = jobs[start : start + batch_size]
            seeds = [image_seed(seed, i, j) for i, j in batch]
            text = encode_prompts(c, [prompts[i] for i, _ in batch]).float()
            cond = ace(text) if ace is not None else text
            # One generator per image: x_T first, then every step's noise.
            images = sampler.sample(cond, Noise(seeds)).images
            for (i, j), s, img in zip(batch, seeds, images.cpu()):
                rel = f"{prompt_ids[i]}/{j}.png"
                save_image(img, out_dir / rel)
                rows.append({"prompt_id": prompt_ids[i], "prompt": prompts[i], "seed": s, "model": model_name, "path": rel})
    dt = time.time() - t0
    write_table(pd.DataFrame(rows, columns=MANIFEST_COLUMNS), out_dir / "manifest.csv")
    return {
        "n_images": float(len(rows)),
        "n_prompts": float(len(prompts)),
        "seconds": dt,
        "images_per_s": len(rows) / max(dt, 1e-9),
        "with_adapter": float(adapter_dir is not None),
        "with_ace": float(ace is not None),
    }
