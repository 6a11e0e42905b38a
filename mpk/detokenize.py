"""Incremental detokenization: the text of a growing token sequence, one new piece per token.

Decoding each token alone loses what depends on its neighbours: a SentencePiece decoder drops
the space that a leading '▁' stands for at the start of every decode (Llama-2, Mistral), and a
character whose UTF-8 bytes span two tokens comes out as U+FFFD. So, as the streaming APIs of
vLLM and transformers do, each new token re-decodes a short window that starts before the last
emitted piece, and only what the window gained is emitted; while the window ends in an
incomplete character, nothing is (for at most MAX_HELD tokens: bytes that never complete a
character are shown as U+FFFD rather than held back to the end).
"""

from __future__ import annotations

from typing import Callable, Sequence

PROMPT_CONTEXT = 5  # prompt tokens decoded ahead of the first new token, so its leading space survives
INCOMPLETE = "\ufffd"  # what a decoder makes of a UTF-8 sequence cut short
MAX_HELD = 4  # a UTF-8 character has at most 4 bytes, so it spans at most 4 tokens


class IncrementalDetokenizer:
    """`push(token)` returns the text that token adds; `flush()` returns what is still held back."""

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int] = ()):
        self._decode = decode
        self._ids = list(prompt_ids)[-PROMPT_CONTEXT:]  # the window: context, then tokens not yet emitted
        self._read = len(self._ids)  # tokens before this index are emitted (or are prompt)

    def push(self, token: int) -> str:
        self._ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self._ids[:self._read])
        after = self._decode(self._ids)
        held = len(self._ids) - self._read
        if len(after) <= len(before) or (after.endswith(INCOMPLETE) and not final and held < MAX_HELD):
            return ""
        # The window moves up: the tokens just emitted are the next piece's context, older ones go.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return after[len(before):]


def continuation_text(decode: Callable[[list[int]], str], prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text `new_ids` add after the prompt: the same pieces streaming emits, joined."""
    detok = IncrementalDetokenizer(decode, prompt_ids)
    return "".join(detok.push(t) for t in new_ids) + detok.flush()
