"""PPO surrogate (clipping, gradients) and per-prompt advantage normalisation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medrl.rl.ppo import PerPromptStatTracker, ppo_loss

torch.set_num_threads(1)


def _grad(logp_val: float, adv: float, clip: float = 0.2, adv_max: float = 5.0):
    logp = torch.tensor([logp_val], requires_grad=True)
    loss, info = ppo_loss(logp, torch.tensor([0.0]), torch.tensor([adv]), clip, adv_max)
    loss.backward()
    return loss.item(), logp.grad.item(), info


def test_ppo_clipping_hand_computed():
    eps = 0.2
    # Inside the clip range: loss = -A * r, d/dlogp = -A * r.
    loss, g, info = _grad(np.log(1.1), 2.0, eps)
    assert loss == pytest.approx(-2.0 * 1.1) and g == pytest.approx(-2.0 * 1.1)
    assert info["clipfrac"].item() == 0.0
    # Positive advantage, ratio beyond 1+eps: the clipped term wins -> constant, zero gradient.
    loss, g, info = _grad(np.log(1.5), 2.0, eps)
    assert loss == pytest.approx(-2.0 * 1.2) and g == 0.0 and info["clipfrac"].item() == 1.0
    # Negative advantage, ratio below 1-eps: clipped -> zero gradient.
    loss, g, _ = _grad(np.log(0.5), -1.0, eps)
    assert loss == pytest.approx(1.0 * 0.8) and g == 0.0
    # Negative advantage, ratio above 1+eps: NOT clipped (pessimistic bound), gradient flows.
    loss, g, _ = _grad(np.log(1.5), -1.0, eps)
    assert loss == pytest.approx(1.5) and g == pytest.approx(1.5)
    # Positive advantage, ratio below 1-eps: not clipped either.
    loss, g, _ = _grad(np.log(0.5), 1.0, eps)
    assert loss == pytest.approx(-0.5) and g == pytest.approx(-0.5)
    # Advantage clipping at +-adv_clip_max.
    loss, g, _ = _grad(0.0, 100.0, eps, adv_max=5.0)
    assert loss == pytest.approx(-5.0) and g == pytest.approx(-5.0)


def test_ppo_info_values():
    logp = torch.tensor([0.1, -0.2, 0.0, 0.3])
    old = torch.zeros(4)
    loss, info = ppo_loss(logp, old, torch.ones(4), 0.15, 5.0)
    assert info["approx_kl"].item() == pytest.approx(0.5 * float((logp**2).mean()))
    assert info["clipfrac"].item() == pytest.approx(0.5)  # |r-1| > 0.15 for 0.3 and -0.2
    assert info["kl"].item() == pytest.approx(-float(logp.mean()))
    assert loss.item() == pytest.approx(-float(torch.minimum(logp.exp(), torch.tensor(1.15)).mean()))


def test_tracker_batch_fallback_then_per_prompt():
    tr = PerPromptStatTracker(buffer_size=4, min_count=4)
    prompts = ["a", "a", "b", "b"]
    r1 = np.array([1.0, 3.0, 10.0, 14.0])
    adv = tr.update(prompts, r1)
    # Fewer than min_count per prompt: batch statistics.
    np.testing.assert_allclose(adv, (r1 - r1.mean()) / (r1.std() + 1e-6))
    r2 = np.array([5.0, 7.0, 20.0, 30.0])
    adv = tr.update(prompts, r2)
    # Now 4 per prompt (buffer full): per-prompt stats over the buffer [r1, r2].
    a = np.array([1.0, 3.0, 5.0, 7.0])
    b = np.array([10.0, 14.0, 20.0, 30.0])
    np.testing.assert_allclose(adv[:2], (r2[:2] - a.mean()) / (a.std() + 1e-6))
    np.testing.assert_allclose(adv[2:], (r2[2:] - b.mean()) / (b.std() + 1e-6))


def test_tracker_per_prompt_mean0_std1():
    rng = np.random.default_rng(0)
    prompts = [p for p in ("x", "y", "z") for _ in range(8)]
    tr = PerPromptStatTracker(buffer_size=8, min_count=8)
    # Prompt-dependent offsets and scales: after normalisation each prompt is mean 0 / std 1.
    r = np.concatenate([rng.normal(0, 1, 8), rng.normal(50, 10, 8), rng.normal(-3, 0.1, 8)])
    adv = tr.update(prompts, r)
    for k in range(3):
        seg = adv[8 * k : 8 * k + 8]
        assert abs(seg.mean()) < 1e-9 and seg.std() == pytest.approx(1.0, abs=1e-4)
    # The buffer rolls: only the last buffer_size rewards count.
    r2 = rng.normal(100, 1, 24)
    adv2 = tr.update(prompts, r2)
    for k in range(3):
        seg = adv2[8 * k : 8 * k + 8]
        assert abs(seg.mean()) < 1e-9 and seg.std() == pytest.approx(1.0, abs=1e-4)


def test_tracker_state_roundtrip_json():
    tr = PerPromptStatTracker(3, 2)
    tr.update(["p", "q", "p"], np.array([0.1, 0.2, 1 / 3]))
    state = json.loads(json.dumps(tr.state_dict()))
    tr2 = PerPromptStatTracker(1, 1)
    tr2.load_state_dict(state)
    r = np.array([0.7, 0.9, 0.05])
    np.testing.assert_array_equal(tr.update(["p", "q", "q"], r), tr2.update(["p", "q", "q"], r))
    assert tr.stats() == tr2.stats()


def test_tracker_rejects_bad_shapes():
    tr = PerPromptStatTracker(4, 2)
    with pytest.raises(ValueError):
        tr.update(["a", "b"], np.zeros(3))
