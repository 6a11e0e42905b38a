"""The tokenizer: tokenizer.json read with the `tokenizers` library alone, encoding as transformers does."""

from __future__ import annotations

import json
import sys

import pytest

import tiny_tokenizers as tt
from mpk.errors import MpkError
from mpk.models.tokenizer import load_tokenizer
from test_cli import assert_one_line_error, run_cli

TEXTS = ["hello world", "the cat sat on the mat", "a dog ran and the cat sat", "café", "hello  world ☃"]

# Where tokenizer.json's post-processor alone decides the special tokens, transformers is the reference.
KINDS = {
    "sentencepiece-bos-template": tt.sentencepiece_style,
    "sentencepiece-no-template": lambda: tt.sentencepiece_style(with_bos_template=False),
    "byte-level": tt.byte_level,
    "word-level": tt.word_level,
}


@pytest.mark.parametrize("kind", KINDS)
def test_encodes_and_decodes_as_transformers(tmp_path, kind):
    from transformers import AutoTokenizer

    tt.save(KINDS[kind](), tmp_path)
    ours, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, (text, ours.encode(text), ids)
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_id == theirs.eos_token_id == 2 and ours.bos_token_id == theirs.bos_token_id == 1


# tokenizer_config.json's add_bos_token / add_eos_token, when present, decide alone, as transformers'
# Llama-family fast tokenizers rebuild their post-processor from them (hello=28, world=29).
@pytest.mark.parametrize("template, config, ids", [
    (False, {"add_bos_token": True}, [1, 28, 29]),  # a conversion whose tokenizer.json forgot the BOS
    (True, {"add_bos_token": False}, [28, 29]),
    (True, {"add_bos_token": True, "add_eos_token": True}, [1, 28, 29, 2]),
    (True, {}, [1, 28, 29]),
])
def test_add_bos_and_eos_flags_decide_where_given(tmp_path, template, config, ids):
    tt.save(tt.sentencepiece_style(with_bos_template=template), tmp_path, **config)
    assert load_tokenizer(tmp_path).encode("hello world") == ids


def test_loads_and_generates_without_transformers(capsys, monkeypatch, make_checkpoint):
    ckpt = make_checkpoint("llama", vocab_size=128)
    tt.save(tt.sentencepiece_style(), ckpt)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails, as in a bare install
    tok = load_tokenizer(ckpt)
    assert tok.encode("hello world") == [1, 28, 29]
    code, out, err = run_cli(capsys, "generate", str(ckpt), "--prompt", "hello world", "--max-new-tokens", "3",
                             "--ignore-eos", "--json", "--quiet")
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 3


def test_slow_tokenizer_only_is_one_line_and_token_ids_still_run(capsys, make_checkpoint):
    ckpt = make_checkpoint("llama")
    (ckpt / "tokenizer.model").write_bytes(b"\x00sentencepiece model")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(MpkError, match="no tokenizer.json"):
        load_tokenizer(ckpt)
    code, _, err = run_cli(capsys, "generate", str(ckpt), "--prompt", "hello")
    assert_one_line_error(code, err, "tokenizer.model", "no tokenizer.json", "save_pretrained", "--token-ids")
    code, out, err = run_cli(capsys, "generate", str(ckpt), "--token-ids", "3,4", "--max-new-tokens", "2",
                             "--ignore-eos", "--json")
    assert code == 0 and len(json.loads(out)["token_ids"]) == 2
    assert "printing token ids, not text" in err


def test_missing_tokenizers_package_is_one_line(capsys, monkeypatch, make_checkpoint):
    ckpt = make_checkpoint("llama", tokenizer=True)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    code, _, err = run_cli(capsys, "generate", str(ckpt), "--prompt", "the cat")
    assert_one_line_error(code, err, "pip install tokenizers")


def test_unreadable_tokenizer_config_is_one_line(capsys, make_checkpoint):
    ckpt = make_checkpoint("llama", tokenizer=True)
    (ckpt / "tokenizer_config.json").write_text("{ not json")
    code, _, err = run_cli(capsys, "generate", str(ckpt), "--prompt", "the cat")
    assert_one_line_error(code, err, "tokenizer_config.json", "re-download")


def test_tokenizer_eos_stops_generation_when_config_names_none(capsys, make_checkpoint):
    ckpt = make_checkpoint("llama", vocab_size=128, eos_token_id=None, bos_token_id=None)
    tok = tt.sentencepiece_style()
    tt.save(tok, ckpt)
    argv = ("generate", str(ckpt), "--token-ids", "3,4", "--max-new-tokens", "12", "--json", "--quiet")
    free = json.loads(run_cli(capsys, *argv, "--ignore-eos")[1])["token_ids"]
    # Name the third token the model picks as the tokenizer's EOS: generation must stop at it.
    tt.save(tok, ckpt, eos_token=tok.id_to_token(free[2]))
    stopped = json.loads(run_cli(capsys, *argv)[1])["token_ids"]
    assert stopped == free[:free.index(free[2]) + 1]
