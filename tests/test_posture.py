"""Posture aligner: affine algebra, warp direction, self-supervised recovery of known warps."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from medrl.io import save_image
from medrl.models import posture
from medrl.models.posture import (
    AlignerConfig,
    PostureAligner,
    aligning_psi,
    compose_theta,
    invert_theta,
    load_aligner,
    predict_psi,
    psi_to_theta,
    theta_to_psi,
    train_posture_aligner,
    warp,
    warp_theta,
)

IDENTITY = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])


def _grid(s: int):
    return torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")


def chest_like(s: int) -> torch.Tensor:
    """A smooth, asymmetric 'chest' (body, lungs, spine, heart on the image's right), (1, 1, s, s).

    It fades to ~0 well inside the frame, so the zero padding of a warp that zooms out
    matches the canonical there and the L2 optimum is the true aligning psi (with content
    at the border, zoom-out is penalised and scale estimates are biased towards zoom-in)."""
    yy, xx = _grid(s)

    def blob(cx, cy, rx, ry):
        return torch.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))

    img = 0.9 * blob(0, 0, 0.6, 0.62) - 0.55 * blob(-0.27, -0.1, 0.16, 0.34) - 0.45 * blob(0.29, -0.06, 0.17, 0.32)
    img = img + 0.45 * blob(0.12, 0.3, 0.18, 0.14) + 0.35 * blob(0.0, 0.0, 0.07, 0.55)  # heart, spine
    return img.clamp(0, 1)[None, None]


def random_psi(n: int, g: torch.Generator, spread: float = 1.0) -> torch.Tensor:
    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=g)

    return torch.stack([1 + spread * u(-0.15, 0.15), 1 + spread * u(-0.15, 0.15), spread * u(-0.12, 0.12),
                        spread * u(-0.12, 0.12), spread * u(-0.2, 0.2)], -1)


def test_psi_to_theta_matches_rotation_times_scale_and_round_trips():
    psi = torch.tensor([[1.2, 0.8, 0.1, -0.2, 0.3]])
    c, s = math.cos(0.3), math.sin(0.3)
    expected = torch.tensor([[c, -s], [s, c]]) @ torch.diag(torch.tensor([1.2, 0.8]))
    theta = psi_to_theta(psi)[0]
    assert torch.allclose(theta[:, :2], expected, atol=1e-6)
    assert torch.allclose(theta[:, 2], torch.tensor([0.1, -0.2]))
    assert torch.allclose(psi_to_theta(IDENTITY), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    g = torch.Generator().manual_seed(0)
    many = random_psi(100, g, spread=3.0)
    assert torch.allclose(theta_to_psi(psi_to_theta(many)), many, atol=1e-5)


def test_warp_direction_pulls_input_at_A_p_plus_t():
    """warp(x, psi)(p) = x(A p + t): translating by tx = +0.5 moves content LEFT by 0.5."""
    s = 64
    yy, xx = _grid(s)
    img = torch.exp(-((xx**2 + yy**2) / 0.02))[None, None]
    out = warp(img, torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]))
    cx = float((out[0, 0] * xx).sum() / out[0, 0].sum())
    assert cx == pytest.approx(-0.5, abs=0.03)
    # sx = 2 samples twice as far out: the blob shrinks to half its width (zoom out)
    img2 = torch.exp(-((xx**2) / 0.1 + (yy**2) / 0.1))[None, None]
    small = warp(img2, torch.tensor([2.0, 2.0, 0.0, 0.0, 0.0]))
    w_in = float((img2[0, 0] * xx**2).sum() / img2[0, 0].sum())
    w_out = float((small[0, 0] * xx**2).sum() / small[0, 0].sum())
    assert w_out == pytest.approx(w_in / 4, rel=0.1)


def test_warp_then_inverse_returns_image_in_interior():
    s = 128  # fine enough that two bilinear resamplings of the thin 'spine' stay accurate
    img = chest_like(s).expand(6, -1, -1, -1)
    g = torch.Generator().manual_seed(1)
    psi = random_psi(6, g)
    th = psi_to_theta(psi)
    back = warp_theta(warp_theta(img, th), invert_theta(th))
    inner = slice(24, -24)
    assert (back - img)[..., inner, inner].abs().max() < 0.03
    # isotropic scale: the inverse is a psi too, and aligning_psi finds it exactly
    psi_iso = psi.clone()
    psi_iso[:, 1] = psi_iso[:, 0]
    back2 = warp(warp(img, psi_iso), aligning_psi(psi_iso))
    assert (back2 - img)[..., inner, inner].abs().max() < 0.03
    assert torch.allclose(psi_to_theta(aligning_psi(psi_iso)), invert_theta(psi_to_theta(psi_iso)), atol=1e-5)


def test_compose_theta_matches_sequential_warps():
    s = 128  # fine enough that two bilinear resamplings of the thin 'spine' stay accurate
    img = chest_like(s)
    a = torch.tensor([[1.1, 0.9, 0.05, -0.1, 0.2]])
    b = torch.tensor([[0.95, 1.05, -0.08, 0.04, -0.15]])
    seq = warp(warp(img, a), b)
    once = warp_theta(img, compose_theta(psi_to_theta(a), psi_to_theta(b)))
    assert (seq - once)[..., 24:-24, 24:-24].abs().max() < 0.03


def test_untrained_aligner_predicts_identity():
    torch.manual_seed(0)
    m = PostureAligner(AlignerConfig(size=32))
    psi = predict_psi(m, torch.rand(4, 3, 48, 48))
    assert psi.shape == (4, 5)
    assert torch.allclose(psi, IDENTITY.expand(4, -1), atol=0.02)


def _write_warped_pairs(tmp_path, n_train: int, n_test: int, size: int, seed: int):
    """Images = canonical warped by known posture psi (the phantom convention)."""
    can = chest_like(size)
    g = torch.Generator().manual_seed(seed)
    psi = random_psi(n_train + n_test, g)
    imgs = warp(can.expand(len(psi), -1, -1, -1), psi)
    rows = []
    for i in range(len(psi)):
        p = tmp_path / "images" / f"{i:04d}.png"
        save_image(imgs[i], p)
        rows.append({"image": f"{i:04d}", "path": str(p), "split": "train" if i < n_train else "test",
                     **{f"gt_{n}": float(psi[i, j]) for j, n in enumerate(posture.PSI_NAMES)}})
    return pd.DataFrame(rows), can[0]


def test_aligner_recovers_known_warps(tmp_path):
    size = 32
    pairs, can = _write_warped_pairs(tmp_path, n_train=320, n_test=64, size=size, seed=3)
    out = tmp_path / "aligner"
    m = train_posture_aligner(pairs, can, out, size=size, epochs=6, batch_size=16, lr=1e-3, seed=0,
                              ckpt_dir=tmp_path / "ckpt")
    for n in posture.PSI_NAMES:
        # error well below the spread of the aligning psi around the identity
        assert m[f"psi_mae_{n}"] < 0.5 * m[f"psi_mae_identity_{n}"], (n, m)
    assert m["test_l2_after"] < 0.5 * m["test_l2_before"]
    assert m["test_r_align_pred"] < -0.05  # the test images are misaligned: reward sees it
    assert (out / "model.safetensors").is_file() and not (tmp_path / "ckpt" / "posture").exists()
    saved = json.loads((out / "eval.json").read_text())
    assert saved["psi_columns"] == [f"gt_{n}" for n in posture.PSI_NAMES]
    # the loaded model predicts what the metrics were computed from
    test = pairs[pairs.split == "test"]
    from medrl.models.posture import images_from_pairs

    x = images_from_pairs(test, size).float() / 255
    psi = predict_psi(load_aligner(out), x)
    target = aligning_psi(torch.tensor(test[[f"gt_{n}" for n in posture.PSI_NAMES]].to_numpy(np.float32)))
    assert float((psi[:, 2] - target[:, 2]).abs().mean()) == pytest.approx(m["psi_mae_tx"], rel=1e-4)


def test_training_resumes_from_epoch_checkpoint(tmp_path, monkeypatch):
    pairs, can = _write_warped_pairs(tmp_path, n_train=32, n_test=8, size=32, seed=4)
    ckpt = tmp_path / "ckpt"

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(posture, "_evaluate", boom)
    with pytest.raises(RuntimeError):
        train_posture_aligner(pairs, can, tmp_path / "a", size=32, epochs=1, batch_size=16, lr=1e-3, seed=0, ckpt_dir=ckpt)
    state = json.loads((ckpt / "posture" / "latest" / "state.json").read_text())["meta"]
    assert state["epoch"] == 1
    monkeypatch.undo()
    train_posture_aligner(pairs, can, tmp_path / "a", size=32, epochs=2, batch_size=16, lr=1e-3, seed=0, ckpt_dir=ckpt)
    hist = json.loads((tmp_path / "a" / "eval.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[0]["train_loss"] == pytest.approx(state["history"][0]["train_loss"])


def test_bad_canonical_is_a_data_error(tmp_path):
    from medrl.errors import DataError

    pairs, _ = _write_warped_pairs(tmp_path, n_train=4, n_test=0, size=16, seed=0)
    with pytest.raises(DataError, match="canonical"):
        train_posture_aligner(pairs, torch.zeros(3, 16, 16), tmp_path / "o", size=16, epochs=1, batch_size=4,
                              lr=1e-3, seed=0, ckpt_dir=tmp_path / "c")


def test_convention_matches_the_phantom_generator():
    """observed = warp(canonical, psi_true) (phantoms/cxr.py) and the aligning psi undoes it."""
    from medrl.data.phantoms import cxr as ph

    size = 64

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b)[..., 12:-12, 12:-12].abs().mean())

    for i, view in enumerate(["PA", "AP", "AP", "PA"]):
        case = ph.sample_case(7, i, view)
        psi = torch.tensor(ph.sample_psi(7, i, view), dtype=torch.float32)
        observed, canonical = ph.render_cxr(case, psi.tolist(), size, 7, i)
        obs = torch.from_numpy(observed.astype(np.float32) / 255)[None, None]
        can = torch.from_numpy(canonical)[None, None]
        assert torch.allclose(ph.psi_to_theta(psi.double()).float(), psi_to_theta(psi), atol=1e-6)
        unaligned = err(obs, can)  # 0.06-0.12 for these postures
        # the generator warps at 2x supersampling and adds detector noise: residuals ~0.01
        assert err(warp(can, psi), obs) < 0.25 * unaligned
        assert err(warp_theta(obs, invert_theta(psi_to_theta(psi))[None]), can) < 0.25 * unaligned
        # the closest psi to that inverse aligns almost as well (the dropped shear is 2nd order)
        assert err(warp(obs, aligning_psi(psi)), can) < 0.25 * unaligned


def test_aligner_width_is_a_narrower_resnet18_that_round_trips(tmp_path):
    """The independent posture evaluator (classifiers.cxr_eval.posture_width) is a ResNet-18 of
    another width; width 64 is torchvision's ResNet-18 itself."""
    from medrl.models.posture import AlignerConfig, PostureAligner, load_aligner, save_aligner

    wide, narrow = PostureAligner(AlignerConfig(size=32)), PostureAligner(AlignerConfig(size=32, width=16))
    assert wide.net.layer4[0].conv1.out_channels == 512 and narrow.net.layer4[0].conv1.out_channels == 128
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters()) / 10
    x = torch.rand(2, 1, 32, 32)
    psi = narrow.eval()(x)
    assert psi.shape == (2, 5) and torch.allclose(psi, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]]).expand(2, -1), atol=1e-2)
    save_aligner(narrow, tmp_path / "a")
    assert torch.allclose(load_aligner(tmp_path / "a")(x), psi)
