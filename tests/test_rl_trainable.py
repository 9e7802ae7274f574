"""Issue 17 item 9: RL trains only the LoRA / ACE parameters.

After train_ddpo the base UNet (and text encoder) weights are unchanged, the optimizer holds
exactly the adapter and ACE tensors (nothing of the base), and the saved adapter holds only
adapter keys. With ``text_lora_rank`` the text encoder's LoRA is part of the adapter."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_trainer import brightness, build_stack, prompt_fn, small_cfg

pytestmark = pytest.mark.timeout(600)


def _is_adapter(name: str) -> bool:
    return "lora_" in name or name.startswith("ace.")


@pytest.mark.parametrize("text_lora_rank", [0, 2])
def test_rl_trains_only_lora_and_ace(tmp_path, monkeypatch, text_lora_rank):
    import medrl.rl.trainer as T
    from medrl.diffusion.ace import ACE_FILE
    from medrl.diffusion.lora import LORA_FILE, TEXT_FILE

    seen: dict = {}

    class RecordingPolicy(T.Policy):
        def __init__(self, unet, ace, text_encoder=None):
            super().__init__(unet, ace, text_encoder)
            seen["policy"] = self
            seen["before"] = {n: p.detach().clone() for n, p in self.named_parameters()}

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, *a, **kw):
            super().__init__(params, *a, **kw)
            seen["optimizer"] = self

    monkeypatch.setattr(T, "Policy", RecordingPolicy)
    monkeypatch.setattr(T.torch.optim, "AdamW", RecordingAdamW)
    stack = build_stack(tmp_path / "stack")
    cfg = small_cfg(epochs=2, lr=3e-2, use_ace=True, ace_tokens=2, checkpoint_every=10, text_lora_rank=text_lora_rank)
    T.train_ddpo(stack, tmp_path / "out", reward_fn=brightness, prompt_fn=prompt_fn, cfg=cfg,
                 ckpt_dir=tmp_path / "ckpt", log_fn=lambda m, s: None)

    policy, before = seen["policy"], seen["before"]
    named = dict(policy.named_parameters())
    adapter = {n for n in named if _is_adapter(n)}
    assert any(n.startswith("ace.") for n in adapter) and any("lora_" in n for n in adapter)
    text_lora = {n for n in adapter if n.startswith("text_encoder.")}
    assert bool(text_lora) == bool(text_lora_rank)
    # the optimizer holds exactly the adapter + ACE tensors
    by_id = {id(p): n for n, p in named.items()}
    in_optim = {by_id[id(p)] for g in seen["optimizer"].param_groups for p in g["params"]}
    assert in_optim == adapter, f"not adapter: {sorted(in_optim - adapter)[:5]}; missing: {sorted(adapter - in_optim)[:5]}"
    # base weights bit-identical after training; the adapter did train
    changed_base = [n for n, p in named.items() if n not in adapter and not torch.equal(p.detach(), before[n])]
    assert not changed_base, changed_base[:5]
    assert not any(named[n].requires_grad for n in named if n not in adapter)
    assert any(not torch.equal(named[n].detach(), before[n]) for n in adapter if "lora_B" in n)
    assert not torch.equal(named["ace.embeddings"].detach(), before["ace.embeddings"])
    # the saved adapter holds only adapter keys (and all of them), ACE separately
    saved = load_file(str(tmp_path / "out" / "adapter" / LORA_FILE))
    assert saved and all("lora_" in k for k in saved), [k for k in saved if "lora_" not in k][:5]
    assert len(saved) == len([n for n in adapter if "lora_" in n and n not in text_lora])
    if text_lora_rank:
        assert any(not torch.equal(named[n].detach(), before[n]) for n in text_lora if "lora_B" in n)
        assert {f"text_encoder.{k}" for k in load_file(str(tmp_path / "out" / "adapter" / TEXT_FILE))} == text_lora
    else:
        assert not (tmp_path / "out" / "adapter" / TEXT_FILE).exists()
    assert set(load_file(str(tmp_path / "out" / "adapter" / ACE_FILE))) == {"embeddings"}
    assert not (tmp_path / "out" / "adapter" / "unet.safetensors").exists()
