"""The verifier on real compiled task graphs: they pass, and each planted bug is caught and named."""

import pytest

from mpk.compiler import compile_model
from mpk.compiler.verify import VerificationError, verify
from mpk.models.config import ModelConfig
from mpk.taskgraph import Region, TaskGraph

CFG = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=200, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, max_position_embeddings=256)


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def compiled(request) -> TaskGraph:
    return compile_model(CFG, batch=2, max_seq_len=96, tp_size=request.param, num_sms=6)


def fresh(tg: TaskGraph) -> TaskGraph:
    return TaskGraph.from_json(tg.to_json())


def first_task(tg, kind):
    return next(t for t in tg.tasks if tg.ops[t.op].kind == kind)


def test_compiled_graphs_pass(compiled):
    report = verify(compiled)
    assert report.as_dict()["verdict"] == "pass"


def test_dropped_dependency_is_a_race(compiled):
    tg = fresh(compiled)
    rope = first_task(tg, "qk_norm_rope_append")
    ev = tg.events[rope.wait]
    dropped = ev.producers.pop()
    tg.tasks[dropped].signals.remove(ev.id)
    ev.target -= 1
    with pytest.raises(VerificationError) as err:
        verify(tg)
    assert err.value.check in ("race", "coverage")
    assert "qkv_out" in str(err.value)
    assert tg.describe_task(dropped) in str(err.value)


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
    ev = tg.events[first_task(tg, "linear_residual" if tg.tp_size == 1 else "allreduce_residual").wait]
    ev.target += 1
    with pytest.raises(VerificationError) as err:
        verify(tg)
    assert err.value.check == "events"
    assert f"event {ev.id}" in str(err.value)
