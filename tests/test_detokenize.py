"""Incremental detokenization: streamed pieces join to the text a whole decode gives, spaces and
multi-byte characters included, where decoding token by token does not."""

from __future__ import annotations

import json

import pytest

import tiny_tokenizers as tt
from mpk.detokenize import MAX_HELD, IncrementalDetokenizer, continuation_text
from mpk.models.tokenizer import load_tokenizer
from test_cli import run_cli

PROMPT = "hello world"
TEXT = " the cat sat on the mat café ☃ and a dog"


def stream(tok, prompt_ids, new_ids) -> list[str]:
    detok = IncrementalDetokenizer(lambda ids: tok.decode(ids, skip_special_tokens=True), prompt_ids)
    return [detok.push(t) for t in new_ids] + [detok.flush()]


@pytest.mark.parametrize("make", [tt.sentencepiece_style, tt.byte_level])
def test_streamed_pieces_join_to_the_whole_text(make):
    tok = make()
    prompt_ids = tok.encode(PROMPT).ids
    new_ids = tok.encode(PROMPT + TEXT).ids[len(prompt_ids):]
    assert tok.decode(prompt_ids + new_ids) == PROMPT + TEXT
    pieces = stream(tok, prompt_ids, new_ids)
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)  # a character split over tokens comes out whole
    one_by_one = "".join(tok.decode([t]) for t in new_ids)
    assert one_by_one != TEXT  # what streaming token by token printed before


def test_sentencepiece_one_by_one_loses_spaces_and_streaming_keeps_them():
    tok = tt.sentencepiece_style()
    prompt_ids = tok.encode("hello").ids
    new_ids = tok.encode("hello world the cat", add_special_tokens=False).ids[1:]
    assert "".join(tok.decode([t]) for t in new_ids) == "worldthecat"
    assert "".join(stream(tok, prompt_ids, new_ids)) == " world the cat"


def test_bytes_that_never_complete_a_character_are_not_held_forever():
    tok = tt.byte_level()
    lone = tok.encode("é").ids[:1]  # the first byte of a two-byte character, repeated: never valid UTF-8
    pieces = stream(tok, [], lone * (2 * MAX_HELD))
    assert any(pieces[:-1]), "the invalid bytes came out only at the end"


def test_continuation_text_starts_with_the_space_after_the_prompt():
    tok = tt.sentencepiece_style()
    prompt_ids = tok.encode(PROMPT).ids
    new_ids = tok.encode(PROMPT + " the cat", add_special_tokens=False).ids[2:]
    assert continuation_text(tok.decode, prompt_ids, new_ids) == " the cat"


def test_cli_streams_what_a_whole_decode_gives(capsys, make_checkpoint):
    # Ids below 128 are words, letters and ASCII bytes, so the random model writes valid text.
    ckpt = make_checkpoint("llama", vocab_size=128)
    tt.save(tt.sentencepiece_style(), ckpt)
    base = ("generate", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "12", "--ignore-eos", "--quiet")
    code, out, _ = run_cli(capsys, *base)
    assert code == 0
    streamed = out.split(": ", 1)[1].removesuffix("\n")
    result = json.loads(run_cli(capsys, *base, "--json")[1])
    tok = load_tokenizer(ckpt)
    prompt_ids = tok.encode(PROMPT)
    whole = tok.decode(prompt_ids + result["token_ids"])
    assert streamed == result["text"] == whole[len(tok.decode(prompt_ids)):]
