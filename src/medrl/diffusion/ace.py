"""Adaptive Condition Embeddings (CXRL, sec. 2.2 II): learned tokens prepended to the report.

c = [c_s, c_p] with c_s (N x d) learnable and c_p = tau(y) (M x d) from the frozen text encoder.
Applied to the conditional CFG branch only; the unconditional branch is padded and masked
(see ``medrl.diffusion.rollout.pad_uncond``), so ACE changes what the report means to the UNet, not
what "no report" means.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medrl.errors import DataError
from medrl.io import atomic_path

ACE_FILE = "ace.safetensors"


class ACE(nn.Module):
    """N learnable condition embeddings of width ``dim``.

    Init: N(0, init_std^2) from its own seeded generator (prompt tuning, Lester et al.), or a
    given (N, dim) / (dim,) tensor, e.g. the mean text-encoder token embedding, so training
    starts from in-distribution tokens.
    """

    def __init__(
        self,
        n_tokens: int,
        dim: int,
        *,
        seed: int = 0,
        init_std: float = 0.02,
        init: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if n_tokens < 1 or dim < 1:
            raise ValueError(f"ACE n_tokens={n_tokens}, dim={dim}; expected >= 1")
        self.n_tokens = int(n_tokens)
        self.dim = int(dim)
        if init is not None:
            init = torch.as_tensor(init, dtype=torch.float32)
            if init.shape == (dim,):
                init = init.expand(n_tokens, dim)
            if init.shape != (n_tokens, dim):
                raise ValueError(f"ACE init shape {tuple(init.shape)}; expected ({n_tokens}, {dim}) or ({dim},)")
            weight = init.clone()
        else:
            g = torch.Generator().manual_seed(seed)
            weight = torch.randn(n_tokens, dim, generator=g) * init_std
        self.embeddings = nn.Parameter(weight.contiguous())

    def forward(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, N + L, D)."""
        if text_embeds.ndim != 3 or text_embeds.shape[-1] != self.dim:
            raise ValueError(f"ACE expects (B, L, {self.dim}) text embeddings, got {tuple(text_embeds.shape)}")
        ace = self.embeddings.to(text_embeds.dtype).unsqueeze(0).expand(text_embeds.shape[0], -1, -1)
        return torch.cat([ace, text_embeds], dim=1)

    def save(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / ACE_FILE
        with atomic_path(path) as tmp:
            save_file({"embeddings": self.embeddings.detach().float().cpu().contiguous()}, str(tmp))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ACE:
        path = Path(path)
        try:
            sd = load_file(str(path))
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"{path}: cannot read ACE weights ({e}); expected a safetensors file with key 'embeddings'") from None
        if "embeddings" not in sd or sd["embeddings"].ndim != 2:
            raise DataError(f"{path}: expected key 'embeddings' of shape (N, D), found {list(sd)}")
        emb = sd["embeddings"]
        return cls(emb.shape[0], emb.shape[1], init=emb)
