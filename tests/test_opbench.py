"""`mpk bench-op` on the CPU: one-op graphs, their schedules, the reference check, the table, and the
whole run with the CPU executor standing in for the megakernel; nvcc builds when nvcc exists."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import needs_nvcc
from mpk.cli import main
from mpk.codegen import generate_source, lower_op
from mpk.compiler import compile_model
from mpk.compiler.verify import verify
from mpk.errors import MpkError
from mpk.graph import ONE_PASS_ATTN_ROWS
from mpk.execution import INT_POISON, RunResult
from mpk.models.config import ModelConfig
from mpk.ops import OP_KINDS
from mpk.opbench import measure
from mpk.opbench.check import BOUNDS, poison, random_buffers, reference_outputs, relative_error, written_tensors
from mpk.opbench.program import (MAX_REPLICAS, bench_ops, compile_one_op, gpu_kinds, one_op_program, op_bytes,
                                 replica_name, replicas_for)
from mpk.opbench.report import OpRow, failures, format_op_bench
from mpk.sim import run as sim_run

POS = 21  # decode position of the checks: the cache holds 21 rows before it


def small_cfg(**kw) -> ModelConfig:
    # Qwen3 (q/k-norm) with odd sizes: o_proj is 60 x 64 and down 60 x 98, two linear_residual variants.
    base = dict(architecture="Qwen3ForCausalLM", vocab_size=128, hidden_size=60, intermediate_size=98, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, max_position_embeddings=1024, name="small")
    base.update(kw)
    return ModelConfig(**base)


CFG = small_cfg()


@pytest.fixture(scope="module")
def decode():
    """A graph long enough for attention splits and merges (mpk.graph.ONE_PASS_ATTN_ROWS)."""
    return compile_model(CFG, batch=2, max_seq_len=ONE_PASS_ATTN_ROWS + 32, num_sms=8, verify=False)


@pytest.fixture(scope="module")
def short():
    """A 40-position graph: one attention task per (sequence, group), no merge."""
    return compile_model(CFG, batch=2, max_seq_len=40, num_sms=8, verify=False)


def ops_by_name(tg):
    return {op.name: op for op in bench_ops(tg)}


def test_one_op_per_variant_in_graph_order(decode):
    ops = bench_ops(decode)
    variants = [str(lower_op(decode, op)[0]) for op in ops]
    assert len(set(variants)) == len(variants)
    assert [op.name for op in ops] == ["embed", "layers.0.qkv", "layers.0.attention",
                                       "layers.0.attn_merge", "layers.0.o", "layers.0.gate_up", "layers.0.down",
                                       "lm_head", "sample"]
    assert {op.kind for op in ops} == set(gpu_kinds(decode))
    assert [op.name for op in bench_ops(decode, ["linear_residual"])] == ["layers.0.o", "layers.0.down"]
    with pytest.raises(MpkError, match="no GPU op of kind 'allreduce_residual'.*attention_split"):
        bench_ops(decode, ["allreduce_residual"])


@pytest.mark.parametrize("name", ["embed", "layers.0.qkv", "layers.0.attention", "layers.0.attn_merge",
                                  "layers.0.down", "lm_head", "sample", "short:layers.0.attention"])
def test_one_op_graphs_verify_and_hold_every_task_once(decode, short, name):
    graph = short if name.startswith("short:") else decode
    op = ops_by_name(graph)[name.removeprefix("short:")]
    per_instance = len(OP_KINDS[op.kind].tiles(op, one_op_program(CFG, graph, op, 1)))
    for num_sms in (1, 8):
        tg = compile_one_op(CFG, graph, op, num_sms, replicas=3)
        verify(tg)  # structure, deadlock, races (disjoint writes), coverage, counters
        assert tg.events == [] and all(t.wait == -1 and not t.signals for t in tg.tasks)
        assert len(tg.tasks) == 3 * per_instance and len(tg.queues) == num_sms
        assert sorted(tid for q in tg.queues for tid in q) == list(range(len(tg.tasks)))
        if num_sms == 1:
            assert tg.queues[0] == list(range(len(tg.tasks)))
        else:
            assert sum(1 for q in tg.queues if q) == min(num_sms, len(tg.tasks))


def test_one_pass_attention_is_one_op_that_counts_the_rows_it_reads_at_the_position(short):
    assert [op.name for op in bench_ops(short)] == ["embed", "layers.0.qkv", "layers.0.attention", "layers.0.o",
                                                    "layers.0.gate_up", "layers.0.down", "lm_head", "sample"]
    op = ops_by_name(short)["layers.0.attention"]
    assert op.kind == "attention"
    one = compile_one_op(CFG, short, op, 4)
    kv_row = CFG.head_dim * 2  # one bf16 row of one group's K (or V)
    # Each extra position is one more K and V row read, for each of the 2 sequences x 2 groups.
    assert op_bytes(one, 0, POS + 1) - op_bytes(one, 0, POS) == 2 * 2 * 2 * kv_row


def test_replicas_own_their_weights_state_and_outputs(decode):
    op = ops_by_name(decode)["layers.0.attention"]
    tg = compile_one_op(CFG, decode, op, 4, replicas=2)
    assert [o.name for o in tg.ops] == ["layers.0.attention", "layers.0.attention@1"]
    second = tg.ops[1]
    assert second.inputs["k_cache"] == "layers.0.k_cache@1" and second.outputs["part"] == "layers.0.attn_part@1"
    assert second.inputs["qkv"] == "layers.0.qkv_out"  # activations are shared ...
    assert tg.tensors["layers.0.qkv_out"].kind == "state"  # ... and filled by the host before the launch
    assert tg.tensors["layers.0.k_cache@1"].shape == decode.tensors["layers.0.k_cache"].shape
    reference = compile_one_op(CFG, decode, op, 1)
    assert set(reference.tensors) < set(tg.tensors)  # the first replica keeps the decode graph's names
    assert second.inputs["rope"] == op.inputs["rope"]  # a table shared by every layer is not copied
    assert replica_name("x.1", 0) == "x.1" and replica_name("x.1", 3) == "x.1@3"


def test_replicas_stream_past_l2_on_an_8b_model():
    cfg = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                      num_layers=1, num_heads=32, num_kv_heads=8, head_dim=128, qk_norm=True,
                      max_position_embeddings=40960, name="qwen3-8b-1-layer")
    tg = compile_model(cfg, batch=1, max_seq_len=4104, num_sms=132, verify=False)
    got = {op.name: replicas_for(cfg, tg, op, 4096) for op in bench_ops(tg)}
    # qkv weights 50 MB, o 32 MB, gate_up 201 MB, down 101 MB, the bf16 KV cache of one layer 17 MB at 4096.
    assert got == {"embed": 1, "layers.0.qkv": 6, "layers.0.attention": 16, "layers.0.attn_merge": 1,
                   "layers.0.o": 8, "layers.0.gate_up": 2, "layers.0.down": 3, "lm_head": 1, "sample": 1}
    attention = compile_one_op(cfg, tg, bench_ops(tg, ["attention_split"])[0], 1)
    kv_row = 2 * 8 * 128 * 2
    assert op_bytes(attention, 0, 4096) - op_bytes(attention, 0, 1023) == (4096 - 1023) * kv_row
    assert MAX_REPLICAS >= 8


@pytest.mark.parametrize("name", ["embed", "layers.0.qkv", "layers.0.attention", "layers.0.attn_merge",
                                  "layers.0.o", "layers.0.gate_up", "lm_head", "sample", "short:layers.0.attention"])
def test_cpu_executor_on_a_one_op_graph_matches_a_direct_call_of_the_reference(decode, short, name):
    decode = short if name.startswith("short:") else decode
    op = ops_by_name(decode)[name.removeprefix("short:")]
    tg = compile_one_op(CFG, decode, op, 4, replicas=2)
    bufs = random_buffers(tg, CFG.vocab_size, "cpu", seed=1)
    direct = {n: b.clone() for n, b in bufs.items()}
    sim_run(tg, bufs, 1, first_step=POS)
    prog = one_op_program(CFG, decode, op, 4, replicas=2)
    kind = OP_KINDS[op.kind]
    for instance in prog.ops:
        for tt in kind.tiles(instance, prog):
            views = {r.role: direct[r.tensor][tuple(slice(a, b) for a, b in r.box)] for r in tt.reads + tt.writes}
            kind.run(instance, tt.tile, views, POS)
    for n in written_tensors(tg):
        torch.testing.assert_close(bufs[n], direct[n], rtol=0, atol=0, equal_nan=True)
        written = ~torch.isnan(bufs[n]) if bufs[n].is_floating_point() else bufs[n] != INT_POISON
        assert bool(written.any()), n


def test_reference_outputs_are_the_one_replica_graph_at_the_position(decode):
    op = ops_by_name(decode)["layers.0.attn_merge"]
    tg = compile_one_op(CFG, decode, op, 4, replicas=2)
    bufs = random_buffers(tg, CFG.vocab_size, "cpu")
    before = {n: b.clone() for n, b in bufs.items()}
    want = reference_outputs(compile_one_op(CFG, decode, op, 1), bufs, POS)
    assert set(want) == {"layers.0.attn", "layers.0.k_cache", "layers.0.v_cache"}
    for n in bufs:  # the reference ran on copies
        torch.testing.assert_close(bufs[n], before[n], rtol=0, atol=0, equal_nan=True)
    written_rows = (~torch.isnan(want["layers.0.k_cache"])).any(-1).any(-1).any(0).nonzero().flatten().tolist()
    assert written_rows == [POS]


def test_random_inputs_are_seeded_and_outputs_poisoned(decode):
    op = ops_by_name(decode)["sample"]
    tg = compile_one_op(CFG, decode, op, 2)
    a, b = random_buffers(tg, CFG.vocab_size, "cpu", 5), random_buffers(tg, CFG.vocab_size, "cpu", 5)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert (a["tokens"] == INT_POISON).all() and (a["prompt_len"] == 1).all()
    assert ((a["cand_idx"] >= 0) & (a["cand_idx"] < CFG.vocab_size)).all()
    w = random_buffers(compile_one_op(CFG, decode, ops_by_name(decode)["layers.0.qkv"], 2), 128, "cpu")
    assert w["layers.0.qkv"].dtype == torch.bfloat16 and torch.isnan(w["layers.0.qkv_out"]).all()
    assert 0.1 < float(w["layers.0.qkv"].float().std()) * 60 ** 0.5 < 10


def test_relative_error():
    want = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("-inf"), float("nan")]])
    assert relative_error(want.clone(), want) == 0.0
    noisy = want.clone()
    noisy[0, 0] += 0.1
    assert relative_error(noisy, want) == pytest.approx(0.1 / math.sqrt(1 + 4 + 9))
    missing = want.clone()
    missing[1, 0] = float("nan")
    assert relative_error(missing, want) == math.inf  # a region the kernel did not write
    extra = want.clone()
    extra[0, 2] = 0.0
    assert relative_error(extra, want) == math.inf  # a write outside the op's regions
    wrong_inf = want.clone()
    wrong_inf[1, 1] = 5.0
    assert relative_error(wrong_inf, want) == math.inf
    ints = torch.tensor([3, 4, 5, INT_POISON])
    assert relative_error(torch.tensor([3, 4, 6, INT_POISON]), ints) == pytest.approx(1 / 3)
    assert relative_error(torch.tensor([3, 4, 5, 0]), ints) == math.inf
    buf = torch.zeros(3)
    poison(buf)
    assert torch.isnan(buf).all()


def fake_trace(steps: int, tasks: int, task_ns: int, gap_ns: int = 0) -> torch.Tensor:
    """Every task of a step back to back on one SM: each `task_ns` long, `gap_ns` between."""
    t = torch.zeros(steps, tasks, 3, dtype=torch.int64)
    now = 1_000
    for s in range(steps):
        for i in range(tasks):
            t[s, i] = torch.tensor([now, now + gap_ns, now + gap_ns + task_ns])
            now += gap_ns + task_ns
    return t


def test_measure_from_traces():
    trace = fake_trace(4, 5, task_ns=2_000, gap_ns=500)
    assert measure.task_ns(trace).tolist() == [2_000] * 15  # step 0 is left out
    assert measure.step_ns(trace) == 5 * 2_500
    slow = fake_trace(4, 5, task_ns=4_000)
    assert measure.median_task_us([trace, slow, slow]) == 4.0
    assert measure.mean_task_us([trace, slow]) == 3.0
    assert measure.median_step_us([trace, slow, slow]) == 20.0
    with pytest.raises(MpkError, match="at least 2 steps"):
        measure.step_ns(trace[:1])
    trace[2, 3, 2] = 0
    with pytest.raises(MpkError, match="misses tasks"):
        measure.task_ns(trace)


def fake_row(**kw) -> OpRow:
    base = dict(kind="rmsnorm_linear", op="layers.0.qkv", variant="RmsnormLinear<1, 4096, false, ActF32>", tasks=128,
                replicas=6, op_bytes=53_500_000, op_flops=53_400_000, task_us_1sm=12.5, task_us_1sm_mean=12.7, task_us_all=30.0,
                op_us_all=14.0, error=2.5e-7, bound=1e-3)
    base.update(kw)
    return OpRow(**base)


def fake_result(rows) -> dict:
    return {"model": "qwen3-8b", "gpu": "NVIDIA H200", "num_sms": 132, "batch": 1, "activations": "float32",
            "context": 4096, "steps": 8, "repeats": 3, "stream_read_gbps": 4600.0,
            "rows": [r.as_dict(4600.0) for r in rows]}


def test_row_derives_bandwidths():
    r = fake_row()
    assert r.bytes_per_task == pytest.approx(53_500_000 / 128)
    assert r.gbps_per_sm == pytest.approx(53_500_000 / 128 / 12.5e-6 / 1e9)
    assert r.gbps_all == pytest.approx(53_500_000 / 14e-6 / 1e9)
    assert r.tflops_all == pytest.approx(53_400_000 / 14e-6 / 1e12)
    d = r.as_dict(4600.0)
    assert d["pct_of_ceiling"] == pytest.approx(100 * r.gbps_all / 4600) and d["ok"]
    assert not fake_row(error=math.inf).ok and fake_row().as_dict(None)["pct_of_ceiling"] is None


def test_table_and_json_from_a_fake_result():
    result = fake_result([fake_row(staged_us_1sm=1.25, warp0_us_1sm=10.5),
                          fake_row(kind="attention_split", op="layers.0.attention",
                                   variant="AttentionSplit<4, 128, ActF32>", error=5e-3)])
    assert json.loads(json.dumps(result)) == result
    lines = format_op_bench(result).splitlines()
    assert lines[0].startswith("qwen3-8b batch 1 on NVIDIA H200 (132 SMs), float32 activations, context 4096")
    assert lines[0].endswith("streaming ceiling 4600 GB/s")
    assert "us/task" in lines[1] and "(1 SM)" in lines[2]
    qkv = lines[3].split()
    assert qkv[:5] == ["rmsnorm_linear", "RmsnormLinear<1,", "4096,", "false,", "ActF32>"]
    assert qkv[5:] == ["128", "418.0", "12.50", "33.4", "14.00", "3821", "83.1%", "3.8", "2.5e-07", "1.25", "10.50"]
    assert lines[4].split()[-4:] == ["5.0e-03", "FAIL", "-", "-"]  # a template without marks
    assert [r["op"] for r in failures(result)] == ["layers.0.attention"]


class CpuKernel:
    """The megakernel's run interface on the CPU executor, with made-up task times (20 ns + 1 ns per byte)."""

    corrupt: str | None = None  # an output tensor to get wrong, as a broken template would

    def __init__(self, tg, device=None, buffers=None, task_marks=False):
        self.tg, self.buffers, self.task_marks = tg, buffers, task_marks

    def run(self, num_steps, first_step=0, eos_token_ids=None, trace=False, watchdog_seconds=None):
        sim_run(self.tg, self.buffers, num_steps, first_step=first_step)
        if self.corrupt in self.buffers:
            self.buffers[self.corrupt].mul_(1.01)
        spans = marks = None
        if trace:  # with task_marks, every task marked: inputs staged 10 ns after its start, warp 0 done 10 ns and the last warp 5 ns before its end
            spans = torch.zeros(num_steps, len(self.tg.tasks), 3, dtype=torch.int64)
            marks = torch.zeros(num_steps, len(self.tg.tasks), 3, dtype=torch.int64)
            clock = [0] * self.tg.num_sms
            for s in range(num_steps):
                for q, queue in enumerate(self.tg.queues):
                    for tid in queue:
                        start = clock[q] + 100
                        clock[q] = start + 20 + self.tg.tasks[tid].bytes
                        spans[s, tid] = torch.tensor([start - 100, start, clock[q]])
                        marks[s, tid] = torch.tensor([start + 10, clock[q] - 10, clock[q] - 5])
        return RunResult([], num_steps, 0.0, False, [], spans, marks if self.task_marks else None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture
def cpu_gpu(monkeypatch):
    """run_op_bench on the CPU: the executor for the kernel, 4 SMs, no nvcc, a made-up ceiling."""
    import mpk.bench
    import mpk.opbench.run as run_mod
    import mpk.runtime

    monkeypatch.setattr(run_mod, "gpu", lambda: (torch.device("cpu"), "CPU stand-in", 4, "sm_90a"))
    monkeypatch.setattr(run_mod, "prebuild", lambda graphs, arch: None)
    monkeypatch.setattr(mpk.bench, "stream_read_gbps", lambda device, nbytes, num_sms: 1.0)
    monkeypatch.setattr(mpk.runtime, "Megakernel", CpuKernel)
    monkeypatch.setattr(CpuKernel, "corrupt", None)
    return CpuKernel


def test_whole_bench_on_the_cpu_executor(cpu_gpu, capsys):
    from mpk.opbench.run import run_op_bench

    result = run_op_bench("tiny", batch=2, context=POS, steps=3, repeats=2)
    rows = result["rows"]
    assert [r["kind"] for r in rows] == ["embed", "rmsnorm_linear", "attention", "linear_residual",
                                         "rmsnorm_gate_up_silu", "linear_residual", "rmsnorm_lm_head_argmax", "sample"]
    assert all(r["error"] == 0.0 and r["ok"] and r["bound"] == BOUNDS["float32"] for r in rows)
    for r in rows:
        # 1 ns per cost-model byte: a task's time is 20 ns plus its bytes (attention: a half-full cache here).
        assert r["task_us_1sm"] == r["task_us_all"] and r["task_us_1sm"] > 0
        assert r["gbps_per_sm"] == pytest.approx(r["bytes_per_task"] / r["task_us_1sm"] / 1e3)
        assert r["staged_us_1sm"] == pytest.approx(0.01)
        assert r["warp0_us_1sm"] == pytest.approx(r["task_us_1sm"] - 0.02)
    assert result["stream_read_gbps"] == 1.0 and result["num_sms"] == 4 and result["context"] == POS

    assert main(["bench-op", "tiny", "--batch", "2", "--op", "attention,sample", "--context", str(POS),
                 "--steps", "3", "--json"]) == 0
    assert [r["kind"] for r in json.loads(capsys.readouterr().out)["rows"]] == ["attention", "sample"]
    # A longer context compiles attention as splits and a merge (at batch 1: 4 SMs over 2 KV groups), each
    # checked and timed alone.
    assert main(["bench-op", "tiny", "--batch", "1", "--op", "attention_split,attention_merge", "--context",
                 str(ONE_PASS_ATTN_ROWS + 72),
                 "--steps", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["kind"] for r in rows] == ["attention_split", "attention_merge"] and all(r["ok"] for r in rows)


def test_prefill_variants_bench_as_gemms_on_the_cpu_executor(cpu_gpu):
    from mpk.opbench.run import run_op_bench

    rows = 300  # x 2 sequences: row blocks of 128, 128, 128, 128 and 88
    result = run_op_bench("tiny", batch=2, steps=2, repeats=1, prefill=rows,
                          kinds=["rmsnorm_linear", "rmsnorm_gate_up_silu", "linear_residual"])
    got = result["rows"]
    assert [r["kind"] for r in got] == ["rmsnorm_linear", "linear_residual", "rmsnorm_gate_up_silu", "linear_residual"]
    assert all(r["variant"].endswith(", -128>") for r in got)  # COLS = -(weight rows per task): a GEMM
    assert all(r["ok"] and r["bound"] == BOUNDS["bfloat16"] and r["tflops_all"] > 0 for r in got)
    gate_up = got[2]
    assert gate_up["variant"].startswith(f"RmsnormGateUpSilu<{2 * rows}, ")
    assert result["prefill"] == rows


def test_a_wrong_output_fails_the_bench_in_one_line(cpu_gpu, capsys):
    cpu_gpu.corrupt = "x.2"  # the down projection's output (and no input of the O projection)
    code = main(["bench-op", "tiny", "--op", "linear_residual", "--context", str(POS), "--steps", "2",
                 "--repeats", "1"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "FAIL" not in out.splitlines()[3] and " 1.0e-02 FAIL " in out.splitlines()[4]
    assert err.count("\n") == 1 and re.match(r"mpk: error: outputs differ from the reference beyond the bound: "
                                              r"LinearResidual<1, 344, ActF32(, \d+)?> 1\.0e-02 > 1e-03", err)


def test_bad_arguments_are_one_line_errors(cpu_gpu, capsys):
    for argv, phrase in ((["--steps", "1"], "--steps must be at least 2"),
                         (["--context", "5000"], "does not fit tiny's 2048 positions"),
                         (["--op", "linear", "--context", "8"], "no GPU op of kind 'linear'")):
        assert main(["bench-op", "tiny", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mpk: error: ") and phrase in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_bench_op_without_a_gpu_is_one_line(capsys):
    assert main(["bench-op"]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("mpk: error: no CUDA GPU is available")
    assert "Traceback" not in err


@needs_nvcc
def test_one_op_kernels_build_for_sm_90a(tmp_path, monkeypatch):
    from mpk.codegen import variants_signature
    from mpk.models import resolve_model
    from mpk.opbench.run import prebuild
    from mpk.runtime.abi import load_library
    from mpk.runtime.build import build
    from mpk.runtime.tables import build_tables

    monkeypatch.setenv("MPK_CACHE_DIR", str(tmp_path))
    cfg = resolve_model("qwen3-8b").cfg
    tg = compile_model(cfg, batch=4, max_seq_len=72, num_sms=132, verify=False)
    graphs = [compile_one_op(cfg, tg, op, 132) for op in bench_ops(tg, ["embed", "attention", "sample"])]
    prebuild([(g, False) for g in graphs] + [(graphs[1], True)], "sm_90a")  # the one-SM kernels carry marks
    for g in graphs:
        source = generate_source(g)
        assert source.count("case ") == 1 and "MPK_TASK_MARKS" not in source
        lib = load_library(build(source, "sm_90a"))  # a cache hit: prebuild made it
        assert lib.mpk_variants().decode() == variants_signature(build_tables(g).variants)
    marked = generate_source(graphs[1], task_marks=True)
    assert "#define MPK_TASK_MARKS 1" in marked
    assert load_library(build(marked, "sm_90a")).mpk_variants().decode() == variants_signature(
        build_tables(graphs[1]).variants)
    assert len(list(tmp_path.glob("*.so"))) == 4
