"""Load a checkpoint's tokenizer with transformers, if it ships one (presets and bare checkpoints do not)."""

from __future__ import annotations

from pathlib import Path

from mpk.errors import MpkError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(path: str | Path):
    """The tokenizer saved in `path`, or None when there is none; a broken one is an MpkError."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # heavy: import only when a tokenizer is really needed

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # tokenizers, json and transformers all raise their own types for a bad file
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        raise MpkError(
            f"the tokenizer in {path} does not load ({reason}); re-download tokenizer.json and tokenizer_config.json, "
            "or pass token ids instead of text"
        ) from None
