"""Paged KV cache on the GPU (mpk.paging): the megakernel reading and writing K/V rows through a block
table computes exactly what it computes over contiguous caches, whatever blocks the table names; and
the API, the prefill paths and the batcher over a paged cache give what they give without one.
Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from gpu_build import require_gpu_build

require_gpu_build()

from test_megakernel import checkpoint  # noqa: E402,F401

from mpk import LLM, SamplingParams  # noqa: E402
from mpk.batching import Batcher, Request  # noqa: E402
from mpk.compiler import compile_model  # noqa: E402
from mpk.inputs import fuse_weights, program_inputs  # noqa: E402
from mpk.paging import BlockPool, KvPages  # noqa: E402
from mpk.prefill import prefill_graphs, prefill_ops  # noqa: E402
from mpk.runtime import Megakernel  # noqa: E402

CASES = {  # name: (family, overrides): head_dim 16 and 128, q/k-norm, a sliding window
    "qwen3": ("qwen3", {}),
    "mistral-window": ("mistral", {"sliding_window": 9}),
    "llama-hd128": ("llama", {"hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8,
                              "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 1000}),
}
STEPS = 40
BLOCK_ROWS = 8


def scrambled_table(batch: int) -> tuple[KvPages, torch.Tensor]:
    """Blocks handed out to the sequences in turn, so each one's blocks are spread over the pool."""
    blocks_per_seq = -(-STEPS // BLOCK_ROWS)
    pool = BlockPool(batch * blocks_per_seq + 3, BLOCK_ROWS, batch, STEPS)
    for rows in range(BLOCK_ROWS, STEPS + BLOCK_ROWS, BLOCK_ROWS):
        for slot in reversed(range(batch)):
            pool.grow(slot, rows)
    return KvPages(pool.num_blocks, BLOCK_ROWS), pool.table()


@pytest.mark.parametrize("prefill", ["none", "ops", "graphs"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_megakernel_over_a_paged_cache_computes_what_it_computes_without(checkpoint, case, prefill):
    family, overrides = CASES[case]
    cfg, hf = checkpoint(f"{case}-paged", family, {**overrides, "max_position_embeddings": 64})
    tg = compile_model(cfg, batch=2, max_seq_len=STEPS, num_sms=torch.cuda.get_device_properties(0).multi_processor_count)
    seqs = torch.randint(0, cfg.vocab_size, (2, STEPS), generator=torch.Generator().manual_seed(1)).tolist()
    weights, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, 1, torch.bfloat16), seqs)
    pages, table = scrambled_table(2)
    results = []
    for kv_pages in (None, pages):
        with Megakernel(tg, weights=weights, meta=meta, kv_pages=kv_pages) as mk:
            if kv_pages is not None:
                mk.set_kv_table(table)
            first, graphs = 0, {}
            if prefill == "ops":
                first = prefill_ops(mk, cfg, [s[:25] for s in seqs], fast=False)
            elif prefill == "graphs":
                first = prefill_graphs(mk, cfg, [s[:25] for s in seqs], graphs)
            res = mk.run(STEPS - first, first_step=first, collect_logits=True, eos_token_ids=[])
            for graph in graphs.values():
                graph.close()
            results.append(res)
    contiguous, paged = results
    assert paged.tokens == contiguous.tokens
    differ = [(s, (p - c).abs().max().item()) for s, (p, c) in enumerate(zip(paged.logits, contiguous.logits))
              if not torch.equal(p, c)]
    assert not differ, f"{len(differ)} steps differ, first (step, largest difference): {differ[0]}"


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return str(make_checkpoint("qwen3"))


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12], list(range(20, 90)), [3, 4]]
PARAMS = [SamplingParams(temperature=0, max_tokens=10 + i, ignore_eos=True) for i in range(len(PROMPTS))]


def test_generate_and_the_batcher_over_a_paged_cache(path):
    plain = LLM(path, backend="cuda", max_batch=2, max_seq_len=128)
    paged = LLM(path, backend="cuda", max_batch=2, max_seq_len=128, kv_block_rows=16, kv_blocks=12)
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS[:2], PARAMS[:2])]
    assert [o.outputs[0].token_ids for o in paged.generate(PROMPTS[:2], PARAMS[:2])] == want
    # 11 blocks of 16 rows: the 80-row request waits for blocks, then prefills 32 rows a window.
    batcher = Batcher(paged, window=3, prefill_rows=32)
    outs = [None] * len(PROMPTS)
    for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS)):
        batcher.submit(Request(p, sp, on_done=lambda out, i=i: outs.__setitem__(i, out.outputs[0].token_ids)))
    while batcher.run_window():
        assert batcher.kv_blocks_in_use() <= 11
    alone = [plain.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(PROMPTS, PARAMS)]
    # The prefill's cuBLAS GEMMs may round a one-prompt batch differently (test_batching_gpu): all but one match.
    assert all(o[0] == a[0] for o, a in zip(outs, alone))
    assert sum(o == a for o, a in zip(outs, alone)) >= len(PROMPTS) - 1, (outs, alone)
    assert batcher.kv_blocks_in_use() == 0


def test_a_shared_prefix_on_the_gpu(path):
    plain = LLM(path, backend="cuda", max_batch=2, max_seq_len=128)
    paged = LLM(path, backend="cuda", max_batch=2, max_seq_len=128, kv_block_rows=16)
    system = list(range(60, 110))  # 50 tokens: 3 whole blocks of 16 rows
    prompts = [system + [5, 6, 7], system + [9]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    batcher = Batcher(paged, window=3)
    outs = [None, None]
    for i, p in enumerate(prompts):  # one after the other: the second takes the first's blocks
        batcher.submit(Request(p, params, on_done=lambda out, i=i: outs.__setitem__(i, out.outputs[0].token_ids)))
        while batcher.run_window():
            pass
        assert batcher.pool.in_use == 0 and len(batcher.pool.idle) == 3
    alone = [plain.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert outs[0] == alone[0] and outs[1][0] == alone[1][0]  # the prefill from row 48 may round differently


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_chunks_replayed_as_cuda_graphs_write_what_eager_passes_write(make_checkpoint, case):
    """Two prompts of different lengths prefilled into slots through one replayed shape (both pad to 64
    rows), then a chunk after a prefix: their K/V rows are the eager passes' up to bf16 rounding. A shape
    is captured when it comes the second time, so the prompts go through twice: all replays the second."""
    from mpk.prefill import prefill_slot
    from mpk.prefill_replay import REPLAY_ROWS, PrefillReplays

    family, overrides = CASES[case]
    llm = LLM(str(make_checkpoint(family, **overrides)), backend="cuda", max_batch=2, max_seq_len=128,
              kv_block_rows=16, kv_blocks=16)
    tg, ex = llm._executor(2)
    pool = llm._block_pool(2)
    prompts = [list(range(40, 77)), list(range(70, 120))]  # 36 and 49 prompt rows (the vocabulary has 128)
    for slot, p in enumerate(prompts):
        pool.grow(slot, len(p) + 8)
    ex.set_kv_table(pool.table())
    caches = {n: b for n, b in ex.buffers.items() if tg.tensors[n].kind == "state"}

    def prefilled(replays) -> dict[str, torch.Tensor]:
        for buf in caches.values():
            buf.zero_()
        for slot, p in enumerate(prompts):
            prefill_slot(ex, llm.cfg, p, slot, {}, fast=True, limit=16, replays=replays)  # rows 0..15
            prefill_slot(ex, llm.cfg, p, slot, {}, fast=True, cached=16, replays=replays)  # the rest
        return {n: b.clone() for n, b in caches.items()}

    eager, replays = prefilled(None), PrefillReplays()
    prefilled(replays)
    replayed = prefilled(replays)
    assert set(replays.graphs) == {(0, REPLAY_ROWS), (16, REPLAY_ROWS)}  # shapes shared by both prompts
    assert replays.failed is None
    for slot, p in enumerate(prompts):
        rows = [pool.owned[slot][r // 16] * 16 + r % 16 for r in range(len(p) - 1)]
        for name in caches:
            want, got = eager[name].flatten(0, 1)[rows].float(), replayed[name].flatten(0, 1)[rows].float()
            assert (got - want).abs().max() <= 1e-2 * want.abs().max(), (slot, name)
