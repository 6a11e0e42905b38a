"""The compiler's structural promises: fine-grained events, fusion, linearization, schedule, JSON."""

import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import mpk
from mpk import sim
from mpk.compiler import compile_model, compile_program
from mpk.errors import MpkError
from mpk.graph import ONE_PASS_ATTN_ROWS, SIMT_MAX_WARP_ROWS, SIMT_MAX_WARP_WORK, build_decode_program, gemv_on_cuda_cores
from mpk.models.config import ModelConfig
from mpk.taskgraph import TaskGraph


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(architecture="Qwen3ForCausalLM", vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2,
                num_heads=8, num_kv_heads=2, head_dim=16, qk_norm=True, max_position_embeddings=1024)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def tg() -> TaskGraph:
    """A graph long enough (past mpk.graph.ONE_PASS_ATTN_ROWS) for attention splits and merges."""
    return compile_model(tiny_cfg(), batch=2, max_seq_len=2 * ONE_PASS_ATTN_ROWS, num_sms=8)


def producers_by_op(tg, task):
    out = defaultdict(list)
    if task.wait >= 0:
        for p in tg.events[task.wait].producers:
            out[tg.ops[tg.tasks[p].op].name].append(tg.tasks[p])
    return out


def test_attention_waits_only_for_its_groups_qkv_tiles(tg):
    """The splits read the QKV rows of their group (and the cache the previous step's merge wrote,
    which the token chain already orders): one lag-0 event on that group's QKV tiles."""
    splits = [t for t in tg.tasks if tg.ops[t.op].name == "layers.0.attention"]
    assert len(splits) == 2 * 2 * tg.ops[splits[0].op].params["splits"]  # batch x kv groups x splits
    rows = tiny_cfg().qkv_rows_per_group
    for t in splits:
        deps = producers_by_op(tg, t)
        assert list(deps) == ["layers.0.qkv"] and tg.events[t.wait].lag == 0
        g = t.tile[1]
        for p in deps["layers.0.qkv"]:
            (c0, c1), = [r.box[1] for r in p.writes]
            assert g * rows <= c0 and c1 <= (g + 1) * rows
        all_qkv_tiles = sum(tg.ops[x.op].name == "layers.0.qkv" for x in tg.tasks)
        assert len(deps["layers.0.qkv"]) < all_qkv_tiles


def test_one_pass_attention_waits_for_its_groups_qkv_tiles_and_feeds_the_o_projection():
    """A short graph's attention task of (b, g) waits for that group's QKV tiles alone, and each O
    projection tile for the attention tasks (no merge in between)."""
    short = compile_model(tiny_cfg(), batch=2, max_seq_len=64, num_sms=8)
    tasks = [t for t in short.tasks if short.ops[t.op].name == "layers.0.attention"]
    assert short.ops[tasks[0].op].kind == "attention" and sorted(t.tile for t in tasks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not any(op.kind == "attention_merge" for op in short.ops)
    rows = tiny_cfg().qkv_rows_per_group
    for t in tasks:
        deps = producers_by_op(short, t)
        assert list(deps) == ["layers.0.qkv"] and short.events[t.wait].lag == 0
        for p in deps["layers.0.qkv"]:
            (c0, c1), = [r.box[1] for r in p.writes]
            assert t.tile[1] * rows <= c0 and c1 <= (t.tile[1] + 1) * rows
    o_tiles = [t for t in short.tasks if short.ops[t.op].name == "layers.0.o"]
    assert o_tiles and all(set(producers_by_op(short, t)) == {"layers.0.attention"} for t in o_tiles)


def test_merge_waits_for_the_splits_of_its_group_only(tg):
    for t in tg.tasks:
        if tg.ops[t.op].name == "layers.1.attn_merge":
            producers = [tg.tasks[p] for p in tg.events[t.wait].producers]
            assert {tg.ops[p.op].name for p in producers} == {"layers.1.attention"}
            assert sorted(p.tile for p in producers) == [(*t.tile, s) for s in range(len(producers))]


def _chain(sample_reads_merge: bool):
    """embed -> split -> merge -> sample, the split also reading what the previous step's merge wrote."""
    from types import SimpleNamespace

    from mpk.taskgraph import Region, Task

    def r(name):
        return Region(name, ((0, 1),), name)

    kinds = {name: SimpleNamespace(kind="activation") for name in ("x", "p", "y")}
    kinds.update(cache=SimpleNamespace(kind="state"), tok=SimpleNamespace(kind="meta"))
    prog = SimpleNamespace(tensor=kinds.__getitem__, ops=[SimpleNamespace(name=n) for n in
                                                          ("embed", "split", "merge", "sample")])
    tasks = [Task(0, 0, (0,), [r("tok")], [r("x")], 0, 0),
             Task(1, 1, (0,), [r("x"), r("cache")], [r("p")], 0, 0),
             Task(2, 2, (0,), [r("p")], [r("cache"), r("y")], 0, 0),
             Task(3, 3, (0,), [r("y")] if sample_reads_merge else [], [r("tok")], 0, 0)]
    return prog, tasks


def test_a_previous_step_producer_is_dropped_when_this_steps_imply_it():
    from mpk.compiler.events import find_producers

    keys = find_producers(*_chain(sample_reads_merge=True))
    assert keys[0] == (frozenset({3}), 1) and keys[1] == (frozenset({0}), 0)


def test_a_previous_step_producer_this_steps_do_not_imply_is_rejected():
    from mpk.compiler.events import find_producers

    with pytest.raises(MpkError, match="split tile \\(0,\\) depends on producers of this step and of the previous one"):
        find_producers(*_chain(sample_reads_merge=False))


def test_events_are_fused_and_name_contiguous_ranges(tg):
    assert tg.stats["events"] < tg.stats["events_unfused"]
    for ev in tg.events:
        consumers = [t.id for t in tg.tasks if t.wait == ev.id]
        assert consumers == list(range(ev.first_task, ev.stop_task))
        assert ev.target == len(ev.producers)
    # Every O-projection tile of a layer waits on the same event: the residual tile it also reads
    # is implied by the attention merge tasks (transitive reduction).
    o_waits = {t.wait for t in tg.tasks if tg.ops[t.op].name == "layers.0.o"}
    assert len(o_waits) == 1


def test_global_order_is_topological_and_queues_follow_it(tg):
    for t in tg.tasks:
        if t.wait >= 0 and tg.events[t.wait].lag == 0:
            assert all(p < t.id for p in tg.events[t.wait].producers)
    seen = sorted(tid for q in tg.queues for tid in q)
    assert seen == list(range(len(tg.tasks)))
    for qi, q in enumerate(tg.queues):
        assert q == sorted(q)
        assert all(tg.tasks[tid].queue == qi for tid in q)


def test_token_feedback_is_a_previous_step_event(tg):
    embeds = [t for t in tg.tasks if tg.ops[t.op].kind == "embed"]
    for t in embeds:
        ev = tg.events[t.wait]
        assert ev.lag == 1
        assert {tg.ops[tg.tasks[p].op].kind for p in ev.producers} == {"sample"}


@pytest.mark.parametrize("batch, allreduce", [(1, "allreduce_tagged"), (9, "allreduce_residual")])
def test_tensor_parallel_ranks_live_on_their_own_sms(batch, allreduce):
    tg = compile_model(tiny_cfg(), batch=batch, max_seq_len=64, tp_size=2, num_sms=4)
    assert tg.num_queues == 8
    for t in tg.tasks:
        assert t.queue // tg.num_sms == tg.ops[t.op].rank
    # allreduce tiles of rank 0 wait for partial sums made on both ranks
    ar = next(t for t in tg.tasks if tg.ops[t.op].kind == allreduce and tg.ops[t.op].rank == 0)
    producer_ranks = {tg.ops[tg.tasks[p].op].rank for p in tg.events[ar.wait].producers}
    assert producer_ranks == {0, 1}
    # Tagged words: every producer writes into rank 0's inbox, and the allreduce reads only its own rank.
    # Otherwise each producer writes on its own rank, and the allreduce reads both.
    tagged = allreduce == "allreduce_tagged"
    for p in tg.events[ar.wait].producers:
        written = {tg.tensors[r.tensor].rank for r in tg.tasks[p].writes}
        assert 0 in written if tagged else written == {tg.ops[tg.tasks[p].op].rank}
    assert {tg.tensors[r.tensor].rank for r in ar.reads} == ({0} if tagged else {0, 1})
    if tagged:  # each allreduce tile runs right after its own rank's producer, on that producer's SM
        place = {tid: (q, i) for q, queue in enumerate(tg.queues) for i, tid in enumerate(queue)}
        for t in tg.tasks:
            if tg.ops[t.op].kind == "allreduce_tagged":
                mine = next(p for p in tg.events[t.wait].producers if tg.ops[tg.tasks[p].op].rank == tg.ops[t.op].rank)
                q, i = place[mine]
                assert place[t.id] == (q, i + 1)


def test_qwen3_8b_schedule_is_balanced():
    cfg = tiny_cfg(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=4, num_heads=32,
                   num_kv_heads=8, head_dim=128, max_position_embeddings=40960)
    tg = compile_program(build_decode_program(cfg, 1, 4096, 1, 132))
    assert tg.stats["load_balance"] < 1.05
    assert tg.stats["critical_path_us"] <= tg.stats["est_step_us"] + 1e-6
    # A step moves at least the weights once.
    weight_bytes = sum(2 * torch.Size(s.shape).numel() for s in tg.tensors.values() if s.kind == "weight"
                       and not s.name.startswith(("embed", "rope")))
    assert tg.stats["bytes_per_step"] >= weight_bytes


def test_gemv_tiles_are_as_fine_as_their_strategy_allows():
    """Tiles that the CUDA-core GEMV runs come in 8 columns at any batch (llama-3.2-1b's batch-4 QKV:
    128 tasks of 24, not 96 of 32); tensor-core tiles keep whole 16-row blocks (gate/up's row pairs:
    8 columns)."""
    llama = tiny_cfg(architecture="LlamaForCausalLM", vocab_size=1000, hidden_size=2048, intermediate_size=8192,
                     num_layers=1, num_heads=32, num_kv_heads=8, head_dim=64, qk_norm=False)
    tiles = {b: {op.name.split(".")[-1]: op.params["tile"] for op in build_decode_program(llama, b, 64, 1, 132).ops
                 if op.name.startswith("layers.0.") and "tile" in op.params} for b in (1, 4, 8)}
    assert tiles[1]["qkv"] == tiles[4]["qkv"] == 24 and tiles[8]["qkv"] == 32
    assert gemv_on_cuda_cores(4, 1, 2048, 24) and not gemv_on_cuda_cores(8, 1, 2048, 24)
    assert not gemv_on_cuda_cores(4, 2, 2048, 64) and tiles[4]["gate_up"] % 8 == 0
    for b, ts in tiles.items():
        for name, tile in ts.items():
            rows_per_col = 2 if name == "gate_up" else 1
            if not gemv_on_cuda_cores(b, rows_per_col, 2048 if name != "down" else 8192, tile):
                assert tile * rows_per_col % 16 == 0, (b, name, tile)


def test_cuda_core_bounds_mirror_the_templates():
    """gemv_on_cuda_cores repeats the rule of small_tile_on_cuda_cores (gemv.cuh): the same defaults."""
    src = (Path(mpk.__file__).parent / "csrc" / "gemv.cuh").read_text()
    rows = int(re.search(r"#define MPK_SIMT_ROWS (\d+)", src).group(1))
    work_kb = int(re.search(r"#define MPK_SIMT_WORK_KB (\d+)", src).group(1))
    assert (rows, work_kb * 1024) == (SIMT_MAX_WARP_ROWS, SIMT_MAX_WARP_WORK)


def test_json_round_trip(tg):
    back = TaskGraph.from_json(tg.to_json())
    assert back.tasks == tg.tasks
    assert back.events == tg.events
    assert back.queues == tg.queues
    assert back.tensors == tg.tensors


def test_context_longer_than_model_is_rejected():
    with pytest.raises(MpkError, match="longer than the model"):
        build_decode_program(tiny_cfg(max_position_embeddings=64), 1, 65)


def test_tp_that_does_not_divide_heads_is_rejected():
    with pytest.raises(MpkError, match="does not divide"):
        build_decode_program(tiny_cfg(), 1, 64, tp_size=4)


def test_sim_reports_a_stall_instead_of_hanging(tg):
    bad = TaskGraph.from_json(tg.to_json())
    # Move an attention task in front of the QKV tile it waits for, on the same SM.
    t = next(t for t in bad.tasks if bad.ops[t.op].kind == "attention_split")
    producer = bad.events[t.wait].producers[0]
    q = bad.queues[bad.tasks[producer].queue]
    for other in bad.queues:
        if t.id in other:
            other.remove(t.id)
    q.insert(q.index(producer), t.id)
    bufs = {name: torch.zeros(spec.shape, dtype=torch.int64 if spec.dtype == "int64" else torch.float32)
            for name, spec in bad.tensors.items()}
    with pytest.raises(MpkError, match="stalled.*waits in step 0"):
        sim.run(bad, bufs, num_steps=1)
