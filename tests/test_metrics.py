"""Generic metrics: bootstrap CIs, FID/KID (torch-fidelity), MS-SSIM, LPIPS construction, AUROC."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medrl.errors import DataError
from medrl.metrics import auroc as A
from medrl.metrics import bootstrap as B
from medrl.metrics import fidelity as FD
from medrl.metrics import msssim as MS
from medrl.metrics import perceptual as PC

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- helpers


def _write_pngs(folder: Path, arrays: list[np.ndarray], sub: str = "p0") -> list[Path]:
    out = []
    for i, a in enumerate(arrays):
        p = folder / sub / f"{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(p)
        out.append(p)
    return out


def _blobs(rng: np.random.Generator, n: int, size: int, shift: float = 0.0) -> list[np.ndarray]:
    """Smooth random RGB images (a few Gaussian blobs) so that structure metrics mean something."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = []
    for _ in range(n):
        img = np.zeros((size, size, 3))
        for _ in range(3):
            cy, cx, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
            img += rng.uniform(60, 160, size=3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))[..., None]
        imgs.append(img + shift)
    return imgs


def _tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_percentile_ci_covers_true_mean_at_nominal_rate():
    rng = np.random.default_rng(123)
    hits = 0
    n_sim = 200
    for s in range(n_sim):
        x = rng.normal(loc=2.0, scale=1.5, size=60)
        m = B.bootstrap_ci(x, n_boot=500, ci=0.95, seed=s)
        assert m["lo"] <= m["value"] <= m["hi"]
        hits += m["lo"] <= 2.0 <= m["hi"]
    coverage = hits / n_sim
    assert 0.88 <= coverage <= 0.99, coverage


def test_bootstrap_generic_stat_uses_same_resamples_and_tuple_inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    fast = B.bootstrap_ci(x, n_boot=200, ci=0.9, seed=5, keep_boot=True)
    slow = B.bootstrap_ci((x,), lambda v: float(np.mean(v)), n_boot=200, ci=0.9, seed=5, keep_boot=True)
    np.testing.assert_allclose(fast["boot"], slow["boot"], rtol=1e-12)
    assert fast["boot_key"] == slow["boot_key"]
    # Two aligned arrays resampled together: the ratio statistic stays consistent.
    s, c = rng.uniform(1, 2, size=30), rng.integers(1, 4, size=30).astype(float)
    r = B.bootstrap_ci((s, c), lambda a, b: a.sum() / b.sum(), n_boot=300, ci=0.95, seed=1)
    assert r["lo"] < s.sum() / c.sum() < r["hi"] and r["n"] == 30
    with pytest.raises(DataError):
        B.bootstrap_ci((s, c[:-1]), lambda a, b: 0.0, n_boot=10, ci=0.95, seed=0)
    with pytest.raises(DataError):
        B.bootstrap_ci(np.array([1.0, np.nan]), n_boot=10, ci=0.95, seed=0)


def test_linear_combination_of_means_is_the_bootstrap_of_the_per_item_combination():
    rng = np.random.default_rng(2)
    a, b, c = rng.normal(size=(3, 60))
    items = [f"k{i}" for i in range(60)]
    ms = [B.bootstrap_ci(x, n_boot=300, ci=0.9, seed=5, keep_boot=True, items=items) for x in (a, b, c)]
    comb = B.linear_combination([(1.0, ms[0]), (10.0, ms[1]), (-2.0, ms[2])], keep_boot=True)
    direct = B.bootstrap_ci(a + 10 * b - 2 * c, n_boot=300, ci=0.9, seed=5, keep_boot=True, items=items)
    for k in ("value", "lo", "hi"):
        assert comb[k] == pytest.approx(direct[k])
    assert comb["boot_key"] == direct["boot_key"] and comb["n"] == 60
    # the combination can itself be differenced against another model's
    d = B.diff_from_boot(comb, ms[0])
    assert d["value"] == pytest.approx(10 * b.mean() - 2 * c.mean())
    shuffled = B.bootstrap_ci(b, n_boot=300, ci=0.9, seed=5, keep_boot=True, items=items[::-1])
    with pytest.raises(DataError, match="bootstrap keys differ"):
        B.linear_combination([(1.0, ms[0]), (1.0, shuffled)])
    with pytest.raises(DataError, match="no terms"):
        B.linear_combination([])


def test_paired_difference_from_replicates_matches_paired_bootstrap():
    rng = np.random.default_rng(1)
    base = rng.normal(size=80)
    a = base + 0.3 + 0.1 * rng.normal(size=80)  # strongly correlated with b
    b = base
    items = [f"k{i}" for i in range(80)]
    ma = B.bootstrap_ci(a, n_boot=400, ci=0.95, seed=3, keep_boot=True, items=items)
    mb = B.bootstrap_ci(b, n_boot=400, ci=0.95, seed=3, keep_boot=True, items=items)
    d = B.diff_from_boot(ma, mb)
    direct = B.paired_diff_ci(a, b, n_boot=400, ci=0.95, seed=3)
    assert d["value"] == pytest.approx(a.mean() - b.mean())
    assert d["lo"] == pytest.approx(direct["lo"]) and d["hi"] == pytest.approx(direct["hi"])
    # pairing removes the shared variation: far narrower than either marginal CI
    assert d["hi"] - d["lo"] < 0.3 * (ma["hi"] - ma["lo"])
    assert d["lo"] > 0
    other = B.bootstrap_ci(b, n_boot=400, ci=0.95, seed=4, keep_boot=True, items=items)
    with pytest.raises(DataError, match="bootstrap keys differ"):
        B.diff_from_boot(ma, other)
    with pytest.raises(DataError, match="replicates"):
        B.diff_from_boot(B.bootstrap_ci(a, n_boot=10, ci=0.95, seed=3), mb)
    with pytest.raises(DataError, match="missing keys"):
        B.check_metric({"value": 1.0}, where="x.json: fid")


# ----------------------------------------------------------------------------- FID / KID


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    real = _blobs(rng, 48, 32)
    paths = {
        "real": _write_pngs(root / "real", real),
        "same": _write_pngs(root / "same", real),
        "shift": _write_pngs(root / "shift", [a + 40 for a in real]),
        "shift2": _write_pngs(root / "shift2", [a + 80 for a in real]),
    }
    return root, paths


def test_fid_kid_registered_extractor_self_zero_and_shift_positive(image_sets):
    root, paths = image_sets
    spec = FD.ModuleExtractorSpec(module=_tiny_net(), name="random conv net (test)", input_size=32)
    kw = dict(extractor=spec, kid_subset_size=20, kid_subsets=20, n_boot=100, seed=0, verbose=False)
    same = FD.fid_kid(root / "real", root / "same", **kw)
    shift = FD.fid_kid(root / "real", root / "shift", **kw)
    shift2 = FD.fid_kid(root / "real", root / "shift2", **kw)
    # a random net has small features: compare to the shifted sets' scale, not to a constant
    assert abs(same["fid"]) < 1e-4 * shift["fid"]
    # KID draws independent random subsets of both sets: unbiased, ~0 but not exactly 0
    assert abs(same["kid_mean"]) < 0.05 * shift["kid_mean"]
    assert shift["fid"] > 0 and shift2["fid"] > 2 * shift["fid"]
    assert shift2["kid_mean"] > shift["kid_mean"] > 0
    assert same["n_real"] == same["n_fake"] == 48 and same["feature_dim"] == 16
    for r in (shift, shift2):
        m = r["fid_metric"]
        assert m["method"] == "basic" and 0.0 <= m["lo"] <= m["hi"] and len(m["boot"]) == 100
        assert r["kid_metric"]["lo"] <= r["kid_metric"]["hi"]
    # same file layout (p0/0000.png ...) -> same resampling -> pairable replicates
    assert shift["fid_metric"]["boot_key"] == shift2["fid_metric"]["boot_key"]
    d = B.diff_from_boot(shift2["fid_metric"], shift["fid_metric"])
    assert d["value"] > 0


def test_fid_kid_equals_torch_fidelity_calculate_metrics(image_sets):
    import torch_fidelity

    root, paths = image_sets
    spec = FD.ModuleExtractorSpec(module=_tiny_net(1), name="random conv net (test)", input_size=32)
    ours = FD.fid_kid(paths["real"], paths["shift"], extractor=spec, kid_subset_size=20, kid_subsets=10,
                      n_boot=20, seed=7, verbose=False)
    name, *_ = FD.resolve_extractor(spec, weights_path=None, feature_layer=None)
    ref = torch_fidelity.calculate_metrics(
        input1=FD.ImagePathsDataset(FD.list_images(paths["real"])),
        input2=FD.ImagePathsDataset(FD.list_images(paths["shift"])),
        feature_extractor=name, fid=True, kid=True, kid_subset_size=20, kid_subsets=10, rng_seed=7, cuda=False,
        cache=False, verbose=False, save_cpu_ram=True)
    assert ours["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-5)


def test_fid_and_kid_replicate_formulas_are_exact_without_resampling():
    from torch_fidelity.metric_kid import kernel_mmd

    rng = np.random.default_rng(2)
    fr = rng.normal(size=(30, 12)).astype(np.float32)
    ff = (rng.normal(size=(30, 12)) + 0.3).astype(np.float32)
    ones = np.ones((1, 30))
    assert FD.fid_replicates(fr, ff, ones, ones)[0] == pytest.approx(FD.fid_from_features(fr, ff), rel=1e-6)
    # unequal sizes, too (torch-fidelity's FID handles them)
    ff2 = ff[:17]
    assert FD.fid_replicates(fr, ff2, ones, np.ones((1, 17)))[0] == pytest.approx(FD.fid_from_features(fr, ff2),
                                                                                   rel=1e-6)
    ref = kernel_mmd(ff.astype(np.float64), fr.astype(np.float64))
    assert FD.kid_replicates(fr, ff, ones, ones)[0] == pytest.approx(ref, rel=1e-9)


def test_feature_cache_is_reused(image_sets, tmp_path):
    root, paths = image_sets
    spec = FD.ModuleExtractorSpec(module=_tiny_net(2), name="net", input_size=32)
    f1, _ = FD.extract_features(paths["real"][:8], spec, cache_dir=tmp_path, verbose=False)
    files = list(tmp_path.glob("features-*.safetensors"))
    assert len(files) == 1
    f2, _ = FD.extract_features(paths["real"][:8], spec, cache_dir=tmp_path, verbose=False)
    np.testing.assert_array_equal(f1, f2)
    # other weights -> other cache entry
    FD.extract_features(paths["real"][:8], FD.ModuleExtractorSpec(module=_tiny_net(3), name="net", input_size=32),
                        cache_dir=tmp_path, verbose=False)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2


def test_inception_needs_a_local_weights_file(image_sets, tmp_path):
    root, paths = image_sets
    with pytest.raises(DataError, match="Inception weights"):
        FD.fid_kid(paths["real"], paths["shift"], extractor="inception-v3-compat", weights_path=None)
    with pytest.raises(DataError, match="Inception weights"):
        FD.fid_kid(paths["real"], paths["shift"], extractor="inception-v3-compat", weights_path=tmp_path / "nope.pth")
    with pytest.raises(DataError, match="unknown"):
        FD.fid_kid(paths["real"], paths["shift"], extractor="clip-vit-b-32")


def test_inception_from_local_random_weights(image_sets, tmp_path, monkeypatch):
    """The real-run path with a random-weights file in torch-fidelity's format (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    # Build a state dict of the right layout without any download: construct with loading stubbed.
    monkeypatch.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.manual_seed(0)
    net = inc.FeatureExtractorInceptionV3("tmp", ["2048"])
    monkeypatch.undo()
    weights = tmp_path / "pt_inception_random.pth"
    torch.save(net.state_dict(), weights)
    root, paths = image_sets
    r = FD.fid_kid(paths["real"][:4], paths["shift"][:4], extractor="inception-v3-compat", weights_path=weights,
                   kid_subset_size=3, kid_subsets=5, n_boot=10, verbose=False, batch_size=4)
    assert r["feature_dim"] == 2048 and np.isfinite(r["fid"]) and r["kid_subset_size"] == 3
    assert "inception-v3-compat" in r["feature_extractor"]


def test_mixed_image_sizes_need_explicit_size(tmp_path):
    a = _write_pngs(tmp_path / "a", [np.zeros((16, 16, 3)), np.zeros((20, 20, 3))])
    with pytest.raises(DataError, match="different sizes"):
        FD.ImagePathsDataset(a)
    assert FD.ImagePathsDataset(a, size=16)[1].shape == (3, 16, 16)


# ----------------------------------------------------------------------------- MS-SSIM


@pytest.mark.parametrize("size,scales", [(32, 3), (64, 4)])
def test_msssim_identical_is_one_and_different_is_lower(size, scales):
    cfg = MS.msssim_config(size)
    assert cfg["scales"] == scales and cfg["kernel_size"] == 7 and sum(cfg["betas"]) == pytest.approx(1.0)
    rng = np.random.default_rng(size)
    imgs = torch.from_numpy(np.stack(_blobs(rng, 4, size)).transpose(0, 3, 1, 2) / 255.0).float().clamp(0, 1)
    same = MS.msssim_pairs(imgs, imgs.clone())
    assert torch.allclose(same, torch.ones(4), atol=1e-5)
    other = MS.msssim_pairs(imgs, imgs.roll(1, dims=0))
    noisy = MS.msssim_pairs(imgs, (imgs + 0.1 * torch.randn(imgs.shape, generator=torch.Generator().manual_seed(0)))
                            .clamp(0, 1))
    assert (other < 0.99).all() and (noisy < 0.99).all()
    assert MS.msssim_config(256)["scales"] == 5


def test_msssim_within_groups(tmp_path):
    rng = np.random.default_rng(0)
    base = _blobs(rng, 3, 32)
    groups = {
        "same": _write_pngs(tmp_path, [base[0], base[0]], "same"),
        "diff": _write_pngs(tmp_path, [base[1], base[2], base[0]], "diff"),
        "single": _write_pngs(tmp_path, [base[1]], "single"),
    }
    df, summary = MS.msssim_within_groups(groups, n_boot=50, seed=0)
    assert len(df) == 1 + 3 and summary["n_groups"] == 2 and summary["n_groups_skipped"] == 1
    assert df.loc[df.group == "same", "msssim"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    assert (df.loc[df.group == "diff", "msssim"] < 0.99).all()
    assert summary["value"] == pytest.approx(df["msssim"].mean())
    assert summary["scales"] == 3 and summary["channels"] == "RGB"
    with pytest.raises(DataError):
        MS.msssim_within_groups({"single": groups["single"]})


# ----------------------------------------------------------------------------- perceptual


def _lpips_net() -> PC.PerceptualNet:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
    return PC.perceptual_net_from_sequential(seq, (1, 3, 5), name=PC.construction_name("random conv (test)"),
                                             mean=(0.5,), std=(0.25,))


def test_lpips_construction_zero_for_identical_and_monotone_in_noise():
    net = _lpips_net()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.stack(_blobs(rng, 6, 32)).transpose(0, 3, 1, 2) / 255.0).float().clamp(0, 1)
    assert torch.allclose(net.distance(x, x.clone()), torch.zeros(6), atol=1e-6)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    d = [net.distance(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert all(b > a for a, b in zip(d, d[1:])), d
    assert "uniform weights" in net.name


def test_lpips_from_local_matches_torchmetrics_lpips(tmp_path):
    import torchvision
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None)  # random, no download
    path = tmp_path / "alexnet_backbone.pth"
    torch.save(alex.state_dict(), path)
    net = PC.lpips_from_local(path)
    assert "LPIPS (alex" in net.name and "torchmetrics-packaged" in net.name
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert isinstance(net.module, _LPIPS)
    ref = net.module(x, y, normalize=True).reshape(-1)
    np.testing.assert_allclose(net.distance(x, y).numpy(), ref.numpy(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(net.distance(x, x), torch.zeros(3), atol=1e-6)
    with pytest.raises(DataError, match="never downloaded"):
        PC.lpips_from_local(tmp_path / "missing.pth")


def test_perceptual_distance_pairs_are_reproducible_across_models(tmp_path):
    rng = np.random.default_rng(0)
    prompts = ["a dermoscopic image with hair", "a dermoscopic image with ink"]
    real = {p: _write_pngs(tmp_path / "real", _blobs(rng, 5, 32), f"r{i}") for i, p in enumerate(prompts)}
    fake_a = {p: _write_pngs(tmp_path / "sd", _blobs(rng, 4, 32), f"f{i}") for i, p in enumerate(prompts)}
    fake_b = {p: _write_pngs(tmp_path / "rl", _blobs(rng, 4, 32), f"f{i}") for i, p in enumerate(prompts)}
    fake_a["prompt without real images"] = fake_a[prompts[0]][:1]
    net = _lpips_net()
    df_a, s_a = PC.perceptual_distance(real, fake_a, net=net, pairs_per_prompt=6, seed=0, n_boot=50)
    df_b, s_b = PC.perceptual_distance(real, fake_b, net=net, pairs_per_prompt=6, seed=0, n_boot=50)
    assert len(df_a) == 12 and s_a["n_prompts"] == 2 and s_a["prompts_skipped"] == ["prompt without real images"]
    assert s_a["name"] == net.name and (df_a["distance"] > 0).all()
    assert s_a["value"] == pytest.approx(df_a["distance"].mean())
    # same real images, same fake file names -> the same pairs for both models -> pairable
    assert list(df_a["real"]) == list(df_b["real"])
    assert [Path(p).name for p in df_a["fake"]] == [Path(p).name for p in df_b["fake"]]
    assert s_a["boot_key"] == s_b["boot_key"]
    # identical sets -> 0
    df_0, s_0 = PC.perceptual_distance(real, real, net=net, pairs_per_prompt=100, seed=0, n_boot=20)
    assert len(df_0) == 2 * 25 and (df_0.loc[df_0.real == df_0.fake, "distance"].abs() < 1e-6).all()
    with pytest.raises(DataError, match="no prompt"):
        PC.perceptual_distance({}, fake_a, net=net, pairs_per_prompt=2, seed=0)


# ----------------------------------------------------------------------------- AUROC


def test_per_class_auroc_ignores_uncertain_and_missing():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, size=(n, 3)).astype(float)
    p = np.clip(y * 0.3 + rng.uniform(size=(n, 3)) * 0.7, 0, 1)
    # uncertain / missing rows get *misleading* scores: counting them would change the AUROC
    y[:40, 0] = -1
    p[:40, 0] = 1.0
    y[40:70, 1] = np.nan
    p[40:70, 1] = 0.99
    y[:, 2] = 1.0  # one class only
    y[0, 2] = -1
    out = A.per_class_auroc(y, p, ["a", "b", "c"])
    ok0 = y[:, 0] >= 0
    assert out["a"] == pytest.approx(roc_auc_score(y[ok0, 0], p[ok0, 0]))
    ok1 = ~np.isnan(y[:, 1])
    assert out["b"] == pytest.approx(roc_auc_score(y[ok1, 1], p[ok1, 1]))
    assert np.isnan(out["c"])
    assert out["avg"] == pytest.approx((out["a"] + out["b"]) / 2)
    blank0 = A.per_class_auroc(y, p, ["a", "b", "c"], nan_as_negative=True)
    assert blank0["b"] != pytest.approx(out["b"])
    with pytest.raises(DataError, match="expected 1, 0, -1 or NaN"):
        A.per_class_auroc(np.full((3, 1), 2.0), np.zeros((3, 1)), ["a"])
    with pytest.raises(DataError):
        A.per_class_auroc(y, p[:, :2], ["a", "b", "c"])


def test_rank_auroc_matches_sklearn_with_ties_and_ci_brackets_value():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=(5, 60)).astype(float)
    p = np.round(rng.uniform(size=(5, 60)), 1)  # many ties
    valid = rng.uniform(size=(5, 60)) > 0.2
    fast = A._rank_auroc(y, p, valid)
    for i in range(5):
        assert fast[i] == pytest.approx(roc_auc_score(y[i, valid[i]], p[i, valid[i]]))
    yy = rng.integers(0, 2, size=(150, 2)).astype(float)
    pp = yy * 0.4 + rng.uniform(size=(150, 2)) * 0.6
    res = A.auroc_with_ci(yy, pp, ["x", "y"], n_boot=200, ci=0.95, seed=0)
    for k in ("x", "y", "avg"):
        assert res[k]["lo"] <= res[k]["value"] <= res[k]["hi"]
        assert len(res[k]["boot"]) == 200
    assert res["x"]["boot_key"] == res["avg"]["boot_key"]


def test_fid_basic_interval_covers_true_fid_where_percentile_does_not():
    """FID is biased upwards and resampling adds the bias again: basic interval, not percentile."""
    rng = np.random.default_rng(0)
    d, n, sims = 8, 100, 40
    true = d * 0.3 ** 2  # identity covariances, mean shift 0.3 per dimension
    basic = pct = 0
    for s in range(sims):
        fr = rng.normal(size=(n, d)).astype(np.float32)
        ff = (rng.normal(size=(n, d)) + 0.3).astype(np.float32)
        v = FD.fid_from_features(fr, ff)
        reps = FD.fid_replicates(fr, ff, B.boot_counts(n, n_boot=100, seed=s), B.boot_counts(n, n_boot=100, seed=s + 1))
        lo, hi = B.interval(v, reps, ci=0.95, method="basic")
        basic += lo <= true <= hi
        lo, hi = B.interval(v, reps, ci=0.95, method="percentile")
        pct += lo <= true <= hi
    assert basic / sims >= 0.85 and pct / sims <= 0.5, (basic, pct)


def test_module_spec_features_callable_and_preprocessing(image_sets):
    root, paths = image_sets
    net = _tiny_net(4)
    whole = FD.ModuleExtractorSpec(module=net, name="whole", input_size=32)
    # the conv trunk only: 4-D output -> global average pool inside the extractor == the net's own pool
    trunk = FD.ModuleExtractorSpec(module=net, name="trunk", input_size=32, features=lambda m, x: m[:4](x))
    f_whole, d_whole = FD.extract_features(paths["real"][:6], whole, verbose=False)
    f_trunk, d_trunk = FD.extract_features(paths["real"][:6], trunk, verbose=False)
    np.testing.assert_allclose(f_whole, f_trunk, rtol=1e-5, atol=1e-6)
    assert (d_whole, d_trunk) == ("whole", "trunk")
    # grey input + normalisation (e.g. a CXR DenseNet taking 1 channel)
    grey_net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    grey = FD.ModuleExtractorSpec(module=grey_net, name="grey", input_size=24, in_channels=1, mean=(0.5,),
                                  std=(1 / 2048,))
    f_grey, _ = FD.extract_features(paths["real"][:3], grey, verbose=False)
    assert f_grey.shape == (3, 4) and np.isfinite(f_grey).all()
    # a bare nn.Module is accepted as well (forward = features)
    f_mod, _ = FD.extract_features(paths["real"][:6], net, verbose=False)
    np.testing.assert_allclose(f_mod, f_whole, rtol=1e-5, atol=1e-6)


def test_standardized_features_weigh_every_dimension_alike():
    # One dimension with a huge scale decides the raw FID alone; after z-scoring by the real set a
    # shift in the other dimensions is seen, and rescaling any dimension changes nothing.
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    fake = rng.normal(size=(200, 8))
    fake[:, 1:] += 0.5
    scale = np.ones(8)
    scale[0] = 1e3
    raw_scaled = FD.fid_from_features(real * scale, fake * scale)
    raw_plain = FD.fid_from_features(real, fake)
    assert raw_scaled > 30 * raw_plain  # the big dimension's noise swamps the real shift
    z_scaled = FD.fid_from_features(*FD.standardize_features(real * scale, fake * scale))
    z_plain = FD.fid_from_features(*FD.standardize_features(real, fake))
    assert z_scaled == pytest.approx(z_plain, rel=1e-4)
    assert z_plain > 7 * 0.25 * 0.8  # the 0.5 shift in 7 dimensions is what it measures
    const = np.c_[real, np.ones(len(real))], np.c_[fake, np.ones(len(fake))]
    assert FD.standardize_features(*const)[0].shape[1] == 8  # constant dimensions dropped
