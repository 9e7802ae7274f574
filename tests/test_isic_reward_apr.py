"""RL4Med reward (match_reward, ArtifactReward) and APR on hand-made predictions."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medrl.data.prompts import ARTIFACTS4, HEADS6, labels_to_prompt
from medrl.errors import DataError
from medrl.io import save_image
from medrl.metrics.apr import apr, apr_per_prompt, evaluate_apr, exact_match
from medrl.models.classifiers import build_classifier, save_classifier
from medrl.rewards.isic import ArtifactReward, match_reward

torch.set_num_threads(1)


def prompt(lesion: str, *arts: str) -> str:
    labels = {h: 0 for h in HEADS6}
    labels[lesion] = 1
    labels.update({a: 1 for a in arts})
    return labels_to_prompt(labels)


def constant_classifier(tmp_path, heads: list[str], on: set[str], size: int = 32):
    """A saved classifier whose output ignores the image: logit +6 for heads in ``on``, else -6."""
    torch.manual_seed(0)
    m = build_classifier(heads)
    lin = m.net.classifier[1]
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([6.0 if h in on else -6.0 for h in heads]))
    m.size = size
    d = tmp_path / f"clf_{len(heads)}"
    save_classifier(m, d)
    return d


# ----------------------------------------------------------------------------- match_reward


def test_match_reward_hand_made():
    # heads: hair, gel_bubble, ruler, ink, MEL, NV
    probs = torch.tensor([
        [0.9, 0.1, 0.8, 0.2, 0.7, 0.3],  # all six agree with target row 0
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.7],  # lesion swapped: 4/6
        [0.1, 0.9, 0.2, 0.8, 0.3, 0.7],  # everything wrong
        [0.5, 0.1, 0.8, 0.2, 0.7, 0.3],  # 0.5 is not > 0.5: hair predicted absent -> 5/6
    ])
    target = torch.tensor([[1, 0, 1, 0, 1, 0]] * 4, dtype=torch.float32)
    r = match_reward(probs, target)
    assert torch.allclose(r, torch.tensor([1.0, 4 / 6, 0.0, 5 / 6]))
    # Threshold 0.45 turns row 3's 0.5 into "present"; at 0.25 the 0.3s turn on as well.
    r2 = match_reward(probs, target, threshold=0.45)
    assert r2[3] == 1.0 and r2[2] == 0.0
    r3 = match_reward(probs, target, threshold=0.25)
    assert r3[3] == pytest.approx(5 / 6) and r3[2] == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        match_reward(probs, target[:, :4])


def test_artifact_reward_against_prompts(tmp_path):
    d = constant_classifier(tmp_path, HEADS6, on={"hair", "MEL"})
    reward = ArtifactReward(d)
    assert reward.needs_anchor is False and reward.heads == HEADS6
    prompts = [
        prompt("MEL", "hair"),  # exactly what the classifier sees
        prompt("NV"),  # hair, MEL, NV wrong -> 3/6
        prompt("MEL", "hair", "ink"),  # ink missing -> 5/6
        prompt("MEL"),  # hair unrequested but present -> 5/6
    ]
    images = torch.rand(4, 3, 48, 48)  # not the classifier's size: resized inside
    r, terms = reward(images, prompts)
    assert r.shape == (4,)
    assert torch.allclose(r, torch.tensor([1.0, 0.5, 5 / 6, 5 / 6]))
    assert torch.equal(terms["artifact_exact"], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(terms["match_hair"], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(terms["match_ink"], torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert torch.equal(terms["match_NV"], torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert set(terms) == {f"match_{h}" for h in HEADS6} | {"artifact_exact"}
    with pytest.raises(DataError, match="does not parse"):
        reward(images[:1], ["a photo of a cat"])
    with pytest.raises(ValueError):
        reward(images, prompts[:2])


def test_artifact_reward_follows_the_pixels(tmp_path):
    """With a network whose hair logit is the image brightness, dark and bright images of the
    same prompt get different rewards (the classifier sees the normalised pixels)."""
    d = constant_classifier(tmp_path, HEADS6, on={"MEL"})
    reward = ArtifactReward(d)

    class Brightness(torch.nn.Module):
        def forward(self, x):  # x is ImageNet-normalised: black ~ -2, white ~ +2
            logits = torch.full((x.shape[0], 6), -6.0)
            logits[:, 0] = 5 * x.mean(dim=(1, 2, 3))
            logits[:, 4] = 6.0
            return logits

    reward.model.net = Brightness()
    images = torch.cat([torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)])
    r, terms = reward(images, [prompt("MEL", "hair")] * 2)
    assert torch.allclose(r, torch.tensor([5 / 6, 1.0]))
    assert terms["artifact_exact"].tolist() == [0.0, 1.0]


# ----------------------------------------------------------------------------- APR


def test_apr_exact_set_rule():
    target = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]])
    pred = np.array([
        [1, 0, 1, 0],  # exact
        [0, 0, 0, 0],  # exact (no artifacts asked, none seen)
        [1, 1, 1, 0],  # one requested artifact missing
        [1, 1, 0, 0],  # an unrequested artifact appears
    ])
    assert apr(pred, target) == 0.5
    assert exact_match(pred, target).tolist() == [True, True, False, False]
    # Probabilities are thresholded (strictly above); tensors and bools are accepted.
    probs = torch.tensor([[0.9, 0.2, 0.51, 0.5], [0.1, 0.4, 0.0, 0.3], [0.6, 0.7, 0.8, 0.9], [0.2, 0.6, 0.1, 0.49]])
    assert apr(probs, torch.from_numpy(target)) == 1.0
    assert apr(probs, target, threshold=0.55) == 0.75  # row 0 loses its ruler (0.51); the rest hold
    assert apr(probs, target, threshold=0.65) == 0.25  # rows 0, 2 (gel 0.6) and 3 (gel 0.6) now miss
    assert apr(probs > 0.5, target) == 1.0
    with pytest.raises(DataError, match="shapes differ"):
        apr(pred[:, :3], target)
    with pytest.raises(DataError, match="0/1"):
        apr(pred, target * 2)


def test_apr_per_prompt():
    target = np.array([[1, 0, 0, 0]] * 3 + [[0, 0, 0, 0]] * 2)
    pred = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]])
    prompts = ["p_hair"] * 3 + ["p_none"] * 2
    per = apr_per_prompt(pred, target, prompts)
    assert list(per) == ["p_hair", "p_none"]
    assert per["p_hair"] == pytest.approx(2 / 3) and per["p_none"] == pytest.approx(0.5)
    with pytest.raises(DataError, match="one per image"):
        apr_per_prompt(pred, target, prompts[:4])


def test_evaluate_apr_end_to_end(tmp_path):
    d = constant_classifier(tmp_path, ARTIFACTS4, on={"ruler"})
    prompts = [prompt("MEL", "ruler"), prompt("NV", "ruler"), prompt("MEL"), prompt("NV", "hair", "ruler")]
    rows = []
    for i, p in enumerate(prompts):
        for s in range(2):
            path = tmp_path / "samples" / f"{i}_{s}.png"
            save_image(torch.rand(3, 40, 40), path)
            rows.append({"prompt_id": i, "prompt": p, "seed": s, "model": "sd", "path": str(path)})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    per_image, summary = evaluate_apr(manifest, d, batch_size=3)
    assert len(per_image) == 8
    assert per_image["exact"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert (per_image["pred_ruler"] == 1).all() and (per_image["pred_hair"] == 0).all()
    assert per_image.loc[per_image.prompt_id == 3, "target_hair"].tolist() == [1, 1]
    assert summary["apr"] == 0.5 and summary["n_images"] == 8 and summary["n_prompts"] == 4
    assert summary["apr_prompt_mean"] == 0.5 and summary["apr_prompt_min"] == 0.0
    assert summary["acc_ruler"] == pytest.approx(6 / 8) and summary["acc_hair"] == pytest.approx(6 / 8)
    assert summary["acc_ink"] == 1.0 and summary["acc_gel_bubble"] == 1.0
    # A reward (H=6) classifier is still accepted: APR reads its four artifact heads.
    d6 = constant_classifier(tmp_path, HEADS6, on={"ruler", "MEL"})
    _, s6 = evaluate_apr(manifest, d6)
    assert s6["apr"] == 0.5


def test_evaluate_apr_bad_manifest(tmp_path):
    d = constant_classifier(tmp_path, ARTIFACTS4, on=set())
    bad = tmp_path / "m.csv"
    pd.DataFrame({"prompt": [prompt("MEL")], "path": ["x.png"]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match="m.csv"):
        evaluate_apr(bad, d)
    gone = tmp_path / "gone.csv"
    pd.DataFrame([{"prompt_id": 0, "prompt": prompt("MEL"), "seed": 0, "model": "sd", "path": "nope/x.png"}]).to_csv(gone, index=False)
    with pytest.raises(DataError, match="do not exist"):
        evaluate_apr(gone, d)


def test_reward_head_breakdown_hand_made():
    from medrl.metrics.isic_eval import reward_head_breakdown

    # two prompts x 2 images; head "a" never fires, head "b" fires on half of prompt p's images
    prompts = ["p", "p", "q", "q"]
    target = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])
    pred = np.array([[0, 1], [0, 0], [0, 0], [0, 0]])
    out = reward_head_breakdown(pred, target, ["a", "b"], prompts)
    a, b = out["heads"]["a"], out["heads"]["b"]
    assert a["match"] == 0.5 and a["p_pred_asked"] == 0.0 and a["p_pred_not_asked"] == 0.0
    assert a["within_prompt_var"] == 0.0  # constant within each prompt: no per-prompt signal
    assert b["match"] == 0.75 and b["p_pred_asked"] == 0.5
    assert b["within_prompt_var"] == pytest.approx((0.25 + 0.0) / 2)  # var of (1, 0) is 0.25 for p
    reward = (pred == target).mean(1)  # 0.5, 0, 1, 1
    assert out["reward_var"] == pytest.approx(reward.var())
    assert out["reward_within_prompt_var"] == pytest.approx((0.0625 + 0.0) / 2)
    with pytest.raises(ValueError, match="expected"):
        reward_head_breakdown(pred[:3], target, ["a", "b"], prompts)


def test_vae_artifact_ceiling(tmp_path):
    """Real held-out images before and after the stack's VAE, scored by the H=4 model: a
    classifier that ignores the image gives the same exact-set APR on both, computed by hand."""
    from medrl.bench import tiny_stack
    from medrl.metrics.isic_eval import vae_artifact_ceiling

    tiny = {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32,
            "attention_head_dim": 8, "text_hidden_size": 32, "text_layers": 1, "text_heads": 2,
            "max_position_embeddings": 16, "vae_block_out_channels": [16, 32], "latent_channels": 4}
    stack = tiny_stack(tmp_path / "stack", size=16, tiny=tiny, seed=0, max_length=16)
    d = constant_classifier(tmp_path, ARTIFACTS4, on={"ruler"}, size=16)
    rows = []
    rng = np.random.default_rng(0)
    for i in range(10):
        path = tmp_path / "prepared" / "images" / f"{i}.png"
        save_image(torch.rand(3, 16, 16), path)
        labels = {a: int(rng.uniform() < 0.5) for a in ARTIFACTS4}
        rows.append({"path": str(path), "split": "test" if i < 8 else "train", **labels})
    items = pd.DataFrame(rows)
    items.to_csv(tmp_path / "prepared" / "items.csv", index=False)
    out = vae_artifact_ceiling(stack, tmp_path / "prepared", d, size=16, n_boot=50, ci=0.95, seed=0, batch_size=3)
    test = items[items.split == "test"]
    want = float(((test.ruler == 1) & (test[["hair", "gel_bubble", "ink"]].sum(axis=1) == 0)).mean())
    assert out["n_images"] == 8
    for block in ("real", "vae_roundtrip"):
        assert out[block]["apr"]["value"] == pytest.approx(want)
        assert out[block]["apr"]["lo"] <= want <= out[block]["apr"]["hi"]
        assert out[block]["fires_when_present"]["ruler"] in (1.0, None)
        assert out[block]["fires_when_present"]["hair"] in (0.0, None)
        for h, auc in out[block]["auroc"].items():  # a constant judge ranks nothing
            assert auc == (None if test[h].nunique() < 2 else pytest.approx(0.5)), h
    other = vae_artifact_ceiling(stack, tmp_path / "prepared", d, size=16, n_boot=50, ci=0.95, seed=0, split="train")
    assert (other["split"], other["n_images"]) == ("train", 2)
    with pytest.raises(DataError, match="'validation'"):
        vae_artifact_ceiling(stack, tmp_path / "prepared", d, size=16, n_boot=50, ci=0.95, seed=0, split="validation")
    items.drop(columns=["ink"]).to_csv(tmp_path / "prepared" / "items.csv", index=False)
    with pytest.raises(DataError, match="ink"):
        vae_artifact_ceiling(stack, tmp_path / "prepared", d, size=16, n_boot=50, ci=0.95, seed=0)


def test_vae_ceiling_scores_the_reconstruction(tmp_path, monkeypatch):
    """A "VAE" that erases everything (decodes to black) and a metric model whose ruler head is
    the image brightness: white ruler images are found as they are (APR 1) and lost after the
    round trip (APR 0)."""
    from medrl.metrics.isic_eval import vae_artifact_ceiling
    from medrl.diffusion import stack as sd_stack
    from medrl.models import classifiers

    class EraseVAE:
        dtype = torch.float32

        def encode(self, x):
            return type("Enc", (), {"latent_dist": type("Dist", (), {"mode": lambda _self: x})()})()

        def decode(self, z):
            return type("Dec", (), {"sample": -torch.ones_like(z)})()

    class RulerIsBrightness(torch.nn.Module):
        def forward(self, x):  # ImageNet-normalised: white ~ +2, black ~ -2
            logits = torch.full((x.shape[0], len(ARTIFACTS4)), -6.0)
            logits[:, ARTIFACTS4.index("ruler")] = 5 * x.mean(dim=(1, 2, 3))
            return logits

    d = constant_classifier(tmp_path, ARTIFACTS4, on=set(), size=16)
    load = classifiers.load_classifier

    def load_bright(*a, **k):
        m = load(*a, **k)
        m.net = RulerIsBrightness()
        return m

    monkeypatch.setattr(classifiers, "load_classifier", load_bright)
    monkeypatch.setattr(sd_stack, "load_vae", lambda *a, **k: EraseVAE())
    rows = []
    for i in range(4):
        path = tmp_path / "prepared" / f"{i}.png"
        save_image(torch.ones(3, 16, 16), path)
        rows.append({"path": str(path), "split": "test", "hair": 0, "gel_bubble": 0, "ruler": 1, "ink": 0})
    pd.DataFrame(rows).to_csv(tmp_path / "prepared" / "items.csv", index=False)
    out = vae_artifact_ceiling(tmp_path / "unused", tmp_path / "prepared", d, size=16, n_boot=20, ci=0.95, seed=0)
    assert out["real"]["apr"]["value"] == 1.0 and out["real"]["fires_when_present"]["ruler"] == 1.0
    assert out["vae_roundtrip"]["apr"]["value"] == 0.0 and out["vae_roundtrip"]["fires_when_present"]["ruler"] == 0.0
    assert out["real"]["fires_when_present"]["hair"] is None  # no hair in the test set
