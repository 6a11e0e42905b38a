"""Tail tasks: which tasks the compiler makes tails, the switch that turns them off, and that the CPU
executor computes the same with them (the megakernel's side is in tests/gpu)."""

import pytest
import torch

from mpk.compiler import compile_model
from mpk.compiler.verify import verify
from mpk.engine import generate
from mpk.models.config import ModelConfig
from mpk.models.presets import random_weights
from mpk.ops.base import OpKind
from mpk.taskgraph import TaskGraph


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(architecture="Qwen3ForCausalLM", vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2,
                num_heads=8, num_kv_heads=2, head_dim=16, qk_norm=True, max_position_embeddings=512)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def tg() -> TaskGraph:
    return compile_model(tiny_cfg(), batch=2, max_seq_len=128, num_sms=8)


def tails(tg: TaskGraph) -> list[int]:
    return [ev.tail for ev in tg.events if ev.tail >= 0]


def check_tail_rules(tg: TaskGraph) -> None:
    """What the compiler promises of every tail (the verifier checks the same)."""
    queued = {tid for q in tg.queues for tid in q}
    for tid in tails(tg):
        t, ev = tg.tasks[tid], tg.events[tg.tasks[tid].wait]
        assert t.queue == -1 and tid not in queued and ev.tail == tid
        assert ev.lag == 0 and (ev.first_task, ev.stop_task) == (tid, tid + 1)
        assert {tg.rank_of(p) for p in ev.producers} == {tg.ops[t.op].rank}
    completed = [p for tid in tails(tg) for p in tg.events[tg.tasks[tid].wait].producers]
    assert len(completed) == len(set(completed))  # a task completes at most one tail


def test_every_merge_is_the_tail_of_its_splits_event(tg):
    merges = [t for t in tg.tasks if tg.ops[t.op].kind == "attention_merge"]
    assert len(merges) == 2 * 2 * 2  # layers x batch x KV groups
    assert sorted(tails(tg)) == [t.id for t in merges] and tg.stats["tail_tasks"] == len(merges)
    for t in merges:
        producers = [tg.tasks[p] for p in tg.events[t.wait].producers]
        assert {tg.ops[p.op].kind for p in producers} == {"attention_split"}
        assert sorted(p.tile for p in producers) == [(*t.tile, s) for s in range(len(producers))]
        assert tg.ops[producers[0].op].layer == tg.ops[t.op].layer
    check_tail_rules(tg)
    assert verify(tg).tails == len(merges)


def test_tails_off_queues_every_task(tg, monkeypatch):
    off = compile_model(tiny_cfg(), batch=2, max_seq_len=128, num_sms=8, tails=False)
    assert not tails(off) and off.stats["tail_tasks"] == 0
    assert sorted(tid for q in off.queues for tid in q) == list(range(len(off.tasks)))
    # The same tasks and events; only where the merges run differs.
    assert [(t.op, t.tile, t.wait, t.signals) for t in off.tasks] == [(t.op, t.tile, t.wait, t.signals) for t in tg.tasks]
    assert [(e.producers, e.lag, e.first_task) for e in off.events] == [(e.producers, e.lag, e.first_task)
                                                                        for e in tg.events]
    monkeypatch.setenv("MPK_TAILS", "0")
    assert compile_model(tiny_cfg(), batch=2, max_seq_len=128, num_sms=8).queues == off.queues
    monkeypatch.setenv("MPK_TAILS", "1")
    assert compile_model(tiny_cfg(), batch=2, max_seq_len=128, num_sms=8).queues == tg.queues


def test_json_round_trip_keeps_tails(tg):
    back = TaskGraph.from_json(tg.to_json())
    assert back.events == tg.events and back.queues == tg.queues and back.tasks == tg.tasks
    assert tails(back) == tails(tg) and all(back.is_tail(t) for t in tails(tg))
    verify(back)


def test_tensor_parallel_tails_stay_on_their_rank_and_cross_rank_consumers_stay_queued(monkeypatch):
    """Every op kind asks for tails here: the merges of each rank become tails there; the allreduces
    and samplers, whose events have producers on both GPUs, stay queued."""
    monkeypatch.setattr(OpKind, "tail", True)
    tg = compile_model(tiny_cfg(), batch=1, max_seq_len=64, tp_size=2, num_sms=4)
    check_tail_rules(tg)
    kinds = {tg.ops[tg.tasks[t].op].kind for t in tails(tg)}
    assert "attention_merge" in kinds and {"allreduce_residual", "sample"}.isdisjoint(kinds)
    assert {tg.ops[tg.tasks[t].op].rank for t in tails(tg)} == {0, 1}
    for ev in tg.events:
        ranks = {tg.rank_of(p) for p in ev.producers} | {tg.rank_of(c) for c in range(ev.first_task, ev.stop_task)}
        if len(ranks) > 1:
            assert ev.tail == -1
            assert all(tg.tasks[c].queue >= 0 for c in range(ev.first_task, ev.stop_task))


def run_sim(cfg, weights, num_sms: int):
    return generate(cfg, weights, [[5, 17, 3]], 6, num_sms=num_sms, stop_at_eos=False, collect_logits=True)


@pytest.mark.parametrize("num_sms", [1, 2, 8])
def test_the_cpu_executor_computes_the_same_with_tails(num_sms, monkeypatch):
    """With every op kind asking, 1 SM makes most tasks tails, in chains (a tail completing the event
    of the next); the tokens and logits are those of the graph without tails, bit for bit."""
    cfg = tiny_cfg()
    weights = random_weights(cfg, seed=3, dtype=torch.float32)
    monkeypatch.setenv("MPK_TAILS", "0")
    want = run_sim(cfg, weights, num_sms)
    monkeypatch.setenv("MPK_TAILS", "1")
    monkeypatch.setattr(OpKind, "tail", True)
    got = run_sim(cfg, weights, num_sms)
    tg = got.taskgraph
    check_tail_rules(tg)
    chained = [t for t in tails(tg) if any(tg.is_tail(p) for p in tg.events[tg.tasks[t].wait].producers)]
    assert tails(tg) and (chained or num_sms > 2) and not tails(want.taskgraph)
    assert got.token_ids == want.token_ids and len(got.logits) == len(want.logits) == 8  # 3 prompt + 6 new - 1
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
