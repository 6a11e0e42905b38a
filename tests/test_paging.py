"""Paged KV cache (mpk.paging): the block pool's bookkeeping, and the CPU executor over block pools
giving exactly what it gives over contiguous caches, whatever blocks the table names."""

import pytest
import torch

from mpk.compiler import compile_model
from mpk.errors import MpkError
from mpk.inputs import fuse_weights, program_inputs
from mpk.models.checkpoint import load_checkpoint
from mpk.paging import SCRATCH_BLOCK, BlockPool, KvPages, gather, scatter
from mpk.sim import CpuExecutor


def test_blocks_are_handed_out_as_sequences_grow_and_come_back():
    pool = BlockPool(num_blocks=8, block_rows=4, slots=3, max_seq_len=10)
    assert pool.blocks_per_seq == 3 and pool.in_use == 0 and len(pool.free) == 7  # block 0 is scratch
    pool.grow(0, 5)  # rows 0..4: two blocks
    pool.grow(1, 1)
    pool.grow(0, 6)  # still two
    assert [len(b) for b in pool.owned] == [2, 1, 0] and pool.in_use == 3
    assert SCRATCH_BLOCK not in pool.owned[0] + pool.owned[1]
    table = pool.table()
    assert table.shape == (3, 3) and table.dtype == torch.int32
    assert table[0, :2].tolist() == pool.owned[0] and table[0, 2] == SCRATCH_BLOCK and table[2].tolist() == [0, 0, 0]
    pool.grow(2, 100)  # beyond max_seq_len: only what the context can use
    assert len(pool.owned[2]) == 3 and not pool.can_grow(1, 10)
    with pytest.raises(MpkError, match="has 1 free blocks of 4 rows and sequence slot 1 needs 2 more"):
        pool.grow(1, 10)
    pool.release(0)
    assert pool.in_use == 4 and pool.can_grow(1, 10)
    pool.reserve(1, 8)
    held = [pool.owned[2], pool.owned[1]]
    pool.arrange([2, 1])  # slot 2's blocks to slot 0, slot 1's stay
    assert pool.owned == [held[0], held[1], []] and pool.reserved == [0, 2, 0] and pool.in_use == 4
    for order in ([0], [0, 1, 1]):  # one would drop slot 1's blocks, one repeats them
        with pytest.raises(MpkError, match="would drop or repeat a slot's blocks"):
            pool.arrange(order)
    with pytest.raises(MpkError, match="at least 2 blocks"):
        BlockPool(num_blocks=1, block_rows=4, slots=1, max_seq_len=8)
    for rows in (0, 3, 12):  # the GPU looks rows up by shift and mask
        with pytest.raises(MpkError, match=f"a power of two rows .*not {rows}"):
            BlockPool(num_blocks=4, block_rows=rows, slots=1, max_seq_len=8)
        with pytest.raises(MpkError, match="a power of two rows"):
            KvPages(4, rows)


def test_gather_and_scatter_address_rows_through_the_table():
    pool = torch.arange(5 * 3 * 2 * 4, dtype=torch.float32).reshape(5, 3, 2, 4)  # 5 blocks of 3 rows
    table = torch.tensor([[4, 1, 2], [3, 0, 0]], dtype=torch.int32)
    got = gather(pool, table, ((0, 2), (2, 5), (1, 2), (0, 4)))
    want = torch.stack([torch.stack([pool[4, 2, 1], pool[1, 0, 1], pool[1, 1, 1]]),
                        torch.stack([pool[3, 2, 1], pool[0, 0, 1], pool[0, 1, 1]])])
    assert torch.equal(got, want[:, :, None])
    scatter(pool, table, ((1, 2), (1, 2), (0, 2), (1, 3)), torch.full((1, 1, 2, 2), -1.0))
    assert (pool[3, 1, :, 1:3] == -1).all() and (pool[3, 1, :, 0] != -1).all() and (pool[3, 0] != -1).all()


def run(tg, weights, meta, steps, kv_pages=None, table=None):
    with CpuExecutor(tg, weights, meta, kv_pages=kv_pages) as ex:
        if table is not None:
            ex.set_kv_table(table)
        return ex.run(steps, eos_token_ids=[], collect_logits=True)


@pytest.mark.parametrize("family, overrides, tp", [("qwen3", {}, 1), ("mistral", {"sliding_window": 7}, 1),
                                                   ("llama", {}, 2)])
def test_a_paged_cache_gives_what_a_contiguous_cache_gives(make_checkpoint, family, overrides, tp):
    cfg, hf = load_checkpoint(make_checkpoint(family, **overrides))
    steps = 30
    tg = compile_model(cfg, batch=2, max_seq_len=steps, num_sms=4, tp_size=tp)
    prompts = [[3, 4, 5, 6, 7], [9, 8]]
    weights, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, tp, torch.bfloat16), prompts)
    want = run(tg, weights, meta, steps)
    pool = BlockPool(num_blocks=20, block_rows=4, slots=2, max_seq_len=steps)
    for rows in range(4, steps + 4, 4):  # the two sequences' blocks interleave in the pool
        pool.grow(1, rows)
        pool.grow(0, rows)
    got = run(tg, weights, meta, steps, KvPages(20, 4), pool.table())
    assert got.tokens == want.tokens
    assert all(torch.equal(g, w) for g, w in zip(got.logits, want.logits))


def test_the_bench_pages_interleave_every_sequence_over_its_own_blocks(make_checkpoint):
    """`mpk bench --kv-block-rows`: each sequence's blocks alternate with the others' in the pool, no
    block is shared or scratch, and the CPU executor over them gives what it gives contiguous."""
    from mpk.bench import interleaved_kv_pages

    cfg, hf = load_checkpoint(make_checkpoint("qwen3"))
    steps = 18
    tg = compile_model(cfg, batch=3, max_seq_len=steps, num_sms=4)
    pages, table = interleaved_kv_pages(tg, 4)
    assert table.shape == pages.table_shape(tg) == (3, 5) and pages.block_rows == 4
    assert sorted(table.flatten().tolist()) == list(range(1, pages.num_blocks))
    assert table[:, 1].tolist() == [b + 3 for b in table[:, 0].tolist()]  # block i of each, then block i + 1
    weights, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, 1, torch.bfloat16), [[3, 4, 5], [9], [7, 7]])
    want, got = run(tg, weights, meta, steps), run(tg, weights, meta, steps, pages, table)
    assert got.tokens == want.tokens
    assert all(torch.equal(g, w) for g, w in zip(got.logits, want.logits))


def test_a_paged_executor_needs_its_table(make_checkpoint):
    cfg, hf = load_checkpoint(make_checkpoint("llama"))
    tg = compile_model(cfg, batch=1, max_seq_len=8, num_sms=4)
    weights, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, 1, torch.bfloat16), [[1, 2]])
    with CpuExecutor(tg, weights, meta, kv_pages=KvPages(4, 4)) as ex:
        with pytest.raises(MpkError, match="set its block table"):
            ex.run(2)
        with pytest.raises(MpkError, match=r"the block table is \(1, 3\); this graph needs \(1, 2\)"):
            ex.set_kv_table(torch.zeros(1, 3, dtype=torch.int32))
        with pytest.raises(MpkError, match="outside the pool's 4"):
            ex.set_kv_table(torch.tensor([[1, 4]], dtype=torch.int32))
    with CpuExecutor(tg, weights, meta) as ex, pytest.raises(MpkError, match="is not paged"):
        ex.set_kv_table(torch.zeros(1, 2, dtype=torch.int32))


# --- the API and the batcher over a paged cache ---------------------------------------------------

MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def path(make_checkpoint):
    import tiny_tokenizers

    p = make_checkpoint("qwen3", vocab_size=300)
    tiny_tokenizers.save(tiny_tokenizers.byte_level(), p)
    return str(p)


@pytest.fixture(scope="module")
def contiguous(path):
    from mpk import LLM

    return LLM(path, backend="sim", dtype="float32", max_batch=3, max_seq_len=MAX_SEQ_LEN)


def paged(path, blocks=None):
    from mpk import LLM

    return LLM(path, backend="sim", dtype="float32", max_batch=3, max_seq_len=MAX_SEQ_LEN, kv_block_rows=4,
               kv_blocks=blocks)


def record_prefills(monkeypatch, record) -> None:
    """Call `record(cached, limit)` at each `prefill_slot` call the batcher makes, then prefill."""
    import mpk.prefill

    prefill_slot = mpk.prefill.prefill_slot

    def recorded(*args, cached=0, limit=None, **kw):
        record(cached, limit)
        return prefill_slot(*args, cached=cached, limit=limit, **kw)

    monkeypatch.setattr(mpk.prefill, "prefill_slot", recorded)


def outputs(outs):
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


def test_generate_over_a_paged_cache_gives_what_a_contiguous_one_gives(path, contiguous):
    from mpk import SamplingParams

    prompts = [list(range(30, 50)), [5, 6, 7], "the cat sat"]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, max_tokens=9, seed=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5)]
    llm = paged(path)
    assert outputs(llm.generate(prompts, params)) == outputs(contiguous.generate(prompts, params))
    assert llm.last_run.prefilled == 2  # the prefill wrote through the block table too
    assert llm._block_pools[3].in_use == 0  # every block came back


def test_the_batcher_over_few_blocks_makes_requests_wait_for_them(path, contiguous):
    from mpk import SamplingParams
    from mpk.batching import Batcher, Request

    requests = [([5, 6, 7, 8, 9, 10, 11], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)),
                ([12], SamplingParams(temperature=0.9, top_k=20, max_tokens=12, seed=4, ignore_eos=True)),
                (list(range(20, 50)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)),
                ([3, 4], SamplingParams(temperature=1.2, max_tokens=14, seed=2, ignore_eos=True))]
    want = [outputs(contiguous.generate([p], sp))[0] for p, sp in requests]
    llm = paged(path, blocks=12)  # 11 usable blocks of 4 rows: two or three requests at a time, not four
    batcher = Batcher(llm, window=4)
    got, peak, most = [None] * len(requests), 0, 0
    for i, (p, sp) in enumerate(requests):
        batcher.submit(Request(p, sp, on_done=lambda out, i=i: got.__setitem__(i, outputs([out])[0])))
    while batcher.run_window():
        peak = max(peak, batcher.kv_blocks_in_use())
        most = max(most, batcher.running)
    assert got == want
    assert peak <= 11 and most < 3 and batcher.kv_blocks_in_use() == 0
    with pytest.raises(MpkError, match="needs 13 KV blocks of 4 rows and the cache has 11"):
        batcher.submit(Request([1, 2], SamplingParams(max_tokens=50)))


def test_the_cli_pages_the_cache_and_refuses_what_cannot_be_sized(capsys):
    from mpk.cli import main

    argv = ["generate", "tiny", "--backend", "sim", "--token-ids", "1,2,3", "--max-new-tokens", "6", "--quiet"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    assert main(argv + ["--kv-block-rows", "4"]) == 0
    assert capsys.readouterr().out == want
    for extra, phrase in ((["--gpu-memory-utilization", "0.5"], "add --kv-block-rows"),
                          (["--kv-block-rows", "4", "--gpu-memory-utilization", "0.5"], "the CPU executor takes"),
                          (["--kv-block-rows", "-1"], "--kv-block-rows must be at least 0"),
                          (["--kv-block-rows", "12"], "a KV block holds a power of two rows")):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and phrase in err, err


def test_kv_blocks_come_from_what_the_weights_and_workspace_leave():
    from mpk import memory
    from mpk.models import resolve_model

    cfg = resolve_model("qwen3-8b").cfg
    need = memory.estimate(cfg, batch=8, max_seq_len=4096, device="GPU memory")
    block = memory.kv_block_bytes(cfg, 64)
    assert block == 2 * 36 * 64 * 8 * 128 * 2  # K and V, 36 layers, 8 KV heads of 128, bf16
    capacity = 141 << 30
    blocks = memory.kv_blocks_within(need, capacity, 0.9, block)
    assert blocks * block <= 0.9 * capacity - (need.total - need.kv_cache) < (blocks + 1) * block
    assert memory.kv_blocks_within(need, capacity, 0.05, block) == 0  # not even the weights fit
    with pytest.raises(MpkError, match=r"must be in \(0, 1\]"):
        memory.kv_blocks_within(need, capacity, 1.5, block)


@pytest.mark.parametrize("how", ["ops", "graph"])
def test_prefill_writes_through_the_block_table(make_checkpoint, how):
    from mpk.prefill import compile_prefill, prefill_ops, run_prefill

    cfg, hf = load_checkpoint(make_checkpoint("mistral", sliding_window=7))
    steps = 30
    tg = compile_model(cfg, batch=2, max_seq_len=steps, num_sms=4)
    seqs = torch.randint(0, cfg.vocab_size, (2, steps), generator=torch.Generator().manual_seed(5)).tolist()
    weights, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, 1, torch.bfloat16), seqs)
    prompts = [s[:21] for s in seqs]
    pool = BlockPool(num_blocks=20, block_rows=4, slots=2, max_seq_len=steps)
    for rows in range(4, steps + 4, 4):
        pool.grow(1, rows)
        pool.grow(0, rows)
    results = []
    for pages in (None, KvPages(20, 4)):
        with CpuExecutor(tg, weights, meta, kv_pages=pages) as ex:
            if pages is not None:
                ex.set_kv_table(pool.table())
            if how == "ops":
                first = prefill_ops(ex, cfg, prompts, fast=False)
            else:
                graph = compile_prefill(tg, cfg, 20)
                run_prefill(graph, ex.buffers, prompts, kv_table=ex.kv_table)
                ex.set_tokens([p[20] for p in prompts])
                first = 20
            assert first == 20
            results.append(ex.run(steps - first, first_step=first, eos_token_ids=[], collect_logits=True))
    contiguous, paged = results
    assert paged.tokens == contiguous.tokens
    assert all(torch.equal(p, c) for p, c in zip(paged.logits, contiguous.logits))


def test_published_prefix_blocks_are_shared_and_stay_cached_until_needed():
    pool = BlockPool(num_blocks=7, block_rows=4, slots=3, max_seq_len=16)  # 6 usable blocks
    a = list(range(100, 111))  # 11 tokens: rows 0..9 are prefilled, blocks 0 and 1 whole
    pool.grow(0, len(a))
    pool.publish(0, a, len(a) - 1)
    b = a[:9] + [7, 8]  # shares rows 0..7 (blocks 0, 1)
    assert pool.share(1, b) == 8 and pool.owned[1] == pool.owned[0][:2]
    assert pool.in_use == 3  # a's three blocks, two of them shared with b
    assert pool.share(2, a[:8]) == 4  # rows before the last token only: block 1 would hold row 7
    pool.release(2)
    pool.release(0)
    assert pool.in_use == 2 and pool.available == 4  # a's last block is free again; its shared ones are b's
    pool.release(1)
    assert pool.in_use == 0 and len(pool.idle) == 2 and pool.available == 6
    assert pool.share(0, a) == 8  # cached, nobody holding them: taken back
    pool.release(0)
    pool.grow(1, 16)  # four new blocks: the free ones first
    assert len(pool.idle) == 2
    pool.grow(2, 8)  # then the cached ones, least recently released first, forgotten
    assert len(pool.idle) == 0 and pool.share(0, a) == 0
    with pytest.raises(MpkError, match="already holds blocks"):
        pool.share(1, a)


def test_a_request_with_a_cached_prefix_prefills_only_after_it(path, contiguous, monkeypatch):
    from mpk import SamplingParams
    from mpk.batching import Batcher, Request

    system = list(range(40, 70))  # 30 shared tokens: 7 whole blocks of 4 rows
    requests = [(system + [5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
                (system + [9, 9], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))]
    want = [outputs(contiguous.generate([p], sp))[0] for p, sp in requests]
    starts = []
    record_prefills(monkeypatch, lambda cached, limit: starts.append(cached))
    batcher = Batcher(paged(path), window=4)
    got = [None, None]
    for i, (p, sp) in enumerate(requests):  # one after the other: the second finds the first's blocks
        batcher.submit(Request(p, sp, on_done=lambda out, i=i: got.__setitem__(i, outputs([out])[0])))
        while batcher.run_window():
            pass
    assert starts == [0, 28]
    assert got == want


def test_generate_over_too_few_blocks_is_one_error_and_gives_them_back(path):
    from mpk import SamplingParams

    llm = paged(path, blocks=6)  # 5 usable blocks of 4 rows
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with pytest.raises(MpkError, match="has 1 free blocks of 4 rows and sequence slot 1 needs 4 more"):
        llm.generate([[1, 2, 3], [4, 5, 6]], params)  # 14 rows each: 4 blocks each
    assert llm._block_pools[2].in_use == 0
    assert len(llm.generate([[1, 2, 3]], params)[0].outputs[0].token_ids) == 12


def test_a_long_prompt_is_prefilled_a_chunk_per_window_while_the_others_decode(path, contiguous, monkeypatch):
    from mpk import SamplingParams
    from mpk.batching import Batcher, Request

    short = ([7, 8, 9], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    long = (list(range(100, 140)), SamplingParams(temperature=0.7, top_k=30, max_tokens=5, seed=9, ignore_eos=True))
    want = [outputs(contiguous.generate([p], sp))[0] for p, sp in (short, long)]
    chunks, got, tokens = [], [None, None], []
    # Where each chunk starts, its rows, and the short request's progress then.
    record_prefills(monkeypatch, lambda cached, limit: chunks.append((cached, limit, len(tokens))))
    batcher = Batcher(paged(path), window=2, prefill_rows=8)
    batcher.submit(Request(short[0], short[1], on_token=tokens.append,
                           on_done=lambda out: got.__setitem__(0, outputs([out])[0])))
    assert batcher.run_window() and len(tokens) > 0
    batcher.submit(Request(long[0], long[1], on_done=lambda out: got.__setitem__(1, outputs([out])[0])))
    while batcher.run_window():
        pass
    # The short prompt in one chunk, then the long one's 39 rows in five windows.
    assert [(start, limit) for start, limit, _ in chunks] == [(0, 2), (0, 8), (8, 8), (16, 8), (24, 8), (32, 7)]
    assert chunks[-1][2] > chunks[1][2]  # the short request made tokens between the long one's chunks
    assert got == want


def test_a_chunk_short_of_its_prompt_stops_on_a_block_boundary(path, contiguous, monkeypatch):
    """A window's rows left after one prompt do not start a few-row pass of the next: a chunk that does
    not finish its prompt ends on a multiple of the block rows, and the next window goes on from there."""
    from mpk import SamplingParams
    from mpk.batching import Batcher, Request

    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    prompts = [list(range(20, 26)), list(range(40, 60))]  # 5 and 19 prompt rows
    want = [outputs(contiguous.generate([p], params))[0] for p in prompts]
    chunks = []
    record_prefills(monkeypatch, lambda cached, limit: chunks.append((cached, limit)))
    batcher = Batcher(paged(path), window=2, prefill_rows=10)  # blocks of 4 rows
    got = [None, None]
    for i, p in enumerate(prompts):
        batcher.submit(Request(p, params, on_done=lambda out, i=i: got.__setitem__(i, outputs([out])[0])))
    while batcher.run_window():
        pass
    # 5 rows, then 5 left: 4 of the long prompt; 10 rows would end at 14, so 12; then its last 3.
    assert chunks == [(0, 5), (0, 4), (4, 8), (12, 7)]
    assert got == want


def test_a_chunk_granule_is_a_quarter_of_the_budget_in_whole_blocks():
    from mpk.batching import chunk_granule, chunk_rows

    assert chunk_granule(2048, 64) == 512 and chunk_granule(32, 4) == 8
    assert chunk_granule(10, 4) == 4 and chunk_granule(2, 4) == 2  # never below a block, never above the budget
    assert chunk_granule(100, 16) == 16  # a quarter (25) in whole blocks
    assert chunk_rows(0, 30, 40, 8) == 30  # it fits: all of it
    assert chunk_rows(0, 30, 23, 8) == 16 and chunk_rows(5, 30, 23, 8) == 19  # to a multiple of 8 from row 0
    assert chunk_rows(0, 30, 7, 8) is None  # no whole granule left: wait for the next window
    assert chunk_rows(3, 0, 0, 8) == 0  # a prompt with nothing to prefill still goes through


def test_a_chunk_short_of_its_prompt_stops_on_a_quarter_of_the_budget(path, contiguous, monkeypatch):
    """With a 32-row budget and blocks of 4 a chunk that does not finish its prompt ends on a multiple of
    8 rows: after a 9-row prompt, 16 of the next one's 30 rows (not the 20 that whole blocks allow)."""
    from mpk import SamplingParams
    from mpk.batching import Batcher, Request

    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    prompts = [list(range(20, 30)), list(range(40, 71))]  # 9 and 30 prompt rows
    want = [outputs(contiguous.generate([p], params))[0] for p in prompts]
    chunks = []
    record_prefills(monkeypatch, lambda cached, limit: chunks.append((cached, limit)))
    batcher = Batcher(paged(path), window=2, prefill_rows=32)
    got = [None, None]
    for i, p in enumerate(prompts):
        batcher.submit(Request(p, params, on_done=lambda out, i=i: got.__setitem__(i, outputs([out])[0])))
    while batcher.run_window():
        pass
    assert chunks == [(0, 9), (0, 16), (16, 14)]
    assert got == want


def test_a_window_decodes_without_the_prompts_still_prefilling(path, contiguous):
    """A prompt admitted into a lower slot than a decoding request moves after it, so the window's
    batch holds the decoding request alone while the prompt's chunks go in."""
    from mpk import SamplingParams
    from mpk.batching import Batcher, Request

    first = ([7, 8, 9], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    running = ([10, 11], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    long = (list(range(100, 140)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    want = [outputs(contiguous.generate([p], sp))[0] for p, sp in (first, running, long)]
    got = [None] * 3
    batcher = Batcher(paged(path), window=2, prefill_rows=8)

    def submit(i, request):
        batcher.submit(Request(*request, on_done=lambda out: got.__setitem__(i, outputs([out])[0])))

    submit(0, first)
    submit(1, running)
    while got[0] is None:
        assert batcher.run_window()
    assert batcher.slots[0] is None and batcher.slots[1] is not None  # the first request's slot is free
    submit(2, long)  # it takes slot 0
    batches = []
    while batcher.run_window():
        if any(s is not None and not s.ready for s in batcher.slots):
            batches.append(batcher.last_batch)
    assert len(batches) >= 4 and set(batches) == {1}  # 39 prompt rows over 8-row chunks, beside one decoding slot
    assert got == want
