"""The Perfetto trace writer on a synthetic recording (the GPU records real ones)."""

import json

import pytest
import torch

from mpk.compiler import compile_model
from mpk.models.config import ModelConfig
from mpk.profile import format_trace_summary, summarize_trace, write_trace


def test_trace_has_one_span_per_task_instance_on_its_sm(tmp_path):
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    tg = compile_model(cfg, batch=1, max_seq_len=8, num_sms=4, verify=False)
    steps, n = 2, len(tg.tasks)
    spans = torch.zeros(steps, n, 3, dtype=torch.int64)
    for s in range(steps):
        for t in range(n):
            base = 10_000 + (s * n + t) * 1000
            spans[s, t] = torch.tensor([base, base + 200 * (t % 2), base + 700])
    path = tmp_path / "trace.json"
    count = write_trace(str(path), tg, spans)
    events = json.loads(path.read_text())["traceEvents"]
    runs = [e for e in events if e["ph"] == "X" and e["cat"] != "wait"]
    waits = [e for e in events if e["ph"] == "X" and e["cat"] == "wait"]
    assert len(runs) == steps * n and len(waits) == steps * (n // 2)
    assert count == len(runs) + len(waits)
    first = runs[0]
    assert first["ts"] == 0 and first["dur"] == 0.7 and first["tid"] == tg.tasks[0].queue
    assert {e["args"]["step"] for e in runs} == {0, 1}
    assert all(e["name"] == tg.ops[tg.tasks[e["args"]["task"]].op].name for e in runs)


def test_trace_summary_splits_sm_time_into_running_waiting_and_between():
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    tg = compile_model(cfg, batch=1, max_seq_len=8, num_sms=4, verify=False)
    steps, slot = 3, 1000
    longest = max(len(q) for q in tg.queues)
    spans = torch.zeros(steps, len(tg.tasks), 3, dtype=torch.int64)
    # Every task gets a 1000 ns slot on its SM: 100 ns between tasks, then the first op kind's
    # tasks wait 200 ns and run 700, the others run 900.
    first_kind = tg.ops[tg.tasks[0].op].kind
    for s in range(steps):
        for queue in tg.queues:
            for i, tid in enumerate(queue):
                clock = 1_000_000 + (s * longest + i) * slot
                start = clock + (300 if tg.ops[tg.tasks[tid].op].kind == first_kind else 100)
                spans[s, tid] = torch.tensor([clock + 100, start, clock + slot])
    summary = summarize_trace(tg, spans)
    assert summary["steps"] == steps - 1
    sm_ns = (longest * slot - 100) * tg.num_queues  # a step: the first wait to the last end, on every SM
    kinds = {r["kind"]: r for r in summary["kinds"]}
    assert set(kinds) == {tg.ops[t.op].kind for t in tg.tasks}
    count = {k: sum(1 for t in tg.tasks if tg.ops[t.op].kind == k) for k in kinds}
    for k, r in kinds.items():
        run = 700 if k == first_kind else 900
        assert r["tasks_per_step"] == count[k]
        assert abs(r["run_us_per_task"] - run / 1e3) < 1e-9
        assert abs(r["run_share"] - count[k] * run / sm_ns) < 1e-9
        assert abs(r["wait_share"] - (count[k] * 200 / sm_ns if k == first_kind else 0)) < 1e-9
        kind_bytes = sum(t.bytes for t in tg.tasks if tg.ops[t.op].kind == k)
        assert r["run_gbps"] == pytest.approx(kind_bytes / (count[k] * run * 1e-9) * tg.num_queues)
    assert abs(summary["step_us"] - (longest * slot - 100) / 1e3) < 1e-9
    assert abs(summary["run_share"] + summary["wait_share"] + summary["other_share"] - 1) < 1e-12
    text = format_trace_summary(summary)
    assert first_kind in text and "waiting" in text
    with pytest.raises(ValueError, match="two fully recorded steps"):
        summarize_trace(tg, spans[:1])


def test_trace_summary_splits_marked_tasks_into_staging_warp0_and_after():
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    tg = compile_model(cfg, batch=1, max_seq_len=8, num_sms=4, verify=False)
    spans = in_id_order(tg, 3, 100, lambda s, t: 900)
    kind_of = [tg.ops[t.op].kind for t in tg.tasks]
    marked_kind = next(tg.ops[t.op].kind for t in tg.tasks if tg.ops[t.op].layer is not None)
    # Tasks of the layer's first kind stage for a step-dependent 100-300 ns (median 200), then warp 0 works
    # 500 ns and the last warp 40 ns more; other kinds set no marks, as templates without marks leave them.
    marks = torch.zeros(spans.shape[0], len(tg.tasks), 3, dtype=torch.int64)
    for s in range(spans.shape[0]):
        for tid, kind in enumerate(kind_of):
            if kind == marked_kind:
                staged = spans[s, tid, 1] + 100 * (s + 1 + tid % 3)
                marks[s, tid] = torch.stack([staged, staged + 500, staged + 540])
    kinds = {r["kind"]: r for r in summarize_trace(tg, spans, marks)["kinds"]}
    first = kinds[marked_kind]
    ends = spans[1:, :, 2] - marks[1:, :, 2]
    want_staged = (marks[1:, :, 0] - spans[1:, :, 1])[:, [k == marked_kind for k in kind_of]]
    assert first["staged_us"] == pytest.approx(float(want_staged.double().median()) / 1e3)
    assert first["warp0_us"] == pytest.approx(0.5) and first["spread_us"] == pytest.approx(0.04)
    assert first["after_us"] == pytest.approx(float(ends[:, [k == marked_kind for k in kind_of]].double().median()) / 1e3)
    assert all("staged_us" not in r for k, r in kinds.items() if k != marked_kind)
    text = format_trace_summary(summarize_trace(tg, spans, marks))
    assert "inputs staged" in text and "inputs staged" not in format_trace_summary(summarize_trace(tg, spans))
    # The layer table splits each op of the middle layer the same way, op by op.
    for row in summarize_trace(tg, spans, marks)["layer"]["ops"]:
        ids = [t.id for t in tg.tasks if tg.ops[t.op].name == row["op"]]
        if row["kind"] != marked_kind:
            assert "staged_us" not in row
            continue
        assert row["staged_us"] == pytest.approx(float((marks[1:, ids, 0] - spans[1:, ids, 1]).double().median()) / 1e3)
        assert row["warp0_us"] == pytest.approx(0.5) and row["spread_us"] == pytest.approx(0.04)
        assert row["after_us"] == pytest.approx(float((spans[1:, ids, 2] - marks[1:, ids, 2]).double().median()) / 1e3)
    assert "staging" in text.split("layer 0, us from")[1]


def in_id_order(tg, steps: int, waited_ns: int, run_ns) -> torch.Tensor:
    """Spans of tasks that start in id order (a topological order), 1000 ns apart, each having waited
    `waited_ns` and running `run_ns(step, task)` ns."""
    spans = torch.zeros(steps, len(tg.tasks), 3, dtype=torch.int64)
    for s in range(steps):
        for t in range(len(tg.tasks)):
            clock = 10_000_000 + (s * len(tg.tasks) + t) * 1000
            spans[s, t] = torch.tensor([clock - waited_ns, clock, clock + run_ns(s, t)])
    return spans


def test_wake_latency_is_from_the_last_producer_end_to_the_consumer_start():
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    tg = compile_model(cfg, batch=1, max_seq_len=8, num_sms=4, verify=False)
    steps = 3
    # Tasks run in id order, 600 ns long: a consumer starts (own id - last producer id) * 1000 - 600 ns
    # after its last producer ended. Every task is already waiting.
    spans = in_id_order(tg, steps, 10**6, lambda s, t: 600)
    summary = summarize_trace(tg, spans)
    for r in summary["kinds"]:
        want = []
        for t in tg.tasks:
            ev = tg.events[t.wait] if t.wait >= 0 else None
            if tg.ops[t.op].kind == r["kind"] and ev is not None and ev.lag == 0:
                want.append((t.id - max(ev.producers)) * 1000 - 600)
        if want:
            assert r["wake_us"] == pytest.approx(float(torch.tensor(want, dtype=torch.float64).median()) / 1e3)
        ops = [t for t in tg.tasks if tg.ops[t.op].kind == r["kind"]]
        by_op = {}
        for t in ops:
            by_op.setdefault(t.op, []).append(t.id)
        spans_us = [((max(ids) - min(ids)) * 1000 + 600) / 1e3 for ids in by_op.values()]
        assert r["op_span_us"] == pytest.approx(float(torch.tensor(spans_us, dtype=torch.float64).median()))
        # The tail: from the op's median task end (the lower middle one) to its last.
        tails_us = [(max(ids) - sorted(ids)[(len(ids) - 1) // 2]) for ids in by_op.values()]
        assert r["tail_us"] == pytest.approx(float(torch.tensor(tails_us, dtype=torch.float64).median()))
        assert any(t > 0 for t in tails_us) or r["tail_us"] == 0


def test_the_summary_times_the_middle_layers_ops_from_the_layers_first_start():
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    tg = compile_model(cfg, batch=1, max_seq_len=8, num_sms=4, verify=False)
    steps = 3
    # Tasks run in id order, 600 ns long (task t's run takes 600 + t % 3 ns in step 1 only, which the
    # median over the steps leaves out).
    spans = in_id_order(tg, steps, 100, lambda s, t: 600 + (t % 3 if s == 1 else 0))
    layer = summarize_trace(tg, spans)["layer"]
    assert layer["layer"] == 1
    ops = [o for o, op in enumerate(tg.ops) if op.layer == 1]
    first = min(t.id for t in tg.tasks if t.op in ops)
    want = []
    for o in ops:
        ids = [t.id for t in tg.tasks if t.op == o]
        want.append({"op": tg.ops[o].name, "tasks": len(ids), "first_start_us": (min(ids) - first) * 1000 / 1e3,
                     "last_end_us": ((max(ids) - first) * 1000 + 600) / 1e3, "task_us": 0.6})
    want.sort(key=lambda r: r["first_start_us"])
    assert [r["op"] for r in layer["ops"]] == [w["op"] for w in want]
    for got, w in zip(layer["ops"], want):
        assert got["tasks"] == w["tasks"]
        for key in ("first_start_us", "last_end_us", "task_us"):
            assert got[key] == pytest.approx(w[key]), (got["op"], key)
    text = format_trace_summary(summarize_trace(tg, spans))
    assert "layer 1, us from its first task's start" in text and want[-1]["op"] in text


def test_a_tensor_parallel_summary_reports_the_waits_on_other_gpus():
    """At TP=2 the summary adds the SM time spent waiting for events another GPU's tasks signal."""
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    tg = compile_model(cfg, batch=1, max_seq_len=8, num_sms=4, tp_size=2, verify=False)
    rank = [t.queue // tg.num_sms for t in tg.tasks]
    peer = [t.wait >= 0 and any(rank[p] != rank[t.id] for p in tg.events[t.wait].producers) for t in tg.tasks]
    assert any(peer) and not all(peer)
    steps, slot = 3, 1000

    def recorded(tg, waited):  # every task a 1000 ns slot on its SM: it waits `waited(task)` ns, then runs
        longest = max(len(q) for q in tg.queues)
        spans = torch.zeros(steps, len(tg.tasks), 3, dtype=torch.int64)
        for s in range(steps):
            for queue in tg.queues:
                for i, tid in enumerate(queue):
                    clock = 1_000_000 + (s * longest + i) * slot
                    spans[s, tid] = torch.tensor([clock, clock + waited(tid), clock + 900])
        return spans, (longest * slot - 100) * tg.num_queues

    spans, sm_ns = recorded(tg, lambda tid: 300 if peer[tid] else 100)
    summary = summarize_trace(tg, spans)
    assert summary["peer_wait_share"] == pytest.approx(sum(peer) * 300 / sm_ns)
    assert "waits on other GPUs' tasks" in format_trace_summary(summary)
    one_gpu = compile_model(cfg, batch=1, max_seq_len=8, num_sms=4, verify=False)
    summary = summarize_trace(one_gpu, recorded(one_gpu, lambda tid: 100)[0])
    assert "peer_wait_share" not in summary and "other GPUs" not in format_trace_summary(summary)


def test_tensor_parallel_spans_are_put_on_one_timer_before_they_are_summed_up():
    """Each GPU stamps its own timer. A TP=2 run simulated in true time (every task starts 700 ns
    after its last producer ends) and recorded with rank 1's timer 5 us ahead reads, once aligned,
    as the true run: the same times, the same step and the same 700 ns cross-GPU wake."""
    import dataclasses

    from mpk.profile import align_rank_clocks

    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    tg = compile_model(cfg, batch=1, max_seq_len=8, num_sms=4, tp_size=2, verify=False)
    steps, wake, period = 3, 700, 10**7
    true = torch.zeros(steps, len(tg.tasks), 3, dtype=torch.int64)
    for s in range(steps):
        base = 10**9 + s * period
        for t in tg.tasks:  # ids are a topological order
            ev = tg.events[t.wait] if t.wait >= 0 else None
            start = base + 100 if ev is None or ev.lag else max(int(true[s, p, 2]) for p in ev.producers) + wake
            # Rank 1's tasks run longer in even layers, rank 0's in odd ones: some cross-GPU wait in each
            # direction has its last producer on the other GPU, which the alignment needs to be exact.
            op = tg.ops[t.op]
            slow = 400 if op.layer is not None and op.rank == op.layer % 2 else 0
            true[s, t.id] = torch.tensor([base + 50, start, start + 300 + slow + 90 * (t.id % 7)])
    rank = torch.tensor([tg.ops[t.op].rank for t in tg.tasks])
    shifted = true.clone()
    shifted[:, rank == 1] += 5000
    assert torch.equal(align_rank_clocks(tg, shifted), true)
    got, want = summarize_trace(tg, shifted), summarize_trace(tg, true)
    assert got["peer_wake_us"] == pytest.approx(wake / 1e3) == pytest.approx(want["peer_wake_us"])
    assert got["step_us"] == pytest.approx(want["step_us"])
    assert summarize_trace(tg, shifted)["kinds"] == want["kinds"]
    naive = summarize_trace(dataclasses.replace(tg, tp_size=1), shifted)  # no alignment: a skewed view
    assert naive["step_us"] > want["step_us"] + 4.0
