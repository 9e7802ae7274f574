"""Dual encoder: tokenizer, embeddings, our format, CXR-CLIP checkpoint format, CLIP training."""
from __future__ import annotations

import os

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from medrl.errors import DataError
from medrl.io import save_image
from medrl.models.dual_encoder import (
    DualEncoder,
    DualEncoderConfig,
    augment_cxr,
    build_wordpiece_tokenizer,
    clip_loss,
    embed_images,
    embed_texts,
    load_dual_encoder,
    retrieval_metrics,
    save_dual_encoder,
    train_dual_encoder,
)

REPORTS = [
    "No acute cardiopulmonary process.",
    "Small left pleural effusion.",
    "Moderate cardiomegaly with mild pulmonary edema.",
    "Right lower lobe consolidation concerning for pneumonia.",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_wordpiece_tokenizer(REPORTS * 3, tmp_path_factory.mktemp("tok") / "tok", vocab_size=300)


def test_wordpiece_tokenizer_is_a_bert_tokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    assert tokenizer.tokenize("Small LEFT effusion") == ["small", "left", "effusion"]
    ids = tokenizer(["small left"])["input_ids"][0]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    tokenizer.save_pretrained(str(tmp_path / "t"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "t"), local_files_only=True)
    assert again("small left")["input_ids"] == tokenizer("small left")["input_ids"]


def test_wordpiece_vocabulary_is_the_same_in_every_process(tmp_path):
    """The vocabulary (hence token ids, hence the trained dual encoder) must not depend on the
    process: the tokenizers trainer's hash-map tie-breaking made it differ run to run."""
    import subprocess
    import sys

    code = ("import sys; from medrl.models.dual_encoder import build_wordpiece_tokenizer as b; "
            "t = b(sys.argv[2:] * 5, sys.argv[1], vocab_size=120); "
            "print(sorted(t.get_vocab().items(), key=lambda kv: kv[1]))")
    outs = {subprocess.run([sys.executable, "-c", code, str(tmp_path / f"t{i}"), *REPORTS], capture_output=True,
                           text=True, check=True, env={**os.environ, "PYTHONHASHSEED": str(i)}).stdout
            for i in range(3)}
    assert len(outs) == 1
    tok = build_wordpiece_tokenizer(REPORTS * 5, tmp_path / "t", vocab_size=120)
    assert tok.tokenize("effusion") == ["effusion"]  # a frequent word is one token
    pieces = tok.tokenize("leftion")  # an unseen word of seen characters is spelled out, not [UNK]
    assert pieces[0] == "left" and "".join(t.removeprefix("##") for t in pieces) == "leftion"
    assert len(tok.get_vocab()) <= 120 and tok.unk_token_id == 1
    with pytest.raises(DataError, match="no text"):
        build_wordpiece_tokenizer([None], tmp_path / "empty")


def test_embeddings_are_normalised_and_round_trip(tokenizer, tmp_path):
    torch.manual_seed(0)
    m = DualEncoder(DualEncoderConfig(image_size=32, embed_dim=16), tokenizer)
    x = torch.rand(3, 1, 40, 40)
    e, t = embed_images(m, x), embed_texts(m, REPORTS[:3])
    assert e.shape == (3, 16) and t.shape == (3, 16)
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5) and torch.allclose(t.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(embed_images(m, x.expand(-1, 3, -1, -1)), e, atol=1e-6)  # gray == replicated RGB
    save_dual_encoder(m, tmp_path / "de")
    m2 = load_dual_encoder(tmp_path / "de")
    assert torch.allclose(embed_images(m2, x), e, atol=1e-6) and torch.allclose(embed_texts(m2, REPORTS[:3]), t, atol=1e-6)


def _cxrclip_reference(tokenizer, embed_dim: int = 16):
    """A CXR-CLIP model assembled from its parts as the CXR-CLIP repo does (torchvision ResNet
    minus fc, HF BertModel, MLP projection heads, logit_scale), not through our class."""
    from torchvision.models.resnet import Bottleneck, ResNet
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    resnet = ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=32)
    del resnet.fc
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))

    def mlp(dim):
        return torch.nn.ModuleDict({"projection": torch.nn.Linear(dim, embed_dim), "fc": torch.nn.Linear(embed_dim, embed_dim),
                                    "layer_norm": torch.nn.LayerNorm(embed_dim)})

    ip, tp = mlp(2048), mlp(32)
    for m in (ip, tp):
        torch.nn.init.normal_(m["layer_norm"].weight, 1.0, 0.2)
    sd = {}
    sd.update({f"image_encoder.resnet.{k}": v for k, v in resnet.state_dict().items()})
    sd.update({f"text_encoder.text_encoder.{k}": v for k, v in bert.state_dict().items()})
    sd.update({f"image_projection.{k}": v for k, v in ip.state_dict().items()})
    sd.update({f"text_projection.{k}": v for k, v in tp.state_dict().items()})
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    sd["text_encoder.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # older transformers kept it

    def head(m, x):
        p = m["projection"](x)
        return m["layer_norm"](m["fc"](F.gelu(p)) + p)

    @torch.no_grad()
    def reference(images, texts):
        resnet.eval(), bert.eval()
        x = F.interpolate(images.expand(-1, 3, -1, -1), size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
        x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        r = resnet
        f = r.avgpool(r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x)))))))))
        img = F.normalize(head(ip, torch.flatten(f, 1)), dim=-1)
        tok = tokenizer(texts, padding="max_length", truncation=True, max_length=40, return_tensors="pt")
        h = bert(**tok).last_hidden_state
        eos = h[torch.arange(len(texts)), tok["attention_mask"].sum(-1) - 1]  # CXR-CLIP 'eos' pooling
        return img, F.normalize(head(tp, eos), dim=-1)

    config = {"model": {"name": "clip_custom", "temperature": 0.07,
                        "image_encoder": {"source": "torchvision", "name": "resnet", "pretrained": True},
                        "text_encoder": {"source": "huggingface", "name": "emilyalsentzer/Bio_ClinicalBERT", "pooling": "eos"},
                        "projection_head": {"name": "mlp", "dropout": 0.1, "proj_dim": embed_dim}},
              "base": {"image_size": 48, "text_max_length": 40}}
    return sd, config, reference


def test_loads_cxrclip_checkpoint_directory(tokenizer, tmp_path):
    from transformers import BertConfig

    sd, config, reference = _cxrclip_reference(tokenizer)
    d = tmp_path / "cxrclip"
    d.mkdir()
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {"state": {}, "param_groups": []},
                "config": config, "epoch": 15, "train_loss": 1.23}, d / "model-best.tar")
    tokenizer.save_pretrained(str(d / "tokenizer"))
    # BERT heads cannot be read off the weights: BioClinicalBERT's config.json sits with its tokenizer
    BertConfig(num_attention_heads=2).to_json_file(str(d / "tokenizer" / "config.json"))
    m = load_dual_encoder(d)
    assert m.config.image_layers == [1, 1, 1, 1] and m.config.image_width_per_group == 32
    assert m.config.projection == "mlp" and m.config.image_size == 48 and m.config.max_length == 40
    assert m.bert_config.num_attention_heads == 2 and m.bert_config.hidden_size == 32
    x = torch.rand(2, 1, 64, 64)
    want_img, want_txt = reference(x, REPORTS[:2])
    assert torch.allclose(embed_images(m, x), want_img, atol=1e-5)
    assert torch.allclose(embed_texts(m, REPORTS[:2]), want_txt, atol=1e-5)
    # the file itself, tokenizer given explicitly
    m2 = load_dual_encoder(d / "model-best.tar", tokenizer=d / "tokenizer")
    assert torch.allclose(embed_texts(m2, REPORTS[:2]), want_txt, atol=1e-5)


class _DictConfigStandIn:
    """A non-tensor object in the checkpoint, as OmegaConf's DictConfig is in real ones."""

    def __init__(self, d):
        self.d = d


def test_cxrclip_checkpoint_with_pickled_objects_is_refused(tokenizer, tmp_path):
    sd, config, _ = _cxrclip_reference(tokenizer)
    torch.save({"model": sd, "config": _DictConfigStandIn(config)}, tmp_path / "model-last.tar")
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    with pytest.raises(DataError, match="weights_only"):
        load_dual_encoder(tmp_path / "model-last.tar")
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith("text_projection")}, "config": config}, tmp_path / "x.pt")
    with pytest.raises(DataError, match="lacks"):
        load_dual_encoder(tmp_path / "x.pt", tokenizer=tmp_path / "tokenizer")
    with pytest.raises(DataError, match="exactly one"):
        load_dual_encoder(tmp_path)  # two candidate checkpoints in one directory


def test_clip_loss_and_retrieval_metrics_treat_identical_reports_as_matches():
    texts = ["a", "a", "b"]
    e = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    m = retrieval_metrics(e, e, texts)
    assert m["i2t_recall@1"] == 1.0 and m["t2i_recall@1"] == 1.0
    assert m["cosine_matched"] == pytest.approx(1.0) and m["cosine_unmatched"] == pytest.approx(0.0)
    assert m["i2t_auroc"] == 1.0
    # Image 0's own report "x" ties one other report and beats the third: (0.5 + 1) / 2.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m2 = retrieval_metrics(img, txt, ["x", "y", "z"])
    # rows: own 1 vs (1, 0) -> 0.75; own 0 vs (0, 1) -> 0.25; own 1 vs (0, 0) -> 1.0
    assert m2["i2t_auroc"] == pytest.approx((0.75 + 0.25 + 1.0) / 3)
    good = clip_loss(e, e, torch.tensor(math.log(10.0)), texts)
    bad = clip_loss(e, e.flip(0), torch.tensor(math.log(10.0)), texts)
    assert good < bad


def test_train_dual_encoder_aligns_images_and_reports(tmp_path):
    """Each report has its own visual pattern; after a short CLIP run retrieval beats chance."""
    rng = np.random.default_rng(0)
    size, rows = 32, []
    yy, xx = np.mgrid[0:size, 0:size] / size
    patterns = [np.zeros_like(xx), (yy > 0.7) * 0.5, (((xx - 0.5) ** 2 + (yy - 0.6) ** 2) < 0.06) * 0.5, (xx < 0.35) * (yy > 0.5) * 0.5]
    for i in range(160):
        k = i % 4
        img = rng.uniform(0.1, 0.35, (size, size)) + patterns[k]
        p = tmp_path / "img" / f"{i}.png"
        save_image(torch.from_numpy(img.clip(0, 1).astype(np.float32))[None], p)
        rows.append({"image": str(i), "path": str(p), "split": "test" if i >= 128 else "train", "impression": REPORTS[k]})
    m = train_dual_encoder(pd.DataFrame(rows), tmp_path / "de", size=size, epochs=10, batch_size=16, lr=1e-3,
                           embed_dim=16, seed=0, ckpt_dir=tmp_path / "ckpt")
    assert m["test_i2t_recall@1"] > 0.8 and m["test_t2i_recall@1"] > 0.8  # chance: 0.25
    assert m["test_cosine_matched"] > m["test_cosine_unmatched"] + 0.2
    model = load_dual_encoder(tmp_path / "de")
    assert (tmp_path / "de" / "tokenizer").is_dir() and model.config.embed_dim == 16
    assert not (tmp_path / "ckpt" / "dualenc").exists()


def test_augment_cxr_is_a_small_reproducible_warp():
    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 12:20, 6:14] = 1.0  # a bright "finding" on the right side of the image (patient's right)
    assert torch.equal(augment_cxr(x, torch.Generator().manual_seed(0), 0.0), x)
    y = augment_cxr(x, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(y, augment_cxr(x, torch.Generator().manual_seed(0), 1.0))  # per-epoch generator: resume-exact
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.equal(y[0], y[1])  # each image its own warp
    # Small: the finding moves by at most ~2-3 px and stays on its side (no flips).
    cols = torch.arange(32.0)
    blob = (y[:, 0] > 0.5).float()  # the finding, not the brightness-shifted background
    centre_x = (blob.sum(1) * cols).sum(1) / blob.sum((1, 2))
    assert ((centre_x - 9.5).abs() < 3.5).all() and (centre_x < 16).all()
    assert (y.mean((1, 2, 3)) - x.mean((1, 2, 3))).abs().max() < 0.1 + 0.02  # brightness +-0.1, blob area +-20 %


def test_missing_report_column_is_a_data_error(tmp_path):
    pairs = pd.DataFrame([{"image": "a", "path": "a.png", "split": "train"}])
    with pytest.raises(DataError, match="impression"):
        train_dual_encoder(pairs, tmp_path / "o", size=16, epochs=1, batch_size=2, lr=1e-3, embed_dim=8, seed=0, ckpt_dir=tmp_path / "c")
