"""The verifier on real compiled task graphs: they pass, and each planted bug is caught and named."""

import pytest

from mpk.compiler import compile_model
from mpk.compiler.verify import VerificationError, verify
from mpk.graph import ONE_PASS_ATTN_ROWS
from mpk.models.config import ModelConfig
from mpk.taskgraph import Region, TaskGraph

CFG = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=200, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, max_position_embeddings=1024)


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def compiled(request) -> TaskGraph:
    """Long enough, on enough SMs, for attention splits and merges (mpk.graph.attention_splits)."""
    return compile_model(CFG, batch=2, max_seq_len=ONE_PASS_ATTN_ROWS + 32, tp_size=request.param, num_sms=12)


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def short(request) -> TaskGraph:
    """One attention task per (sequence, group) that appends its own K/V row."""
    return compile_model(CFG, batch=2, max_seq_len=96, tp_size=request.param, num_sms=6)


def fresh(tg: TaskGraph) -> TaskGraph:
    return TaskGraph.from_json(tg.to_json())


def first_task(tg, kind):
    return next(t for t in tg.tasks if tg.ops[t.op].kind == kind)


def test_compiled_graphs_pass(compiled, short):
    for tg in (compiled, short):
        assert verify(tg).as_dict()["verdict"] == "pass"
    assert any(op.kind == "attention" for op in short.ops) and not any(op.kind == "attention" for op in compiled.ops)


def drop_producer(tg: TaskGraph, ev_id: int, producer: int) -> None:
    ev = tg.events[ev_id]
    ev.producers.remove(producer)
    tg.tasks[producer].signals.remove(ev.id)
    ev.target -= 1


def assert_dropping_its_last_qkv_producer_races(tg: TaskGraph, kind: str) -> None:
    """The first `kind` task no longer waits for one of the QKV tiles it reads: the verifier names both."""
    task = first_task(tg, kind)
    dropped = tg.events[task.wait].producers[-1]
    drop_producer(tg, task.wait, dropped)
    with pytest.raises(VerificationError) as err:
        verify(tg)
    assert err.value.check in ("race", "coverage")
    assert "qkv_out" in str(err.value)
    assert tg.describe_task(dropped) in str(err.value)


def test_dropped_dependency_is_a_race(compiled):
    assert_dropping_its_last_qkv_producer_races(fresh(compiled), "attention_split")


def test_a_one_pass_attention_task_that_does_not_wait_for_its_qkv_races(short):
    assert_dropping_its_last_qkv_producer_races(fresh(short), "attention")


def test_an_o_projection_that_does_not_wait_for_the_cache_appending_task_races(short):
    """The one-pass task writes the attention output: an O tile that stops waiting for one races on it."""
    tg = fresh(short)
    o = next(t for t in tg.tasks if tg.ops[t.op].kind in ("linear_residual", "linear_tagged")
             and any(tg.ops[tg.tasks[p].op].kind == "attention" for p in tg.events[t.wait].producers))
    dropped = next(p for p in tg.events[o.wait].producers if tg.ops[tg.tasks[p].op].kind == "attention")
    drop_producer(tg, o.wait, dropped)
    with pytest.raises(VerificationError) as err:
        verify(tg)
    assert err.value.check in ("race", "coverage") and tg.describe_task(dropped) in str(err.value)


def test_a_merge_that_does_not_wait_for_a_split_races_on_the_cache():
    """The merge appends this step's K/V row to the cache column the splits read: it must follow all of them."""
    tg = compile_model(CFG, batch=1, max_seq_len=ONE_PASS_ATTN_ROWS + 32, num_sms=6)
    merge = first_task(tg, "attention_merge")
    splits = tg.events[merge.wait].producers
    assert len(splits) == 3 and all(tg.ops[tg.tasks[p].op].kind == "attention_split" for p in splits)
    last = next(p for p in splits if tg.tasks[p].tile[2] == 2)
    drop_producer(tg, merge.wait, last)
    for i, r in enumerate(merge.reads):  # and stop reading its part: only the cache still orders the two
        if r.role in ("part", "lse"):
            merge.reads[i] = Region(r.tensor, r.box[:2] + ((0, 2),) + r.box[3:], r.role)
    with pytest.raises(VerificationError) as err:
        verify(tg)
    assert err.value.check == "race" and "k_cache" in str(err.value)
    assert tg.describe_task(last) in str(err.value) and tg.describe_task(merge.id) in str(err.value)


def test_overlapping_writes_are_a_race(compiled):
    tg = fresh(compiled)
    tiles = [t for t in tg.tasks if tg.ops[t.op].kind == "rmsnorm_linear" and tg.ops[t.op].layer == 1
             and tg.ops[t.op].rank == 0]
    a, b = tiles[0], tiles[1]
    (rows, (c0, c1)) = a.writes[0].box
    a.writes[0] = Region(a.writes[0].tensor, (rows, (c0, c1 + 1)))  # one column into b's tile
    with pytest.raises(VerificationError) as err:
        verify(tg)
    assert err.value.check == "race"
    msg = str(err.value)
    assert tg.describe_task(a.id) in msg and tg.describe_task(b.id) in msg


def test_queue_out_of_order_is_a_deadlock(compiled):
    tg = fresh(compiled)
    attn = first_task(tg, "attention_split")
    producer = tg.tasks[tg.events[attn.wait].producers[0]]
    for q in tg.queues:
        if attn.id in q:
            q.remove(attn.id)
    queue = tg.queues[producer.queue]
    queue.insert(queue.index(producer.id), attn.id)
    attn.queue = producer.queue
    with pytest.raises(VerificationError) as err:
        verify(tg)
    assert err.value.check == "deadlock"
    assert f"event {attn.wait}" in str(err.value)


def test_wrong_event_target_is_caught(compiled):
    tg = fresh(compiled)
    ev = tg.events[first_task(tg, "linear_residual" if tg.tp_size == 1 else "allreduce_tagged").wait]
    ev.target += 1
    with pytest.raises(VerificationError) as err:
        verify(tg)
    assert err.value.check == "events"
    assert f"event {ev.id}" in str(err.value)


@pytest.mark.parametrize("tp_size", [4, 8])
def test_four_and_eight_rank_graphs_pass_and_a_dropped_peer_partial_races(tp_size):
    """The whole system of 4 or 8 GPUs at once: it verifies, and an allreduce tile that stops waiting
    for one peer's partial is a race on the inbox that peer writes."""
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=160, hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=8, num_kv_heads=8, head_dim=16, max_position_embeddings=256)
    tg = compile_model(cfg, batch=2, max_seq_len=32, tp_size=tp_size, num_sms=4)
    assert verify(tg).as_dict()["verdict"] == "pass"
    bad = fresh(tg)
    reduce = next(t for t in bad.tasks if bad.ops[t.op].kind == "allreduce_tagged" and t.queue // bad.num_sms == 0)
    peer = next(p for p in bad.events[reduce.wait].producers if bad.tasks[p].queue // bad.num_sms == tp_size - 1)
    drop_producer(bad, reduce.wait, peer)
    with pytest.raises(VerificationError) as err:
        verify(bad)
    assert err.value.check in ("race", "coverage")
    assert bad.describe_task(peer) in str(err.value)
