"""Host-side runtime logic that needs no GPU: the watchdog's diagnosis and the build's test hooks."""

from types import SimpleNamespace

import numpy as np
import pytest

from mpk.compiler import compile_model
from mpk.errors import MpkError
from mpk.models.config import ModelConfig
from mpk.runtime.build import nvcc_flags
from mpk.runtime.watchdog import stall_report

ABI = SimpleNamespace(kProgressWords=8, kPrSeq=0, kPrTask=1, kPrStep=2, kPrEvent=3, kPrState=4, kStateWaiting=1,
                      kStateAborted=4)


@pytest.fixture(scope="module")
def tg():
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    return compile_model(cfg, batch=1, max_seq_len=8, num_sms=4)


def words(rows):
    w = np.zeros((4, 8), dtype=np.int32)
    for sm, (task, step, event, state) in rows.items():
        w[sm, 1:5] = (task, step, event, state)
    return w.reshape(-1)


def test_the_earliest_wait_is_named_first(tg):
    early = next(t for t in tg.tasks if t.wait >= 0 and tg.events[t.wait].lag == 0)
    late = tg.tasks[-1]
    text = stall_report(tg, ABI, [words({0: (late.id, 1, late.wait, 4), 2: (early.id, 1, early.wait, 4)})], 4,
                        [[0] * len(tg.events)], first_step=1)
    assert text.startswith(f"SM 2 waits in step 1 with task {early.id} ") and f"; SM 0 waits in step 1 with task {late.id}" in text
    need = tg.events[early.wait].target
    assert f"on event {early.wait} (0/{need})" in text


def test_an_sm_stuck_inside_a_task_is_the_cause(tg):
    waiting = next(t for t in tg.tasks if t.wait >= 0)
    inside = tg.tasks[-1]
    text = stall_report(tg, ABI, [words({1: (waiting.id, 0, waiting.wait, 4), 3: (inside.id, 0, -1, 4)})], 4, None, 0)
    assert text.startswith(f"SM 3 was stuck inside task {inside.id} ") and "SM 1 waits" in text
    assert stall_report(tg, ABI, [words({})], 4, None, 0) == "no SM reported a wait"


@pytest.mark.parametrize("batch, allreduce", [(1, "allreduce_tagged"), (9, "allreduce_residual")])
def test_with_tensor_parallelism_the_report_names_the_rank_and_its_counter(batch, allreduce):
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    tg = compile_model(cfg, batch=batch, max_seq_len=8, num_sms=4, tp_size=2)
    # Rank 1 waits on an allreduce whose rank-0 partial never came; rank 0 is stuck inside a task.
    reduce = next(t for t in tg.tasks if tg.ops[t.op].kind == allreduce and t.queue >= tg.num_sms)
    inside = next(t for t in tg.tasks if t.queue < tg.num_sms and tg.ops[t.op].kind in ("linear", "linear_tagged"))
    counters = [[0] * len(tg.events), [0] * len(tg.events)]
    counters[1][reduce.wait] = 1
    text = stall_report(tg, ABI, [words({2: (inside.id, 0, -1, 4)}), words({1: (reduce.id, 0, reduce.wait, 4)})], 4,
                        counters, 0)
    need = tg.events[reduce.wait].target
    assert text.startswith(f"rank 0 SM 2 was stuck inside task {inside.id} ")
    assert f"; rank 1 SM 1 waits in step 0 with task {reduce.id} " in text
    # a counter's count, or for tagged words (no counter) what is missing
    assert (f"(1/{need})" if allreduce == "allreduce_residual" else "(its producers' tagged words of that step") in text


def test_fault_injection_flags_for_tests(monkeypatch):
    monkeypatch.setenv("MPK_INJECT", "hang:12")
    assert "-DMPK_INJECT_HANG=12" in nvcc_flags("sm_90a", False)
    monkeypatch.setenv("MPK_INJECT", "fault:3")
    assert "-DMPK_INJECT_FAULT=3" in nvcc_flags("sm_90a", False)
    monkeypatch.setenv("MPK_INJECT", "explode:3")
    with pytest.raises(MpkError, match="MPK_INJECT must be hang:TASK or fault:TASK"):
        nvcc_flags("sm_90a", False)
    monkeypatch.delenv("MPK_INJECT")
    monkeypatch.setenv("MPK_HEAD_KB", "lots")
    with pytest.raises(MpkError, match="MPK_HEAD_KB must be a number of KB or max"):
        nvcc_flags("sm_90a", False)
    monkeypatch.setenv("MPK_HEAD_KB", "max")
    assert "-DMPK_HEAD_KB=-1" in nvcc_flags("sm_90a", False)
