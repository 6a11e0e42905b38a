"""Tiny tokenizers of the three kinds real checkpoints ship, built with the `tokenizers` library alone.

- `sentencepiece_style`: Llama-2 / Mistral: '▁' marks a word start, a decoder that strips the first
  space of every decode, byte-fallback tokens <0x..> for characters outside the vocabulary.
- `byte_level`: GPT-2 / Qwen / Llama-3: every byte is a token, so a multi-byte character spans tokens.
- `word_level`: whitespace-split words (as `conftest.save_tiny_tokenizer`, without transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "and", "hello", "world", "café"]


def sentencepiece_style(with_bos_template: bool = True) -> Tokenizer:
    """Llama-2's layout (normalizer prepends '▁' and turns spaces into '▁') over specials (ids 0-2), '▁',
    letters and words, then the 256 byte-fallback tokens: ids below 128 decode to valid text."""
    pieces = [(s, 0.0) for s in SPECIALS] + [("▁", -2.0)]
    pieces += [(c, -5.0) for c in sorted(set("".join(WORDS)) - {"é"})]
    pieces += [("▁" + w, -1.0) for w in WORDS if "é" not in w]
    pieces += [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    if with_bos_template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def byte_level() -> Tokenizer:
    """A byte-level BPE without merges: every UTF-8 byte of the text is its own token (ids 3-258)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def word_level() -> Tokenizer:
    vocab = {s: i for i, s in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = None
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def save(tok: Tokenizer, path: Path, **config) -> Path:
    """Write tokenizer.json and a tokenizer_config.json (bos/eos names plus `config`) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", **config}))
    return path
