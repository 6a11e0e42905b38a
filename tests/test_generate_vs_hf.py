"""The CPU executor against Hugging Face transformers: same greedy tokens, logits within 1e-4.

Each case writes a tiny random checkpoint with `save_pretrained`, loads it through mpk's own
loader, compiles the verified task graph and runs it on the sim (float32, NaN-poisoned
activations, a random valid task order).
"""

import dataclasses

import pytest
import torch

from conftest import hf_model_from
from mpk.engine import generate
from mpk.graph import ONE_PASS_ATTN_ROWS
from mpk.models import resolve_model

NEW_TOKENS = 16
LOGIT_RTOL = 1e-4

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 10000.0}

CASES = {
    # name: (family, config overrides, batch, tp)
    "llama-gqa1": ("llama", dict(num_attention_heads=4, num_key_value_heads=4), 1, 1),
    "llama-gqa2-batch4": ("llama", dict(num_attention_heads=4, num_key_value_heads=2), 4, 1),
    "llama-gqa4-tied": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True), 1, 1),
    "llama-gqa8-rope-scaling": ("llama", dict(num_attention_heads=8, num_key_value_heads=1, rope_parameters=LLAMA3_ROPE), 1, 1),
    "llama-odd-sizes-batch4": ("llama", dict(hidden_size=75, num_attention_heads=5, num_key_value_heads=1,
                                             intermediate_size=97, vocab_size=131), 4, 1),
    "qwen2-bias": ("qwen2", dict(), 1, 1),
    "qwen2-bias-tp2-batch4": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2), 4, 2),
    "qwen3-qknorm-batch4": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=2), 4, 1),
    "qwen3-tp2-tied": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                                     intermediate_size=98), 1, 2),
    "mistral-sliding-window": ("mistral", dict(sliding_window=8), 1, 1),
    "llama-tp2-odd-batch4": ("llama", dict(hidden_size=60, num_attention_heads=4, num_key_value_heads=2,
                                           intermediate_size=98, vocab_size=127), 4, 2),
    # Four and eight ranks simulated together (the GPU runs need machines of 4 and 8 GPUs).
    "qwen3-tp4-batch4": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=4), 4, 4),
    "llama-tp8": ("llama", dict(num_attention_heads=8, num_key_value_heads=8, vocab_size=130), 1, 8),
}


# Cases whose longest prompt makes a graph past mpk.graph.ONE_PASS_ATTN_ROWS: attention splits over the
# KV length and a merge. The others attend in one pass per (sequence, KV group).
SPLIT_CASES = {"llama-gqa8-rope-scaling", "mistral-sliding-window", "qwen3-tp2-tied"}
LONG_PROMPT = {False: 40, True: ONE_PASS_ATTN_ROWS + 12}


def prompts_for(batch: int, vocab: int, seed: int, split: bool = False) -> list[list[int]]:
    """Prompts of different lengths per sequence; one long enough for several attention loop rounds."""
    g = torch.Generator().manual_seed(seed)
    long = LONG_PROMPT[split]
    lengths = [5, 3, long, 1][:batch] if batch > 1 else [long]
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_sim_matches_transformers(case, make_checkpoint):
    family, overrides, batch, tp = CASES[case]
    path = make_checkpoint(family, **overrides)
    source = resolve_model(str(path))
    weights = source.load_weights(torch.float32)
    hf = hf_model_from(path)
    prompts = prompts_for(batch, source.cfg.vocab_size, seed=len(case), split=case in SPLIT_CASES)

    out = generate(source.cfg, weights, prompts, NEW_TOKENS, dtype="float32", num_sms=8, tp_size=tp,
                   seed=7, stop_at_eos=False)
    for b, prompt in enumerate(prompts):
        assert out.token_ids[b] == hf_greedy(hf, prompt, NEW_TOKENS), f"sequence {b} of {case}"

    # Teacher-forced: feed prompt + generated tokens; every step's logits against one HF forward pass.
    for b in {0, batch - 1}:
        full = prompts[b] + out.token_ids[b]
        forced = generate(source.cfg, weights, [full], 1, dtype="float32", num_sms=8, tp_size=tp, seed=b,
                          stop_at_eos=False, collect_logits=True)
        ours = torch.stack([step[0] for step in forced.logits])
        with torch.no_grad():
            ref = hf(torch.tensor([full])).logits[0]
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) < LOGIT_RTOL


@pytest.mark.parametrize("split", [False, True])
def test_attention_is_split_over_the_kv_length_in_the_long_cases_only(make_checkpoint, split):
    from mpk.compiler import compile_model

    family, overrides, batch, tp = CASES["llama-gqa8-rope-scaling"]
    cfg = resolve_model(str(make_checkpoint(family, **overrides))).cfg
    tg = compile_model(cfg, batch=batch, max_seq_len=LONG_PROMPT[split] + NEW_TOKENS - 1, num_sms=8, tp_size=tp)
    splits = {t.tile[2] for t in tg.tasks if tg.ops[t.op].kind == "attention_split"}
    one_pass = [t for t in tg.tasks if tg.ops[t.op].kind == "attention"]
    assert (len(splits) > 1 and not one_pass) if split else (one_pass and not splits)


def test_different_task_orders_give_identical_tokens(make_checkpoint):
    path = make_checkpoint("qwen3", num_attention_heads=8, num_key_value_heads=2)
    source = resolve_model(str(path))
    weights = source.load_weights(torch.float32)
    runs = [generate(source.cfg, weights, [[5, 6, 7]], 8, dtype="float32", num_sms=6, seed=s, stop_at_eos=False)
            for s in (1, 2, 3)]
    assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids


def test_generation_stops_at_eos(make_checkpoint):
    path = make_checkpoint("llama")
    source = resolve_model(str(path))
    weights = source.load_weights(torch.float32)
    free = generate(source.cfg, weights, [[4, 9, 10]], 8, stop_at_eos=False, num_sms=4)
    eos = free.token_ids[0][3]
    first = free.token_ids[0].index(eos)
    cfg = dataclasses.replace(source.cfg, eos_token_ids=(eos,))
    stopped = generate(cfg, weights, [[4, 9, 10]], 8, num_sms=4)
    assert stopped.token_ids[0] == free.token_ids[0][: first + 1]
    assert stopped.steps < free.steps
