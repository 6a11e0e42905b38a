"""A checkpoint's tokenizer, read from its tokenizer.json with the `tokenizers` library (no transformers).

Special tokens are added by tokenizer.json's post-processor, unless tokenizer_config.json sets
add_bos_token or add_eos_token, which then decide alone, as transformers' Llama-family fast
tokenizers rebuild their post-processor from them (docs/decisions.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpk.errors import MpkError
from mpk.models.config import read_json_object

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# What a checkpoint without tokenizer.json may still hold: a "slow" tokenizer only transformers reads.
SLOW_TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt")


@dataclass(frozen=True)
class Tokenizer:
    """Text <-> token ids for one checkpoint."""

    backend: object  # a tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos_token: bool | None = None  # None: tokenizer.json's post-processor decides
    add_eos_token: bool | None = None
    chat_template: str | None = None  # tokenizer_config.json's Jinja template for chat messages

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not add_special_tokens:
            return list(self.backend.encode(text, add_special_tokens=False).ids)
        if self.add_bos_token is None and self.add_eos_token is None:
            return list(self.backend.encode(text, add_special_tokens=True).ids)
        ids = list(self.backend.encode(text, add_special_tokens=False).ids)
        if self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer saved in `path`, or None when it has no tokenizer files; a broken or
    unreadable one is an MpkError that says what to do."""
    path = Path(path)
    present = [f for f in (TOKENIZER_JSON, TOKENIZER_CONFIG, *SLOW_TOKENIZER_FILES) if (path / f).is_file()]
    if not present:
        return None
    if TOKENIZER_JSON not in present:
        raise MpkError(
            f"{path} has a tokenizer ({', '.join(present)}) but no tokenizer.json, which mpk reads; write one with "
            f"`python -c \"from transformers import AutoTokenizer as T; T.from_pretrained('{path}').save_pretrained('{path}')\"`"
            ", or pass --token-ids"
        )
    try:
        from tokenizers import Tokenizer as Backend
    except ImportError:
        raise MpkError("the tokenizers package is missing (pip install tokenizers), or pass --token-ids") from None
    try:
        backend = Backend.from_file(str(path / TOKENIZER_JSON))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise MpkError(
            f"the tokenizer in {path} does not load ({_first_line(e)}); re-download tokenizer.json, "
            "or pass token ids instead of text"
        ) from None
    config = {**_read_json(path / SPECIAL_TOKENS_MAP), **_read_json(path / TOKENIZER_CONFIG)}
    return Tokenizer(
        backend,
        bos_token_id=_token_id(backend, config.get("bos_token")),
        eos_token_id=_token_id(backend, config.get("eos_token")),
        add_bos_token=_flag(config, "add_bos_token"),
        add_eos_token=_flag(config, "add_eos_token"),
        chat_template=config.get("chat_template") if isinstance(config.get("chat_template"), str) else None,
    )


def _read_json(file: Path) -> dict:
    return read_json_object(file) or {}


def _token_id(backend, token) -> int | None:
    """The id of a special token as tokenizer_config.json names it: a string or {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _flag(config: dict, key: str) -> bool | None:
    return bool(config[key]) if config.get(key) is not None else None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
