"""CXRL rewards: r_align formula, diag/consist scores, the combined reward and RLCF (paired and
anchor bank) on tiny real models (posture aligner, xrv DenseNet, dual encoder, SD stack)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from medrl.errors import DataError
from medrl.rewards.align import align_reward

REPORTS = [
    "No acute cardiopulmonary process.",
    "Small left pleural effusion.",
    "Moderate cardiomegaly with mild pulmonary edema.",
    "Right lower lobe consolidation, possible pneumonia.",
]
SIZE = 16
SAMPLING = {"num_steps": 4, "guidance_scale": 3.0, "eta": 1.0}


# ----------------------------------------------------------------------------- r_align


def test_align_reward_identity_and_each_term():
    assert float(align_reward(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))) == 0.0
    # scale: max of the two deviations
    assert float(align_reward(torch.tensor([1.2, 0.9, 0.0, 0.0, 0.0]))) == pytest.approx(-0.2)
    assert float(align_reward(torch.tensor([0.7, 1.1, 0.0, 0.0, 0.0]))) == pytest.approx(-0.3)
    # rotation: |theta| / (2 pi), sign-free
    assert float(align_reward(torch.tensor([1.0, 1.0, 0.0, 0.0, -math.pi / 2]))) == pytest.approx(-0.25)
    # translation: Euclidean norm
    assert float(align_reward(torch.tensor([1.0, 1.0, 0.3, -0.4, 0.0]))) == pytest.approx(-0.5)
    both = align_reward(torch.tensor([[1.1, 1.0, 0.3, 0.4, math.pi], [1.0, 1.0, 0.0, 0.0, 0.0]]))
    assert both.shape == (2,) and both[0].item() == pytest.approx(-(0.1 + 0.5 + 0.5)) and both[1].item() == 0.0
    with pytest.raises(ValueError):
        align_reward(torch.zeros(4))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny reward models saved in their on-disk formats, and a tiny SD stack."""
    from medrl.data.tokenizer import build_tokenizer
    from medrl.models.dual_encoder import (
        DualEncoder,
        DualEncoderConfig,
        build_wordpiece_tokenizer,
        save_dual_encoder,
    )
    from medrl.models.posture import AlignerConfig, PostureAligner, save_aligner
    from medrl.diffusion.stack import build_tiny_stack
    from medrl.models.xrv_diag import build_diag, save_diag

    root = tmp_path_factory.mktemp("reward_models")
    torch.manual_seed(0)
    save_aligner(PostureAligner(AlignerConfig(size=SIZE)), root / "aligner")
    diag = build_diag(None, growth_rate=4, input_size=32)  # DenseNet-121's 5 halvings need >= 32 px
    with torch.no_grad():  # tame the untrained head so predictions vary around 0.5
        diag.classifier.weight.mul_(1e-3)
    save_diag(diag, root / "diag")
    tok = build_wordpiece_tokenizer(REPORTS * 2, root / "wp", vocab_size=200)
    save_dual_encoder(DualEncoder(DualEncoderConfig(image_size=SIZE, embed_dim=8), tok), root / "dualenc")
    clip_tok = root / "clip_tok"
    build_tokenizer(REPORTS * 4, clip_tok, max_length=24, vocab_size=600)
    tiny = {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 8,
            "text_hidden_size": 32, "text_layers": 1, "text_heads": 2, "max_position_embeddings": 32,
            "vae_block_out_channels": [32, 64], "latent_channels": 4}
    build_tiny_stack(root / "stack", clip_tok, tiny, sample_size=SIZE, seed=0)
    return root


def _reward(models, **kw):
    from medrl.rewards.cxr import CXRReward

    return CXRReward(models / "aligner", models / "diag", models / "dualenc", **kw)


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g)


# ----------------------------------------------------------------------------- direct + paired


def test_direct_reward_terms_match_the_models(models):
    from medrl.data.reports import label_report
    from medrl.models.dual_encoder import embed_images, embed_texts, load_dual_encoder
    from medrl.models.posture import load_aligner, predict_psi
    from medrl.models.xrv_diag import label_accuracy, load_diag, predict_probs

    rf = _reward(models, rlcf=False, l_align=1.0, l_diag=10.0, l_consist=10.0)
    assert not rf.needs_anchor
    x = _images(4, 0)
    r, t = rf(x, REPORTS)
    psi = predict_psi(load_aligner(models / "aligner"), x)
    assert torch.allclose(t["r_align"], align_reward(psi), atol=1e-6)
    labels = np.array([[label_report(p)[c] for c in load_diag(models / "diag").medrl_classes] for p in REPORTS], np.float32)
    probs = predict_probs(load_diag(models / "diag"), x)
    assert torch.allclose(t["raw_diag"], label_accuracy(probs, labels, unmentioned="ignore"))  # the default
    _, t_neg = _reward(models, rlcf=False, diag_unmentioned="negative")(x, REPORTS)
    assert torch.allclose(t_neg["raw_diag"], label_accuracy(probs, labels, unmentioned="negative"))
    de = load_dual_encoder(models / "dualenc")
    assert torch.allclose(t["raw_consist"], (embed_images(de, x) * embed_texts(de, REPORTS)).sum(-1), atol=1e-6)
    assert torch.equal(t["r_diag"], t["raw_diag"]) and torch.equal(t["r_consist"], t["raw_consist"])
    assert torch.allclose(r, t["r_align"] + 10 * t["raw_diag"] + 10 * t["raw_consist"], atol=1e-6)
    assert t["raw_consist"].std() > 0  # a real signal, not a constant


def test_needs_anchor_only_for_paired_comparative_terms(models):
    assert _reward(models, rlcf=True, rlcf_mode="paired").needs_anchor
    assert _reward(models, rlcf=True, rlcf_mode="paired", l_diag=0.0, l_consist=5.0).needs_anchor
    assert not _reward(models, rlcf=True, rlcf_mode="paired", l_diag=0.0, l_consist=0.0).needs_anchor
    assert not _reward(models, rlcf=False, rlcf_mode="paired").needs_anchor
    with pytest.raises(DataError, match="anchor_bank"):
        _reward(models, rlcf=True, rlcf_mode="bank")
    with pytest.raises(DataError, match="rlcf_mode"):
        _reward(models, rlcf=True, rlcf_mode="both")


def test_paired_rlcf_is_zero_against_itself_and_a_difference_otherwise(models):
    rf = _reward(models, rlcf=True, rlcf_mode="paired", l_align=1.0, l_diag=10.0, l_consist=10.0)
    x = _images(4, 1)
    r, t = rf(x, REPORTS, anchor_images=x.clone())
    assert torch.equal(t["r_diag"], torch.zeros(4)) and torch.equal(t["r_consist"], torch.zeros(4))
    assert torch.equal(r, t["r_align"])  # r_align is never differenced
    assert (t["r_align"] != 0).all()
    y = _images(4, 2)
    r2, t2 = rf(x, REPORTS, anchor_images=y)
    _, ty = _reward(models, rlcf=False)(y, REPORTS)
    assert torch.allclose(t2["r_consist"], t["raw_consist"] - ty["raw_consist"], atol=1e-6)
    assert torch.allclose(t2["r_diag"], t["raw_diag"] - ty["raw_diag"], atol=1e-6)
    assert torch.allclose(r2, t2["r_align"] + 10 * t2["r_diag"] + 10 * t2["r_consist"], atol=1e-5)
    with pytest.raises(ValueError, match="anchor_images"):
        rf(x, REPORTS)


# ----------------------------------------------------------------------------- anchor bank


def test_bank_built_from_the_same_model_and_seed_gives_zero(models, tmp_path):
    from medrl.diffusion.stack import load_components
    from medrl.rewards.cxr import anchor_sample_seed, build_anchor_bank, sample_images

    bank = tmp_path / "bank.csv"
    m = build_anchor_bank(models / "stack", REPORTS + REPORTS[:1], bank, k=1, seed=5, diag_dir=models / "diag",
                          dualenc_dir=models / "dualenc", batch_size=len(REPORTS), **SAMPLING)
    assert m["n_reports"] == 4.0 and m["n_images"] == 4.0
    df = pd.read_csv(bank)
    assert len(df) == 4 and (df["k"] == 1).all() and (df["diag_unmentioned"] == "ignore").all()
    # the policy *is* the base model with the bank's seeds: RLCF rewards vanish exactly
    c = load_components(str(models / "stack"))
    x = sample_images(c, REPORTS, [anchor_sample_seed(5, r, 0) for r in REPORTS], **SAMPLING)
    rf = _reward(models, rlcf=True, rlcf_mode="bank", anchor_bank=bank)
    r, t = rf(x, REPORTS)
    assert torch.equal(t["r_diag"], torch.zeros(4)) and torch.equal(t["r_consist"], torch.zeros(4))
    assert torch.equal(r, t["r_align"])
    # the JSON flavour holds the same numbers
    m2 = build_anchor_bank(models / "stack", REPORTS, tmp_path / "bank.json", k=1, seed=5, diag_dir=models / "diag",
                           dualenc_dir=models / "dualenc", batch_size=len(REPORTS), **SAMPLING)
    assert m2["consist_mean"] == pytest.approx(m["consist_mean"], abs=1e-7)
    _, tj = _reward(models, rlcf=True, rlcf_mode="bank", anchor_bank=tmp_path / "bank.json")(x, REPORTS)
    assert torch.equal(tj["r_consist"], torch.zeros(4))
    # without RLCF a given bank is only a reference: anchor terms are reported, never subtracted
    r0, t0 = _reward(models, rlcf=False, rlcf_mode="bank", anchor_bank=bank)(x, REPORTS)
    assert torch.equal(t0["anchor_consist"], t["anchor_consist"]) and torch.equal(t0["anchor_diag"], t["anchor_diag"])
    assert torch.equal(t0["r_consist"], t0["raw_consist"]) and torch.equal(t0["r_diag"], t0["raw_diag"])
    assert torch.allclose(r0, t0["r_align"] + t0["raw_diag"] * 10 + t0["raw_consist"] * 10, atol=1e-5)


def test_anchor_seeds_depend_on_report_not_position():
    from medrl.rewards.cxr import anchor_sample_seed

    assert anchor_sample_seed(1, "a", 0) == anchor_sample_seed(1, "a", 0)
    assert len({anchor_sample_seed(1, "a", 0), anchor_sample_seed(1, "a", 1), anchor_sample_seed(1, "b", 0),
                anchor_sample_seed(2, "a", 0)}) == 4


def test_bank_and_paired_agree_in_expectation(models, tmp_path):
    """Fixed policy (the base UNet perturbed): mean paired RLCF reward (anchor drawn with the
    same noise) and mean bank RLCF reward (anchor mean over K other samples) estimate the same
    E[score(policy)] - E[score(anchor)]; they must agree within the sampling error."""
    from medrl.diffusion.stack import load_components
    from medrl.rewards.cxr import build_anchor_bank, sample_images

    k, per_report = 12, 12
    bank = tmp_path / "bank.csv"
    build_anchor_bank(models / "stack", REPORTS, bank, k=k, seed=11, diag_dir=models / "diag",
                      dualenc_dir=models / "dualenc", batch_size=24, **SAMPLING)
    c = load_components(str(models / "stack"))
    policy = copy.deepcopy(c.unet)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g))
    prompts = [r for r in REPORTS for _ in range(per_report)]
    seeds = [10_000 + i for i in range(len(prompts))]  # disjoint from the bank's seeds
    x_pol = torch.cat([sample_images(c, prompts[i:i + 24], seeds[i:i + 24], unet=policy, **SAMPLING) for i in range(0, len(prompts), 24)])
    x_anc = torch.cat([sample_images(c, prompts[i:i + 24], seeds[i:i + 24], **SAMPLING) for i in range(0, len(prompts), 24)])
    assert not torch.equal(x_pol, x_anc)
    _, tp = _reward(models, rlcf=True, rlcf_mode="paired")(x_pol, prompts, anchor_images=x_anc)
    _, tb = _reward(models, rlcf=True, rlcf_mode="bank", anchor_bank=bank)(x_pol, prompts)
    n = len(prompts)
    for term in ("r_consist", "r_diag"):
        anchor_scores = tp[term.replace("r_", "anchor_")]
        # mean(bank) - mean(paired) = mean(anchor_i) - mean(bank means): both parts are
        # means of anchor scores, n fresh ones and n_reports * k banked ones
        within = np.mean([float(anchor_scores[j * per_report:(j + 1) * per_report].var()) for j in range(len(REPORTS))])
        se = math.sqrt(within / n + within / (k * len(REPORTS)))
        gap = abs(float(tb[term].mean() - tp[term].mean()))
        assert gap <= 4 * se + 1e-6, (term, gap, se)
    assert float(tp["r_consist"].abs().mean()) > 0.01  # the policy really differs from the anchor


def test_bank_errors(models, tmp_path):
    from medrl.rewards.cxr import BANK_COLUMNS, report_hash

    bank = tmp_path / "bank.csv"
    pd.DataFrame([{"report_hash": report_hash(REPORTS[0]), "k": 1, "diag_mean": 0.5, "diag_std": 0.0,
                   "consist_mean": 0.1, "consist_std": 0.0, "diag_model_sha": None, "dualenc_model_sha": None,
                   "diag_unmentioned": None, "report": REPORTS[0]}], columns=BANK_COLUMNS).to_csv(bank, index=False)
    rf = _reward(models, rlcf=True, rlcf_mode="bank", anchor_bank=bank)
    _, t = rf(_images(1, 0), REPORTS[:1])
    assert torch.allclose(t["r_consist"], t["raw_consist"] - 0.1)
    with pytest.raises(DataError, match="no anchor scores"):
        rf(_images(2, 0), REPORTS[:2])
    other = tmp_path / "other.csv"
    df = pd.read_csv(bank)
    df["diag_model_sha"] = "0123456789abcdef"
    df.to_csv(other, index=False)
    with pytest.raises(DataError, match="different model"):
        _reward(models, rlcf=True, rlcf_mode="bank", anchor_bank=other)
    df = pd.read_csv(bank)
    df["diag_unmentioned"] = "negative"  # scored with the other reading of unmentioned classes
    df.to_csv(other, index=False)
    _reward(models, rlcf=True, rlcf_mode="bank", anchor_bank=other, diag_unmentioned="negative")  # matches: fine
    with pytest.raises(DataError, match="diag_unmentioned"):
        _reward(models, rlcf=True, rlcf_mode="bank", anchor_bank=other)  # the default, ignore
    with pytest.raises(DataError, match="diag_unmentioned"):
        _reward(models, rlcf=False, diag_unmentioned="positive")
    with pytest.raises(DataError, match="not found"):
        _reward(models, rlcf=True, rlcf_mode="bank", anchor_bank=tmp_path / "missing.csv")


# ----------------------------------------------------------------------------- paired vs bank, measured


def test_compare_rlcf_modes_on_the_same_samples(models, tmp_path):
    from medrl.diffusion.stack import load_components
    from medrl.rewards.cxr import build_anchor_bank
    from medrl.metrics.rlcf_modes import compare_rlcf_modes
    from medrl.diffusion.lora import add_lora, save_adapter

    bank = tmp_path / "bank.csv"
    build_anchor_bank(models / "stack", REPORTS, bank, k=2, seed=3, diag_dir=models / "diag",
                      dualenc_dir=models / "dualenc", batch_size=8, **SAMPLING)
    kw = dict(aligner_dir=models / "aligner", diag_dir=models / "diag", dualenc_dir=models / "dualenc", bank=bank,
              reports=REPORTS, n_samples=6, batch_size=4, seed=0, n_boot=50, samples_per_epoch=12, **SAMPLING)
    # policy == anchor: paired RLCF with shared step noise is exactly zero, with the anchor's own
    # step noise (the trainer's paired mode) it is not, and neither is the bank's
    m0, df0 = compare_rlcf_modes(models / "stack", None, **kw)
    assert len(df0) == 6 and (df0["r_paired_shared"] == 0).all() and (df0["r_paired"] != 0).any()
    assert m0["std_paired_shared"]["value"] == 0 and m0["std_paired"]["value"] > 0 and m0["std_bank"]["value"] > 0
    assert m0["seconds"]["anchor"] > 0 and m0["reward_seconds_per_epoch"]["bank"] == pytest.approx(
        12 * m0["seconds_per_sample"]["bank"])
    assert m0["cost_ratio_paired_over_bank"] > 1
    # a perturbed LoRA policy: both modes are score minus their own anchor, on the same images
    c = load_components(str(models / "stack"))
    add_lora(c.unet, 4, seed=1)
    with torch.no_grad():
        for n, p in c.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_adapter(c.unet, None, tmp_path / "adapter")
    m1, df1 = compare_rlcf_modes(models / "stack", tmp_path / "adapter", **kw)
    assert list(df1["seed"]) == list(df0["seed"]) and (df1["r_paired"] != 0).any()
    for mode in ("paired", "paired_shared", "bank"):
        expect = (10 * (df1.raw_diag - df1[f"anchor_diag_{mode}"])
                  + 10 * (df1.raw_consist - df1[f"anchor_consist_{mode}"]))
        assert np.allclose(df1[f"r_{mode}"], expect, atol=1e-5), mode
        # the anchor side is the base model on the same seeds: unchanged by the adapter
        assert np.allclose(df1[f"anchor_consist_{mode}"], df0[f"anchor_consist_{mode}"], atol=1e-6), mode
    for mode in ("paired", "paired_shared"):
        d = m1[f"mean_diff_{mode}_minus_bank"]
        assert d["value"] == pytest.approx(float((df1[f"r_{mode}"] - df1.r_bank).mean()), abs=1e-9)
        assert d["lo"] <= d["hi"]
    with pytest.raises(DataError, match="both 0"):
        compare_rlcf_modes(models / "stack", None, **{**kw, "l_diag": 0.0, "l_consist": 0.0})
