"""A small CLIP BPE tokenizer trained locally, saved in SD v1.5's `tokenizer/` layout.

The files match OpenAI CLIP's exactly in form: `vocab.json` lists the 256 byte-level
symbols, the same 256 with the `</w>` end-of-word suffix, one entry per merge (in merge
order), then `<|startoftext|>` and `<|endoftext|>` (so the end token has the largest id, which
CLIPTextModel's pooling relies on); `merges.txt` starts with `#version: 0.2`. Text is
normalised like CLIP (NFC, whitespace collapsed, lower-cased) and split with CLIP's regex
before byte-level BPE (both from the `tokenizers` library); merges are learnt on the
resulting words with a deterministic BPE loop.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from medrl.errors import DataError
from medrl.io import atomic_dir

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (same order as CLIP's vocab)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_pretokenizer():
    """CLIP's normaliser and pre-tokeniser (the same ones transformers' CLIPTokenizer uses)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return norm, pre


def _word_counts(texts: list[str]) -> Counter:
    norm, pre = _clip_pretokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    return counts


def _learn_merges(texts: list[str], n_merges: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Byte-level BPE merges with CLIP's `</w>` end-of-word suffix.

    Words come from the `tokenizers` CLIP normaliser/pre-tokeniser. The merge loop is ours
    because the `tokenizers` BpeTrainer breaks count ties in hash-map order, so its merge
    list differs between processes; here ties go to the lexicographically smallest pair."""
    words: dict[tuple[str, ...], int] = {}
    for w, c in _word_counts(texts).items():
        words[tuple(w[:-1]) + (w[-1] + "</w>",)] = c
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set] = defaultdict(set)
    for word, c in words.items():
        for pair in zip(word, word[1:]):
            pair_counts[pair] += c
            where[pair].add(word)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges and pair_counts:
        best, count = min(pair_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < min_frequency:
            break
        merges.append(best)
        a, b = best
        for word in list(where.pop(best, ())):
            c = words.pop(word)
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= c
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
                if pair != best:
                    where[pair].discard(word)
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            new = tuple(merged)
            words[new] = words.get(new, 0) + c
            for pair in zip(new, new[1:]):
                pair_counts[pair] += c
                where[pair].add(new)
    return merges


def build_tokenizer(texts: list[str], out_dir: Path, max_length: int = 77, vocab_size: int = 1000):
    """Train a CLIP BPE tokenizer on ``texts``; save it to ``out_dir`` and return it loaded.

    ``vocab_size`` counts the 512 byte symbols and the 2 specials, so it must exceed 514;
    fewer merges are kept when the texts do not support that many (pairs seen < 2 times)."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"{out_dir}: no non-empty training texts given to build_tokenizer")
    if vocab_size <= 514:
        raise DataError(f"build_tokenizer: vocab_size={vocab_size}; expected > 514 (512 byte symbols + 2 specials)")
    merges = _learn_merges(texts, vocab_size - 514)

    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if len(vocab) != len(vocab_list):
        raise DataError(f"{out_dir}: learnt merges produced duplicate tokens; cannot build a CLIP vocab")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": int(max_length),
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    with atomic_dir(out_dir) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
        )
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return CLIPTokenizer.from_pretrained(str(out_dir))


def load_tokenizer(path: Path):
    """CLIPTokenizer from a folder in SD's tokenizer layout (ours or SD v1.5's)."""
    from transformers import CLIPTokenizer

    path = Path(path)
    if not (path / "vocab.json").is_file() or not (path / "merges.txt").is_file():
        raise DataError(f"{path}: not a CLIP tokenizer folder; expected vocab.json and merges.txt")
    return CLIPTokenizer.from_pretrained(str(path))


def count_tokens(tokenizer, text: str) -> int:
    """Number of BPE tokens in ``text`` without the start/end specials and without truncation."""
    return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
