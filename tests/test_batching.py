"""Continuous batching (mpk.batching) on the CPU executor: requests that join a running batch at
different steps, in slots at their own positions, get exactly what LLM.generate gives them alone."""

import threading

import pytest

import tiny_tokenizers
from mpk import LLM, MpkError, SamplingParams
from mpk.batching import Batcher, Request

MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    path = make_checkpoint("qwen3", vocab_size=300)
    tiny_tokenizers.save(tiny_tokenizers.byte_level(), path)
    return LLM(str(path), backend="sim", dtype="float32", max_batch=3, max_seq_len=MAX_SEQ_LEN)


class Collected:
    """A request's callbacks, recorded."""

    def __init__(self, prompt, params):
        self.tokens, self.text, self.output, self.error = [], "", None, None
        self.request = Request(prompt, params, on_token=self.tokens.append, on_text=self._text,
                               on_done=self._done, on_error=self._error)

    def _text(self, delta: str) -> None:
        self.text += delta

    def _done(self, out) -> None:
        self.output = out

    def _error(self, e) -> None:
        self.error = e


def drain(batcher: Batcher, limit: int = 200) -> int:
    windows = 0
    while batcher.run_window():
        windows += 1
        assert windows < limit
    return windows


REQUESTS = [
    ([5, 6, 7, 8, 9, 10, 11], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)),
    ([12], SamplingParams(temperature=0.9, top_k=20, max_tokens=12, seed=4, ignore_eos=True)),
    ("the cat sat on", SamplingParams(temperature=0.7, top_p=0.9, max_tokens=5, seed=8, ignore_eos=True)),
    (list(range(20, 50)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)),
    ([3, 4], SamplingParams(temperature=1.2, max_tokens=14, seed=2, ignore_eos=True)),
    ("a dog", SamplingParams(temperature=0, max_tokens=6, stop=["x"])),
]


def test_requests_joining_a_running_batch_get_what_generate_gives(llm):
    want = [llm.generate([p], sp)[0].outputs[0] for p, sp in REQUESTS]
    batcher = Batcher(llm, window=4)
    got = [Collected(llm._encode([p])[1][0], sp) for p, sp in REQUESTS]
    for c in got[:2]:  # two start; the rest arrive while they run, and wait for free slots
        batcher.submit(c.request)
    assert batcher.run_window()
    for c in got[2:]:
        batcher.submit(c.request)
    most = 0
    while batcher.run_window():
        most = max(most, batcher.running)
    assert most == 3  # every slot was busy at some point
    for c, w in zip(got, want):
        assert c.error is None
        out = c.output.outputs[0]
        assert (out.token_ids, out.text, out.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        assert c.tokens == w.token_ids and c.text == w.text  # streamed as it was made
    assert batcher.running == 0 and batcher.waiting == 0


def test_a_cancelled_request_frees_its_slot_and_a_waiting_one_never_runs(llm):
    batcher = Batcher(llm, slots=1, window=2)
    long = Collected([1, 2], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    queued = Collected([3], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    batcher.submit(long.request)
    batcher.submit(queued.request)
    queued.request.cancel.set()
    assert batcher.run_window()
    long.request.cancel.set()
    drain(batcher)
    assert long.output is not None and long.output.outputs[0].finish_reason is None
    assert len(long.tokens) < 40
    assert queued.tokens == [] and queued.output.outputs[0].token_ids == [] and queued.output.outputs[0].finish_reason is None
    assert batcher.waiting == 0 and batcher.running == 0


def test_positions_are_per_sequence(llm):
    """After 5 steps, sequence 0 starts over at position 0 while sequence 1 goes on: each gets the
    tokens of a run from step 0."""
    from mpk.inputs import program_inputs

    tg, executor = llm._executor(2)
    _, meta = program_inputs(llm.cfg, tg, {}, [[7, 8, 9], [7, 8, 9]])
    executor.set_meta(meta)
    straight = executor.run(13, max_new_tokens=[11, 11], eos_token_ids=[]).tokens
    executor.set_meta(meta)
    first = executor.run(5, max_new_tokens=[11, 11], eos_token_ids=[]).tokens
    executor.set_tokens([7, first[-1][1]])
    then = executor.run(8, first_step=5, position_offsets=[5, 0], max_new_tokens=[11, 11], eos_token_ids=[]).tokens
    assert [t[0] for t in then] == [t[0] for t in straight[:8]]
    assert [t[1] for t in first + then] == [t[1] for t in straight]
    with pytest.raises(MpkError, match="do not fit"):
        executor.run(8, first_step=0, position_offsets=[1, 0])


def test_requests_that_cannot_run_are_refused_at_once(llm):
    batcher = Batcher(llm)
    for prompt, params, words in [
        (list(range(1, 60)), SamplingParams(max_tokens=10), "max_seq_len"),
        ([10**6], SamplingParams(), "outside the vocabulary"),
        ([], SamplingParams(), "at least one token"),
    ]:
        with pytest.raises(MpkError, match=words):
            batcher.submit(Request(prompt, params))
    assert batcher.waiting == 0


def test_requests_from_many_threads_all_finish(llm):
    batcher = Batcher(llm, window=3)
    got = [Collected([i + 1, i + 2], SamplingParams(temperature=0, max_tokens=4 + i % 3, ignore_eos=True))
           for i in range(7)]
    threads = [threading.Thread(target=batcher.submit, args=(c.request,)) for c in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    drain(batcher)
    for i, c in enumerate(got):
        assert c.output is not None and len(c.output.outputs[0].token_ids) == 4 + i % 3


def test_a_window_runs_the_smallest_batch_that_holds_its_requests(llm):
    """One request runs a batch of one; when a second joins, a batch of two; when the first leaves
    the second moves to slot 0 with its KV rows and runs alone again, getting what it gets alone."""
    batcher = Batcher(llm, window=2)
    short = Collected([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    long = Collected([8, 9], SamplingParams(temperature=0.8, max_tokens=9, seed=3, ignore_eos=True))
    batcher.submit(short.request)
    batcher.run_window()
    assert batcher.last_batch == 1
    batcher.submit(long.request)
    sizes = []
    while batcher.run_window():
        sizes.append(batcher.last_batch)
    assert sizes[0] == 2 and sizes[-1] == 1 and batcher.sizes == [1, 2, 3]
    for c, (p, sp) in ((short, ([5, 6, 7], short.request.params)), (long, ([8, 9], long.request.params))):
        assert c.output.outputs[0].token_ids == llm.generate([p], sp)[0].outputs[0].token_ids


def test_prefilling_one_slot_leaves_the_others_alone(llm):
    """prefill_slot writes the prompt's KV rows into its own slot only; the rows equal what a
    one-prompt prefill writes."""
    import torch

    from mpk.prefill import prefill_slot

    tg, executor = llm._executor(3)
    caches = [name for name, spec in tg.tensors.items() if spec.kind == "state"]
    for name in caches:
        executor.buffers[name].fill_(7.0)
    prompt = list(range(30, 50))
    assert prefill_slot(executor, llm.cfg, prompt, 1, {}, fast=False) == len(prompt) - 1
    _, alone = llm._executor(1)
    for name in caches:
        alone.buffers[name].fill_(7.0)
    prefill_slot(alone, llm.cfg, prompt, 0, {}, fast=False)
    for name in caches:
        buf = executor.buffers[name]
        assert bool((buf[0] == 7.0).all()) and bool((buf[2] == 7.0).all())
        assert torch.equal(buf[1], alone.buffers[name][0])
        assert not bool((buf[1, : len(prompt) - 1] == 7.0).any()) and bool((buf[1, len(prompt) - 1:] == 7.0).all())


@pytest.mark.parametrize("kv_block_rows", [0, 8])
def test_the_gpu_warm_up_prefill_leaves_requests_alone(make_checkpoint, monkeypatch, kv_block_rows):
    """`prepare` on the GPU prefills a dummy prompt into slot 0 (a paged cache: its scratch block);
    here the CPU executor stands in for the GPU, and requests afterwards get what they get without it."""
    path = make_checkpoint("qwen3", vocab_size=300)
    outputs = []
    for warm in (False, True):
        llm = LLM(str(path), backend="sim", dtype="float32", max_batch=2, max_seq_len=MAX_SEQ_LEN,
                  kv_block_rows=kv_block_rows)
        batcher = Batcher(llm, window=3)
        batcher.prepare()
        if warm:  # the executors exist now: the second prepare only warms up
            monkeypatch.setattr(llm, "backend", "cuda")
            batcher.prepare()
            monkeypatch.setattr(llm, "backend", "sim")
        got = [Collected(p, sp) for p, sp in REQUESTS[:2]]
        for c in got:
            batcher.submit(c.request)
        drain(batcher)
        outputs.append([c.tokens for c in got])
    assert outputs[0] == outputs[1] and all(outputs[0])


def test_the_gpu_builds_the_kernels_of_the_slot_counts_not_open_yet_at_once(make_checkpoint, monkeypatch):
    """`prepare` on the GPU builds every slot count's kernel in one `build_all` (nvcc runs side by
    side), for the executors not open yet; here the build is recorded, not run."""
    import types

    import torch

    import mpk.runtime.build as build_mod
    from mpk.codegen import generate_source

    llm = LLM(str(make_checkpoint("qwen3", vocab_size=300)), backend="sim", dtype="bfloat16", max_batch=4,
              max_seq_len=MAX_SEQ_LEN)  # the GPU's weights: their graphs generate CUDA
    llm._executor(4)
    calls = []
    monkeypatch.setattr(build_mod, "build_all", lambda sources, arch: calls.append((sources, arch)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(major=9, minor=0))
    monkeypatch.setattr(llm, "backend", "cuda")
    llm._build_kernels(4, [1, 2, 4])
    assert calls == [([generate_source(llm._compile(b)) for b in (1, 2)], "sm_90a")]
    monkeypatch.setattr(llm, "backend", "sim")
    llm._slots_executor(4, 1)
    monkeypatch.setattr(llm, "backend", "cuda")
    llm._build_kernels(4, [1, 2, 4])
    assert calls[1] == ([generate_source(llm._compile(2))], "sm_90a")
    monkeypatch.setattr(llm, "backend", "sim")
    llm._slots_executor(4, 2)
    monkeypatch.setattr(llm, "backend", "cuda")
    llm._build_kernels(4, [1, 2, 4])  # every size is open now: nothing to build
    assert len(calls) == 2
