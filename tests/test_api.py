"""The Python API: LLM.generate / generate_stream / chat on the CPU executor."""

import dataclasses
import json

import pytest

import tiny_tokenizers
from mpk import LLM, MpkError, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", backend="sim", max_batch=4, max_seq_len=48)


@pytest.fixture(scope="module")
def text_llm(make_checkpoint):
    path = make_checkpoint("llama", vocab_size=300)
    tiny_tokenizers.save(tiny_tokenizers.byte_level(), path,
                         chat_template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                       "{% if add_generation_prompt %}<assistant>{% endif %}")
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = [2]
    (path / "config.json").write_text(json.dumps(cfg))
    return LLM(str(path), backend="sim", max_batch=2, max_seq_len=64)


def test_greedy_matches_the_engine(llm):
    from mpk.engine import generate

    prompts = [[1, 2, 3], [4, 5]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    want = generate(llm.cfg, llm.source.load_weights(), prompts, 6, stop_at_eos=False)
    assert [o.outputs[0].token_ids for o in outs] == want.token_ids
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_seeded_sampling_repeats_and_the_graph_is_reused(llm):
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, max_tokens=8, seed=1, ignore_eos=True)
    a = llm.generate([[1, 2, 3], [7]], params)
    b = llm.generate([[1, 2, 3], [7]], params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    greedy = llm.generate([[1, 2, 3], [7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in a] != [o.outputs[0].token_ids for o in greedy]
    assert list(llm._executors) == [(2, 48)]


def test_bad_inputs_are_one_line_errors(llm):
    for call, words in [(lambda: llm.generate([list(range(1, 48))], SamplingParams(max_tokens=4)), "max_seq_len"),
                        (lambda: llm.generate("hello"), "no tokenizer"),
                        (lambda: llm.generate([[10**6]]), "outside the vocabulary"),
                        (lambda: SamplingParams(temperature=-1), "temperature"),
                        (lambda: SamplingParams(top_p=0), "top_p"),
                        (lambda: SamplingParams(max_tokens=0), "max_tokens")]:
        with pytest.raises(MpkError, match=words) as e:
            call()
        assert "\n" not in str(e.value)


def test_more_prompts_than_max_batch_take_turns_and_get_what_each_gets_alone(llm):
    prompts = [[i + 1, i + 2, i + 3][: 1 + i % 3] for i in range(7)]  # 7 prompts, 4 slots
    params = [SamplingParams(temperature=0.8 if i % 2 else 0, max_tokens=3 + i, seed=i, ignore_eos=True)
              for i in range(7)]
    streamed: dict[int, list[int]] = {}
    outs = llm.generate(prompts, params, on_token=lambda i, t: streamed.setdefault(i, []).append(t))
    alone = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in alone]
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [streamed[i] for i in range(7)] == [o.outputs[0].token_ids for o in outs]


def test_text_prompts_stop_strings_and_streaming(text_llm):
    free = text_llm.generate("the cat", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    out = free.outputs[0]
    assert out.text and len(out.token_ids) == 12
    stop = out.text[3:5]
    cut = text_llm.generate(["the cat"], SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert cut.outputs[0].text == out.text[:out.text.index(stop)]
    assert cut.outputs[0].finish_reason == "stop"
    pieces = list(text_llm.generate_stream("the cat", SamplingParams(temperature=0, max_tokens=12, stop=stop,
                                                                      ignore_eos=True)))
    assert "".join(pieces) == cut.outputs[0].text


def test_eos_stops_with_reason_stop(text_llm):
    out = text_llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    eos = out.token_ids[2]
    text_llm.cfg = dataclasses.replace(text_llm.cfg, eos_token_ids=(eos,))
    try:
        stopped = text_llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    finally:
        text_llm.cfg = dataclasses.replace(text_llm.cfg, eos_token_ids=(2,))
    assert stopped.token_ids == out.token_ids[:out.token_ids.index(eos) + 1]
    assert stopped.finish_reason == "stop"


def test_chat_applies_the_checkpoints_template(text_llm):
    out = text_llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert out.prompt == "<user>hi<assistant>"
    assert out.prompt_token_ids == text_llm.tokenizer.encode(out.prompt, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) == 4
    with pytest.raises(MpkError, match="role"):
        text_llm.chat([{"content": "no role"}])
