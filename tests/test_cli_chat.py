"""`mpk chat` and the sampling flags of `mpk generate`: the command line gives what the Python API gives."""

import io
import json
import sys

import pytest

import tiny_tokenizers
from mpk import LLM, SamplingParams
from test_cli import assert_one_line_error, run_cli

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_checkpoint(make_checkpoint):
    path = make_checkpoint("llama", vocab_size=300)
    tiny_tokenizers.save(tiny_tokenizers.byte_level(), path, chat_template=TEMPLATE)
    return path


@pytest.fixture(scope="module")
def chat_llm(chat_checkpoint):
    return LLM(str(chat_checkpoint), backend="sim", dtype="float32", max_batch=1, max_seq_len=96)


def chat_cli(capsys, monkeypatch, path, stdin: str, *flags):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return run_cli(capsys, "chat", str(path), "--backend", "sim", "--dtype", "float32", "--max-seq-len", "96",
                   "--max-new-tokens", "6", *flags)


@pytest.mark.parametrize("flags, params", [
    ((), SamplingParams(temperature=0, max_tokens=6)),
    (("--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--sample-seed", "3"),
     SamplingParams(temperature=0.9, top_k=50, top_p=0.95, max_tokens=6, seed=3)),
])
def test_chat_replies_are_the_apis_over_the_kept_history(capsys, monkeypatch, chat_checkpoint, chat_llm, flags, params):
    code, out, err = chat_cli(capsys, monkeypatch, chat_checkpoint, "hi\nand then?\n", *flags)
    assert code == 0, err
    history, replies = [], []
    for turn in ("hi", "and then?"):
        history.append({"role": "user", "content": turn})
        replies.append(chat_llm.chat(history, params).outputs[0].text)
        history.append({"role": "assistant", "content": replies[-1]})
    assert out == "".join(r + "\n" for r in replies)
    assert "> " not in out  # stdin is not a terminal: no prompt


def test_chat_ends_at_exit_and_skips_blank_lines(capsys, monkeypatch, chat_checkpoint, chat_llm):
    code, out, _ = chat_cli(capsys, monkeypatch, chat_checkpoint, "\nhi\n/exit\nnever read\n")
    assert code == 0
    want = chat_llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=6))
    assert out == want.outputs[0].text + "\n"


def test_chat_needs_a_tokenizer_and_a_template(capsys, monkeypatch, make_checkpoint):
    for path, phrase in [("tiny", "no tokenizer"), (make_checkpoint("llama", tokenizer=True), "no chat template")]:
        code, out, err = chat_cli(capsys, monkeypatch, path, "hi\n")
        assert_one_line_error(code, err, phrase)
        assert out == ""


def test_generate_sampling_flags_match_the_api(capsys, chat_checkpoint, chat_llm):
    argv = ("generate", str(chat_checkpoint), "--prompt", "the cat", "--max-new-tokens", "8", "--dtype", "float32",
            "--backend", "sim", "--ignore-eos", "--json", "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9",
            "--sample-seed", "7")
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, max_tokens=8, seed=7, ignore_eos=True)
    want = chat_llm.generate("the cat", params)[0].outputs[0]
    result = json.loads(out)
    assert result["token_ids"] == want.token_ids and result["text"] == want.text


def test_generate_stop_strings_cut_the_streamed_text(capsys, chat_checkpoint, chat_llm):
    free = chat_llm.generate("the cat", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    stop = free.text[2:4]
    code, out, _ = run_cli(capsys, "generate", str(chat_checkpoint), "--prompt", "the cat", "--max-new-tokens", "8",
                           "--dtype", "float32", "--backend", "sim", "--ignore-eos", "--stop", stop, "--stop", "never")
    assert code == 0
    assert out == f"{chat_checkpoint.name}: {free.text[:free.text.index(stop)]}\n"


@pytest.mark.parametrize("argv, phrase", [
    (("--top-p", "0"), "top_p"),
    (("--temperature", "-1"), "temperature"),
    (("--stop", "x"), "stop strings need a tokenizer"),
])
def test_bad_sampling_flags_are_one_line(capsys, make_checkpoint, argv, phrase):
    code, _, err = run_cli(capsys, "generate", str(make_checkpoint("llama")), "--token-ids", "1,2", *argv)
    assert_one_line_error(code, err, phrase)
