"""Continuous batching on the GPU (mpk.batching over the megakernel): requests that join a running
batch, each prefilled into its own slot and decoded at its own position, get what the same batch
size gives them run together from step 0.

The megakernel's arithmetic per sequence does not depend on the other sequences of a batch, but
the prefill's GEMMs (cuBLAS) may round differently for a batch of one prompt and of several, so
greedy tokens are compared by request: all but one request must match exactly, and every request's
first token must. Sampled requests repeat by seed. Skipped without CUDA.
"""

from __future__ import annotations

import pytest

from gpu_build import require_gpu_build

require_gpu_build()

from mpk import LLM, SamplingParams  # noqa: E402
from mpk.batching import Batcher, Request  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12], list(range(20, 90)), [3, 4], list(range(100, 117)), [40, 41, 42]]


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    return LLM(str(make_checkpoint("qwen3")), backend="cuda", max_batch=3, max_seq_len=128)


def run_batcher(llm, params) -> list[list[int]]:
    batcher = Batcher(llm, window=3)
    outs = [None] * len(PROMPTS)

    def done(i):
        return lambda out: outs.__setitem__(i, out.outputs[0].token_ids)

    for i, p in enumerate(PROMPTS[:2]):
        batcher.submit(Request(p, params[i], on_done=done(i)))
    assert batcher.run_window()
    for i, p in enumerate(PROMPTS[2:], start=2):
        batcher.submit(Request(p, params[i], on_done=done(i)))
    while batcher.run_window():
        pass
    assert all(o is not None for o in outs)
    return outs


def test_greedy_requests_joining_a_batch_get_what_a_batch_from_step_0_gives(llm):
    params = [SamplingParams(temperature=0, max_tokens=10 + i, ignore_eos=True) for i in range(len(PROMPTS))]
    got = run_batcher(llm, params)
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], params[:3])]
    want += [o.outputs[0].token_ids for o in llm.generate(PROMPTS[3:], params[3:])]
    assert all(g[0] == w[0] for g, w in zip(got, want))
    assert sum(g == w for g, w in zip(got, want)) >= len(PROMPTS) - 1, (got, want)


def test_sampled_requests_repeat_by_seed(llm):
    params = [SamplingParams(temperature=0.9, top_k=30, max_tokens=8, seed=10 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    assert run_batcher(llm, params) == run_batcher(llm, params)
