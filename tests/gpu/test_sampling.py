"""Sampling inside the megakernel (mpk/csrc/sampling.cuh) against the CPU sampler (mpk.sampling).

- The kernel's draw equals the CPU sampler's on the kernel's own logits, position by position
  (the two sum probabilities differently, so a draw within ~1e-7 of a token boundary may differ).
- A seed gives the same tokens on every run; another seed gives other tokens.
- The sampled distribution matches softmax(logits / T) by a chi-square test on a small vocabulary.
- top-k and top-p keep exactly the tokens the reference keeps; top-k 1 is greedy.
- On a vocabulary larger than the candidate buffer, top-k draws narrowed to shared memory and
  draws over the whole row both equal the CPU sampler's.
- With tensor parallelism the draw over two GPUs' vocabulary slices is the one-GPU draw.
Skipped without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from mpk import sampling  # noqa: E402
from mpk.compiler import compile_model  # noqa: E402
from mpk.inputs import fuse_weights, program_inputs  # noqa: E402
from mpk.models.checkpoint import load_checkpoint  # noqa: E402
from mpk.runtime import Megakernel  # noqa: E402


@pytest.fixture(scope="module")
def model(make_checkpoint):
    """A tiny checkpoint with a small vocabulary, so the chi-square test has few cells."""
    cfg, hf = load_checkpoint(make_checkpoint("llama", vocab_size=24, initializer_range=0.5))
    return cfg, {k: v.to(torch.bfloat16) for k, v in hf.items()}


def kernel(cfg, hf, prompts, steps, params, tp=1):
    tg = compile_model(cfg, batch=len(prompts), max_seq_len=steps, tp_size=tp, num_sms=8)
    weights, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, tp, torch.bfloat16), prompts, params)
    return Megakernel(tg, weights=weights, meta=meta)


def test_draws_equal_the_cpu_sampler_on_the_kernels_logits(model):
    cfg, hf = model
    prompts = [[1, 2], [3], [4, 5, 6], [7]]
    params = [(0.8, 0, 1.0, 11), (1.3, 5, 1.0, 12), (1.0, 0, 0.7, 13), (0.6, 8, 0.9, 14)]
    steps = 24
    mk = kernel(cfg, hf, prompts, steps, params)
    res = mk.run(steps, eos_token_ids=[], collect_logits=True)
    agree = total = 0
    for s in range(steps - 1):
        for b, (p, (t, k, top_p, seed)) in enumerate(zip(prompts, params)):
            if s + 1 < len(p):
                assert res.tokens[s][b] == p[s + 1]  # inside the prompt: the prompt's token
                continue
            want = sampling.sample(res.logits[s][b], t, k, top_p, seed, s + 1)
            agree += res.tokens[s][b] == want
            total += 1
    assert agree >= total - 1, f"{agree} of {total} draws equal the CPU sampler's"


def test_a_seed_repeats_and_another_seed_differs(model):
    cfg, hf = model
    prompts = [[1]] * 4
    runs = []
    for seeds in ((5, 6, 7, 8), (5, 6, 7, 8), (9, 10, 11, 12)):
        mk = kernel(cfg, hf, prompts, 32, [(1.0, 0, 1.0, s) for s in seeds])
        runs.append(mk.run(32, eos_token_ids=[]).tokens)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    # Sequences with the same prompt and different seeds go their own ways.
    assert len({tuple(step[b] for step in runs[0]) for b in range(4)}) > 1


def test_sampled_distribution_matches_the_softmax(model):
    """One position, many seeds: counts of each token against softmax(logits / T) * n."""
    cfg, hf = model
    batch, launches, temperature = 8, 60, 1.5
    prompt = [3, 1, 4]
    counts = torch.zeros(cfg.vocab_size, dtype=torch.float64)
    logits = None
    tg = compile_model(cfg, batch=batch, max_seq_len=len(prompt), num_sms=8)
    weights, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, 1, torch.bfloat16), [prompt] * batch)
    mk = Megakernel(tg, weights=weights, meta=meta)
    for launch in range(launches):
        seeds = [(temperature, 0, 1.0, 1000 * launch + b) for b in range(batch)]
        mk.set_meta(program_inputs(cfg, tg, {}, [prompt] * batch, seeds)[1])
        res = mk.run(len(prompt), eos_token_ids=[], collect_logits=logits is None)
        if logits is None:
            logits = res.logits[-1][0]
        for b in range(batch):
            counts[res.tokens[-1][b]] += 1
    n = batch * launches
    expected = torch.softmax(logits.double() / temperature, 0) * n
    kept = expected >= 5  # chi-square needs enough expected counts per cell; pool the rest
    observed = torch.cat([counts[kept], counts[~kept].sum(0, keepdim=True)])
    want = torch.cat([expected[kept], expected[~kept].sum(0, keepdim=True)])
    chi2 = float(((observed - want) ** 2 / want).sum())
    dof = len(want) - 1
    z = 3.09  # the 99.9th percentile (Wilson-Hilferty)
    bound = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < bound, (chi2, bound, observed.tolist(), want.tolist())


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.5), (1, 1.0)])
def test_truncation_keeps_exactly_the_reference_set(model, top_k, top_p):
    cfg, hf = model
    batch, steps = 8, 12
    prompts = [[2]] * batch
    mk = kernel(cfg, hf, prompts, steps, [(2.0, top_k, top_p, 100 + b) for b in range(batch)])
    res = mk.run(steps, eos_token_ids=[], collect_logits=True)
    for s in range(steps - 1):
        for b in range(batch):
            row = res.logits[s][b]
            allowed = set(sampling.truncated_probs(row, 2.0, top_k, top_p)[0].tolist())
            assert res.tokens[s][b] in allowed, (s, b, res.tokens[s][b], allowed)
            if top_k == 1:
                assert res.tokens[s][b] == sampling.greedy(row)


def test_top_k_draws_narrowed_to_shared_memory_equal_the_cpu_sampler(make_checkpoint):
    """A vocabulary larger than the kernel's candidate buffer (4096 tokens): top-k draws of up to
    4096 narrow the row to its top first, larger ones and top-p alone work on the whole row; every
    kind of draw equals the CPU sampler's on the kernel's logits."""
    cfg, hf = load_checkpoint(make_checkpoint("llama", vocab_size=6000, initializer_range=0.3))
    hf = {k: v.to(torch.bfloat16) for k, v in hf.items()}
    prompts = [[1], [2], [3], [4], [5], [6]]
    params = [(1.0, 50, 1.0, 31), (0.8, 40, 0.8, 32), (1.2, 1, 1.0, 33), (1.0, 4096, 0.95, 34),
              (1.0, 5000, 1.0, 35), (1.0, 0, 0.9, 36)]
    steps = 16
    res = kernel(cfg, hf, prompts, steps, params).run(steps, eos_token_ids=[], collect_logits=True)
    agree = total = 0
    for s in range(steps - 1):
        for b, (t, k, top_p, seed) in enumerate(params):
            agree += res.tokens[s][b] == sampling.sample(res.logits[s][b], t, k, top_p, seed, s + 1)
            total += 1
    assert agree >= total - 1, f"{agree} of {total} draws equal the CPU sampler's"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_parallel_draws_equal_one_gpus(model):
    cfg, hf = model
    prompts = [[1, 2], [3]]
    params = [(1.0, 0, 1.0, 21), (0.7, 6, 0.9, 22)]
    one = kernel(cfg, hf, prompts, 20, params).run(20, eos_token_ids=[]).tokens
    two = kernel(cfg, hf, prompts, 20, params, tp=2).run(20, eos_token_ids=[]).tokens
    same = sum(a == b for a, b in zip(one, two))
    assert same >= len(one) - 1, (one, two)


def test_the_api_samples_on_the_gpu(make_checkpoint):
    """`LLM.generate` with temperature on the GPU backend: repeatable by seed, and the CPU executor's
    draws on its own (bf16) logits, bar draws at a probability boundary."""
    from mpk import LLM, SamplingParams

    path = str(make_checkpoint("qwen3", tokenizer=True))
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=8, seed=3, ignore_eos=True)
    with LLM(path, backend="cuda", max_batch=2) as llm:
        first = llm.generate(["the cat", "a dog"], params)
        again = llm.generate(["the cat", "a dog"], params)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    assert all(len(o.outputs[0].token_ids) == 8 and o.outputs[0].finish_reason == "length" for o in first)
