"""The locally trained CLIP BPE tokenizer loads like SD v1.5's and encodes like OpenAI CLIP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import regex

from medrl.data.prompts import evaluation_prompts
from medrl.data.tokenizer import build_tokenizer, count_tokens
from medrl.errors import DataError

IMPRESSIONS = [
    "Small right pleural effusion. No pneumothorax.",
    "Moderate cardiomegaly with mild pulmonary edema.",
    "A 1.5 cm nodule in the right upper lung. No acute fracture.",
    "No acute cardiopulmonary process.",
    "Possible left lower lobe pneumonia. Endotracheal tube terminates approximately 4 cm above the carina.",
    "Bibasilar atelectasis, likely. Heart size is normal.",
] * 3
TEXTS = evaluation_prompts() + IMPRESSIONS


def _byte_encoder() -> dict[int, str]:
    # OpenAI CLIP simple_tokenizer.bytes_to_unicode, written out independently of the library
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _reference_encode(text: str, vocab: dict[str, int], merges: list[str]) -> list[int]:
    """OpenAI CLIP's BPE (simple_tokenizer.py) for plain ASCII text, specials included."""
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    enc = _byte_encoder()
    pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                        regex.IGNORECASE)

    def bpe(token: str) -> list[str]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return list(word)

    ids = [vocab["<|startoftext|>"]]
    for tok in pat.findall(" ".join(text.split()).lower()):
        ids += [vocab[t] for t in bpe("".join(enc[b] for b in tok.encode("utf-8")))]
    return ids + [vocab["<|endoftext|>"]]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer(TEXTS, d, max_length=77, vocab_size=800)
    return d


def test_layout_and_vocab_match_clip(tok_dir):
    assert {p.name for p in tok_dir.iterdir()} == {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    merges = merges[1:]
    assert 300 <= len(vocab) <= 800 and len(vocab) == 512 + len(merges) + 2
    enc = list(_byte_encoder().values())
    assert [k for k, _ in sorted(vocab.items(), key=lambda kv: kv[1])[:512]] == enc + [c + "</w>" for c in enc]
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    assert all(a + b in vocab for a, b in (m.split() for m in merges))
    assert "dermoscopic</w>" in vocab and "pneumothorax" in "".join(vocab)


@pytest.mark.parametrize("cls_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_loads_with_transformers_and_encodes_like_openai_clip(tok_dir, cls_name):
    import transformers

    tok = getattr(transformers, cls_name).from_pretrained(str(tok_dir))
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    eos = tok.eos_token_id
    for text in TEXTS + ["Unseen WORDS: zebra-crossing 42!"]:
        ids = tok(text).input_ids
        assert ids == _reference_encode(text, vocab, merges), text
        assert eos not in ids[1:-1], f"unknown token in {text!r}"  # unk == <|endoftext|> in CLIP
    padded = tok(TEXTS[0], padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == eos
    # CLIP decodes every end-of-word as a space, so punctuation comes back spaced out
    words = "small right pleural effusion with no visible artifacts"
    assert tok.decode(tok(words).input_ids, skip_special_tokens=True) == words


def test_count_tokens(tok_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    for text in IMPRESSIONS[:6]:
        assert count_tokens(tok, text) == len(tok(text).input_ids) - 2
    long = " ".join(IMPRESSIONS * 3)
    assert count_tokens(tok, long) > 77  # not truncated
    assert count_tokens(tok, "dermoscopic") == 1  # a frequent word became one token


def test_deterministic_and_rejects_empty(tmp_path, tok_dir):
    build_tokenizer(TEXTS, tmp_path / "again", max_length=77, vocab_size=800)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tok_dir / name).read_bytes()
    build_tokenizer(list(reversed(TEXTS)), tmp_path / "rev", max_length=77, vocab_size=800)
    assert (tmp_path / "rev" / "merges.txt").read_bytes() == (tok_dir / "merges.txt").read_bytes()
    with pytest.raises(DataError, match="no non-empty"):
        build_tokenizer(["", "  "], tmp_path / "empty")
