"""Codegen and build: the generated source and device tables (CPU), and nvcc builds when nvcc exists."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import needs_nvcc
from mpk.codegen import generate_source, graph_variants, lower_op, render_source
from mpk.compiler import compile_model, compile_program
from mpk.errors import MpkError
from mpk.graph import ATTN_RING_ROWS, ONE_PASS_ATTN_ROWS, build_decode_program
from mpk.models.config import ModelConfig
from mpk.models.presets import get_preset
from mpk.ops import OP_KINDS
from mpk.prefill import compile_prefill
import mpk.runtime.build as build_mod
from mpk.runtime.abi import OP_DTYPE, TASK_DTYPE, Abi, Params, load_library
from mpk.runtime.build import build, find_nvcc
from mpk.runtime.tables import build_tables, op_table


def tiny_cfg(**kw) -> ModelConfig:
    # Odd sizes on purpose: hidden 60 and intermediate 98 are not multiples of 8, o_proj is 60 x 64.
    base = dict(architecture="Qwen3ForCausalLM", vocab_size=128, hidden_size=60, intermediate_size=98, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, max_position_embeddings=1024)
    base.update(kw)
    return ModelConfig(**base)


def graph(cfg=None, batch=2, max_seq_len=40, num_sms=8, tp_size=1, **precision):
    return compile_program(build_decode_program(cfg or tiny_cfg(), batch, max_seq_len, tp_size, num_sms, **precision))


QWEN3_8B = get_preset("qwen3-8b")


@pytest.fixture(scope="module")
def tg():
    return graph()


def names(variants) -> set[str]:
    return {str(v) for v in variants}


def test_source_has_one_case_per_variant(tg):
    variants, op_variant, _ = graph_variants(tg)
    src = generate_source(tg)
    assert len(variants) == len(set(variants))
    for i, v in enumerate(variants):
        assert f"using V{i} = {v.template}<{', '.join((f'S{i}',) + v.args)}>;" in src
        assert f"case {i}: V{i}::run(t, op, smem); break;" in src
    assert src.count("case ") == len(variants)
    # Every op kind of the graph has a variant; both linear_residual ops (K 64 and 98) are distinct, each
    # over the bf16 x that the attention and gate/up store (mpk.graph.product_input_dtype). A 40-position
    # graph attends in one pass per (sequence, group).
    assert {v.template for v in variants} == {
        "Embed", "RmsnormLinear", "Attention", "LinearResidual", "RmsnormGateUpSilu", "RmsnormLmHeadArgmax", "Sample"}
    assert {"LinearResidual<2, 64, ActF32Bf16X, 1, float>", "LinearResidual<2, 98, ActF32Bf16X, 1, float>"} <= names(variants)
    assert any(n.startswith("RmsnormGateUpSilu<") and n.endswith(", bf16>") for n in names(variants))
    assert {"RmsnormLinear<2, 60, false, ActF32Bf16Inputs, 2>", "Attention<2, 16, true, ActF32, bf16, bf16>"} <= names(variants)


def test_longer_contexts_split_attention_and_merge():
    """Past ONE_PASS_ATTN_ROWS positions each (sequence, group) gets splits and a merge that appends the row."""
    longer = graph(max_seq_len=ONE_PASS_ATTN_ROWS + 1)
    kinds = [op.kind for op in longer.ops]
    assert "attention" not in kinds and kinds.count("attention_split") == kinds.count("attention_merge") == 2
    split = next(op for op in longer.ops if op.kind == "attention_split")
    assert split.params["splits"] == 2  # 8 SMs over 2 sequences x 2 groups
    assert {"AttentionSplit<2, 16, true, ActF32, bf16, false>", "AttentionMerge<2, 16, true, ActF32, bf16, bf16>"} <= names(
        graph_variants(longer)[0])


@pytest.mark.parametrize("max_seq_len, ring", [(2 * ATTN_RING_ROWS - 2, False), (2 * ATTN_RING_ROWS, True)])
def test_splits_of_many_rows_keep_their_rows_in_a_ring(max_seq_len, ring):
    """The K/V ring is compiled in where a split may hold ATTN_RING_ROWS rows: 2 sequences x 2 groups
    on 8 SMs make 2 splits, of max_seq_len / 2 rows at the longest context."""
    split = next(op for op in graph(max_seq_len=max_seq_len).ops if op.kind == "attention_split")
    assert split.params["splits"] == 2
    assert f"AttentionSplit<2, 16, true, ActF32, bf16, {str(ring).lower()}>" in names(
        graph_variants(graph(max_seq_len=max_seq_len))[0])


def test_slots_name_every_operand_and_scalar_of_the_op_kind(tg):
    """The generated Slots struct of each variant is the op kind's roles in order (less the aliases a
    kind reads through another role's pointer), then its scalars."""
    variants, op_variant, op_args = graph_variants(tg)
    src = generate_source(tg)
    for op, vi, args in zip(tg.ops, op_variant, op_args):
        v = variants[vi]
        kind = OP_KINDS[op.kind]
        operands = {o.role: o for o in kind.inputs + kind.outputs}
        roles = [role for role, _ in kind.slots(op)]
        assert list(v.ptrs) == roles and set(roles) <= set(operands)
        assert kind.kind != "attention" or roles == ["qkv", "rope", "q_norm", "k_norm", "out", "k_cache", "v_cache"]
        bound = {**op.inputs, **op.outputs}
        for role, tensor in zip(roles, args.ptrs):
            # A per-rank operand is one slot holding its tensors of every rank.
            want = tuple(bound[f"{role}{k}"] for k in range(op.params["ranks"])) if operands[role].per_rank \
                else bound.get(role)
            assert tensor == want
        assert f"enum Ptr : int {{ {', '.join(v.ptrs)} }};" in src
        assert len(args.ints) == len(v.ints) and len(args.floats) == len(v.floats)


def test_layers_share_variants_and_source_ignores_run_time_sizes():
    small = generate_source(graph(num_sms=16, max_seq_len=40))
    other = generate_source(graph(tiny_cfg(num_layers=5), num_sms=20, max_seq_len=100))
    # Layer count, SM count and context length are run-time table data (here both SM counts give 8-column
    # tiles; a warp's column count is a template argument).
    assert small == other
    assert generate_source(graph(batch=3)) != small  # batch sizes GEMV registers
    big = build_decode_program(QWEN3_8B, 1, 4096, 1, 132)
    variants, _, _ = graph_variants(compile_program(big))
    assert len(variants) == 9 and len(generate_source(compile_program(big))) < 6000


def test_flags_pick_variants():
    variants, _, _ = graph_variants(graph(tiny_cfg(architecture="Qwen2ForCausalLM", qk_norm=False, qkv_bias=True)))
    assert {"RmsnormLinear<2, 60, true, ActF32Bf16Inputs, 2>", "Attention<2, 16, false, ActF32, bf16, bf16>"} <= names(variants)


def floats_close(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(np.isclose(got[k], want[k]) for k in want)


def test_tables_mirror_the_graph(tg):
    t = build_tables(tg)
    assert TASK_DTYPE.itemsize == 32 and OP_DTYPE.itemsize == 144 and ctypes.sizeof(Params) == 31 * 8
    _, op_variant, _ = graph_variants(tg)
    assert len(t.tasks) == len(tg.tasks)
    for i, task in enumerate(tg.tasks):
        row = t.tasks[i]
        assert row["variant"] == op_variant[task.op] and row["op"] == task.op and row["wait"] == task.wait
        assert tuple(row["tile"][: len(task.tile)]) == task.tile and not row["tile"][len(task.tile):].any()
        assert t.signals[row["sig_off"]: row["sig_off"] + row["sig_cnt"]].tolist() == task.signals
        assert not t.signal_rank[row["sig_off"]: row["sig_off"] + row["sig_cnt"]].any()
    assert t.queue_off[0] == 0 and t.queue_off[-1] == len(tg.tasks) and len(t.queue_off) == tg.num_sms + 1
    for q, queue in enumerate(tg.queues):
        assert t.queue_tasks[t.queue_off[q]: t.queue_off[q + 1]].tolist() == queue
    assert t.ev_target.tolist() == [e.target for e in tg.events]
    assert t.ev_lag.tolist() == [e.lag for e in tg.events]
    assert not t.ev_sys.any()  # one GPU: no event crosses ranks
    assert t.n_sample == tg.batch


def test_op_table_fills_pointer_slots_by_role(tg):
    t = build_tables(tg)
    variants, op_variant, _ = graph_variants(tg)
    addr = {name: 4096 * (i + 1) for i, name in enumerate(tg.tensors)}
    lists_at = 1 << 40
    table, lists = op_table(t.op_args, addr.__getitem__, lists_at)
    for i, op in enumerate(tg.ops):
        roles = {**op.inputs, **op.outputs}
        for slot, role in enumerate(variants[op_variant[i]].ptrs):
            if role in roles:
                assert table[i]["ptr"][slot] == addr[roles[role]], (op.name, role)
            elif f"{role}0" in roles:  # per-rank: the slot points at the address list of its ranks
                at = (int(table[i]["ptr"][slot]) - lists_at) // 8
                assert lists[at:at + op.params["ranks"]].tolist() == [addr[roles[f"{role}{k}"]]
                                                                      for k in range(op.params["ranks"])]
            else:
                assert table[i]["ptr"][slot] == 0, (op.name, role)

    def scalars(kind):
        i = next(i for i, op in enumerate(tg.ops) if op.kind == kind)
        v = variants[op_variant[i]]
        return (dict(zip(v.ints, table[i]["i"].tolist())), dict(zip(v.floats, table[i]["f"].tolist())),
                dict(zip(v.ptrs, table[i]["ptr"].tolist())))

    assert scalars("rmsnorm_linear")[2]["bias"] == 0  # no qkv bias in this model
    ints, floats, _ = scalars("rmsnorm_lm_head_argmax")
    assert ints == {"vocab": 128, "tile": 16, "n_tiles": 8, "vocab_start": 0} and np.isclose(floats["eps"], 1e-6)
    assert scalars("attention")[0] == {"groups": 2, "seq": 40, "window": 0}
    assert floats_close(scalars("attention")[1], {"scale": 0.25, "eps": 1e-6})


@pytest.mark.parametrize("batch", [1, 9])  # partials as tagged words; GEMM tiles' partials read by their allreduce
def test_tensor_parallel_tables_split_queues_by_rank_and_signal_every_consumer_rank(batch):
    tg = graph(tiny_cfg(), tp_size=2, batch=batch)
    rank_of = lambda tid: tg.tasks[tid].queue // tg.num_sms  # noqa: E731
    tagged = batch <= 8
    per_rank = [build_tables(tg, r) for r in range(2)]
    for r, t in enumerate(per_rank):
        assert sorted(t.queue_tasks.tolist()) == [x.id for x in tg.tasks if rank_of(x.id) == r]
        assert t.queue_off[-1] == len(t.queue_tasks) and len(t.queue_off) == tg.num_sms + 1
        assert t.n_sample == tg.batch  # every rank samples the same tokens
        assert (t.signals == per_rank[0].signals).all() and (t.signal_rank == per_rank[0].signal_rank).all()
    t = per_rank[0]
    crossing = set()
    for task in tg.tasks:
        row = t.tasks[task.id]
        sent = list(zip(t.signals[row["sig_off"]: row["sig_off"] + row["sig_cnt"]].tolist(),
                        t.signal_rank[row["sig_off"]: row["sig_off"] + row["sig_cnt"]].tolist()))
        # One signal per (event, rank with consumers of it), and exactly those; none for an event whose
        # consumers poll tagged words.
        want = {(ev, rank_of(c)) for ev in task.signals if not t.ev_polled[ev]
                for c in range(tg.events[ev].first_task, tg.events[ev].stop_task)}
        assert sorted(sent) == sorted(want), tg.describe_task(task.id)
        crossing |= {ev for ev, r in sent if r != rank_of(task.id)}
    kinds = {tg.ops[tg.tasks[tg.events[ev].first_task].op].kind for ev in crossing}
    # Only the sampler, and the allreduces that read peers' partials, wait on a peer's signal.
    assert kinds == ({"sample"} if tagged else {"allreduce_residual", "sample"})
    assert {ev for ev in crossing if t.ev_sys[ev]} == crossing
    polled = {ev for ev in range(len(tg.events)) if t.ev_polled[ev]}
    assert {tg.ops[tg.tasks[tg.events[ev].first_task].op].kind for ev in polled} == ({"allreduce_tagged"} if tagged else set())
    src = generate_source(tg)
    if tagged:
        assert "AllreduceTagged<S" in src and "LinearTagged<S" in src and "Sample<S" in src
    else:
        assert "AllreduceResidual<S" in src and "Linear<S" in src and "Sample<S" in src


def test_graphs_beyond_eight_ranks_are_rejected():
    with pytest.raises(MpkError, match="1 to 8 tensor-parallel GPUs"):
        generate_source(graph(tiny_cfg(num_heads=16, num_kv_heads=16, intermediate_size=96, vocab_size=160), tp_size=16))


def prefill_attention(cfg, rows=20, start=8, **kw):
    """The prefill_attention variant and run-time arguments of a prefill graph of `cfg`."""
    tg = compile_prefill(graph(cfg, **kw), cfg, rows, start=start, verify=False)
    return lower_op(tg, next(op for op in tg.ops if op.kind == "prefill_attention"))


def test_prefill_attention_lowers_with_its_row_blocks_and_reads_past_rows_through_the_cache():
    v, args = prefill_attention(tiny_cfg(num_heads=8, sliding_window=6))  # 4 q heads per KV head: 32 rows a task
    assert str(v) == "PrefillAttention<4, 16, 32, true, ActF32, bf16>"
    assert v.ptrs == ("qkv", "rope", "q_norm", "k_norm", "out", "k_cache", "v_cache")  # k_past, v_past: the cache
    assert dict(zip(v.ints, args.ints)) == {"rows": 20, "start": 8, "window": 6, "groups": 2, "seq": 40}
    assert v.floats == ("scale", "eps") and np.isclose(args.floats[0], 16 ** -0.5)
    with pytest.raises(MpkError, match="head_dim a multiple of 16, not 24"):
        prefill_attention(tiny_cfg(head_dim=24))


def test_missing_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CUDACXX", "/nonexistent/nvcc")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(build_mod, "NVCC_FALLBACK", "/nonexistent/nvcc")
    with pytest.raises(MpkError, match="nvcc not found: install the CUDA toolkit or set CUDACXX"):
        find_nvcc()


# --- nvcc builds -------------------------------------------------------------------------------



@needs_nvcc
def test_tiny_kernel_builds_and_the_second_build_is_a_cache_hit(tg, tmp_path, monkeypatch):
    src = generate_source(tg)
    so = build(src, "sm_90a", debug=False, cache=tmp_path)
    assert so.is_file() and so.stat().st_size > 0

    def no_compile(*a, **k):
        raise AssertionError("a cached kernel was rebuilt")

    monkeypatch.setattr(build_mod, "_compile", no_compile)
    assert build(src, "sm_90a", debug=False, cache=tmp_path) == so
    # The .so's ABI matches the Python mirrors (loading needs no GPU; load_library checks the sizes).
    from mpk.codegen import variants_signature

    lib = load_library(so)
    assert lib.mpk_variants().decode() == variants_signature(build_tables(tg).variants)
    assert lib.mpk_num_threads() == 256 and lib.mpk_smem_bytes() > 0
    abi = Abi(lib)
    assert (abi.kCtlWords, abi.kFlagWords, abi.kProgressWords) == (4, 4, 8)
    assert len({abi.kStateIdle, abi.kStateWaiting, abi.kStateDone, abi.kStateStopped, abi.kStateAborted}) == 5
    with pytest.raises(AttributeError, match="exports no constant"):
        abi.kNoSuchThing


@needs_nvcc
def test_two_processes_building_at_once_both_succeed(tg, tmp_path):
    src_file = tmp_path / "kernel.cu"
    src_file.write_text(generate_source(tg) + "\n// concurrent\n")
    script = textwrap.dedent(f"""
        from pathlib import Path
        from mpk.runtime.build import build
        print(build(Path({str(src_file)!r}).read_text(), "sm_90a", debug=False, cache=Path({str(tmp_path / 'c')!r})))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1 and len(list((tmp_path / "c").glob("*.so"))) == 1


def _nvcc_targets() -> str:
    return subprocess.run([find_nvcc(), "--list-gpu-arch"], capture_output=True, text=True).stdout


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_100a"])
def test_generic_path_builds_for_other_archs(tg, tmp_path, arch):
    if f"compute_{arch[3:].rstrip('a')}" not in _nvcc_targets():
        pytest.skip(f"this nvcc cannot target {arch}")
    assert build(generate_source(tg), arch, debug=False, cache=tmp_path).is_file()


@needs_nvcc
def test_debug_build_with_device_asserts(tmp_path):
    cfg = tiny_cfg(architecture="Qwen2ForCausalLM", qk_norm=False, qkv_bias=True)
    so = build(generate_source(graph(cfg, batch=4)), "sm_90a", debug=True, cache=tmp_path)
    assert "-DMPK_DEBUG" in so.with_suffix(".log").read_text()


@needs_nvcc
@pytest.mark.parametrize("batch, activations, kv_cache", [(1, "model", "model"), (1, "float32", "model"),
                                                          (4, "float32", "model"), (1, "float32", "float32")])
def test_qwen3_8b_kernel_builds(tmp_path, batch, activations, kv_cache):
    """Batch 1 takes the CUDA-core GEMV, batch 4 the tensor-core one (x staged as bf16 hi/lo planes); the KV
    cache is bf16 by default, float32 on request, with either activation precision."""
    tg = compile_program(build_decode_program(QWEN3_8B, batch, 4096, 1, 132, activations, kv_cache=kv_cache))
    assert build(generate_source(tg), "sm_90a", debug=False, cache=tmp_path).is_file()


@needs_nvcc
def test_tensor_parallel_kernel_builds(tmp_path):
    """The kernel of qwen3-8b at TP=2 (one library serves every rank): partial projections, the
    allreduce over the peers and the sampler over every rank's candidates."""
    tg = compile_program(build_decode_program(QWEN3_8B, 1, 256, 2, 132))
    src = generate_source(tg)
    assert "AllreduceTagged<S" in src and "LinearTagged<S" in src and "Sample<S" in src
    assert build(src, "sm_90a", debug=False, cache=tmp_path).is_file()


@needs_nvcc
@pytest.mark.parametrize("batch", [1, 4])  # CUDA cores, tensor cores
def test_bf16_input_products_build(tmp_path, batch):
    src = generate_source(graph(tiny_cfg(hidden_size=64, intermediate_size=96), batch=batch, matmul_inputs="bfloat16"))
    assert "ActF32Bf16Inputs" in src
    assert build(src, "sm_90a", debug=False, cache=tmp_path).is_file()


def build_log(src: str, cache) -> str:
    """The nvcc log of building `src` for sm_90a into `cache` (its flags show the build knobs)."""
    return build(src, "sm_90a", debug=False, cache=cache).with_suffix(".log").read_text()


@needs_nvcc
def test_gemv_strategy_switch(tmp_path, monkeypatch):
    src = generate_source(graph(tiny_cfg(), batch=4))
    monkeypatch.setenv("MPK_GEMV", "simt")
    assert "-DMPK_GEMV_SIMT" in build_log(src, tmp_path)
    monkeypatch.setenv("MPK_GEMV", "tensor")
    with pytest.raises(MpkError, match="MPK_GEMV must be auto or simt"):
        build(src, "sm_90a", debug=False, cache=tmp_path)


@needs_nvcc
def test_small_tile_and_prologue_bounds_reach_the_build(tmp_path, monkeypatch):
    """MPK_SIMT_ROWS / MPK_SIMT_WORK_KB (which batch 2-4 GEMVs stay on CUDA cores) and MPK_X_REGS /
    MPK_RAW_STAGE_KB (how a normed x is staged), for A/B runs."""
    src = generate_source(graph(tiny_cfg(), batch=4))
    log = build_log(src, tmp_path)
    assert "MPK_SIMT" not in log and "MPK_X_REGS" not in log and "MPK_RAW_STAGE_KB" not in log
    monkeypatch.setenv("MPK_SIMT_ROWS", "0")
    monkeypatch.setenv("MPK_SIMT_WORK_KB", "48")
    monkeypatch.setenv("MPK_X_REGS", "4")
    monkeypatch.setenv("MPK_RAW_STAGE_KB", "0")
    log = build_log(src, tmp_path)
    assert all(f in log for f in ("-DMPK_SIMT_ROWS=0", "-DMPK_SIMT_WORK_KB=48", "-DMPK_X_REGS=4", "-DMPK_RAW_STAGE_KB=0"))
    monkeypatch.setenv("MPK_SIMT_WORK_KB", "lots")
    with pytest.raises(MpkError, match="MPK_SIMT_WORK_KB must be a whole number, not 'lots'"):
        build(src, "sm_90a", debug=False, cache=tmp_path)


@needs_nvcc
def test_x_batch_reaches_the_build(tmp_path, monkeypatch):
    """MPK_X_BATCH: x vectors per thread and round in a GEMV prologue (by batch unless set), for A/B runs."""
    src = generate_source(graph(tiny_cfg(), batch=4))
    assert "MPK_X_BATCH" not in build_log(src, tmp_path)
    monkeypatch.setenv("MPK_X_BATCH", "4")
    assert "-DMPK_X_BATCH=4" in build_log(src, tmp_path)
    monkeypatch.setenv("MPK_X_BATCH", "0")
    with pytest.raises(MpkError, match="MPK_X_BATCH must be auto, 1, 2, 4, 8 or 16, not '0'"):
        build(src, "sm_90a", debug=False, cache=tmp_path)


@needs_nvcc
@pytest.mark.parametrize("batch", [1, 4, 8])  # streamed loads, tensor cores streamed and through L1
def test_l2_fetch_hint_builds(tmp_path, monkeypatch, batch):
    """MPK_L2_FETCH: one L2 prefetch size for the tensor-core GEMV's weight loads, else its own choice."""
    src = generate_source(graph(tiny_cfg(hidden_size=256, intermediate_size=512), batch=batch))
    assert "MPK_L2_FETCH" not in build_log(src, tmp_path)
    for size in ("0", "64", "128", "256"):
        monkeypatch.setenv("MPK_L2_FETCH", size)
        log = build_log(src, tmp_path)
        assert f"-DMPK_L2_FETCH={size}" in log
    monkeypatch.setenv("MPK_L2_FETCH", "512")
    with pytest.raises(MpkError, match="MPK_L2_FETCH must be auto, 0, 64, 128 or 256 bytes"):
        build(src, "sm_90a", debug=False, cache=tmp_path)


@needs_nvcc
def test_float32_activation_kernel_builds_with_asserts(tmp_path):
    tg = compile_program(build_decode_program(tiny_cfg(), 4, 64, 1, 8, "float32"))
    assert build(generate_source(tg), "sm_90a", debug=True, cache=tmp_path).is_file()


@needs_nvcc
def test_kernels_built_side_by_side_are_the_ones_build_finds(tmp_path, monkeypatch):
    """A server's kernels of 1, 2 and 4 slots built at once (`build_all`): one .so each, and `build`
    of the same source then finds it in the cache instead of compiling again."""
    from mpk.runtime.build import build_all

    sources = [generate_source(graph(batch=b)) for b in (1, 2, 4)]
    built = build_all(sources, "sm_90a", debug=False, cache=tmp_path)
    assert len(set(built)) == 3 and all(p.is_file() for p in built)
    monkeypatch.setattr(build_mod, "_compile", lambda *a: pytest.fail("compiled a kernel the cache holds"))
    assert [build(src, "sm_90a", debug=False, cache=tmp_path) for src in sources] == built


@needs_nvcc
def test_build_failure_names_the_error_and_the_log(tmp_path):
    with pytest.raises(MpkError, match=r"nvcc failed to build the megakernel: .*error.*full log: .*\.log"):
        build('#include "mpk_host.cuh"\nthis is not C++;\n', "sm_90a", debug=False, cache=tmp_path)


def test_prefetch_table_puts_whole_row_blocks_in_the_head_and_the_next_bytes_in_l2():
    from mpk.runtime.tables import PREFETCH_MAX_BYTES, head_rows_align, prefetch_table

    cfg = ModelConfig("LlamaForCausalLM", vocab_size=1000, hidden_size=512, intermediate_size=1408, num_layers=1,
                      num_heads=8, num_kv_heads=2, head_dim=64, max_position_embeddings=256)
    tg = compile_model(cfg, batch=1, max_seq_len=64, num_sms=4, verify=False)
    base = {name: (i + 1) << 32 for i, name in enumerate(tg.tensors)}
    head_limit = 40 * 1024
    table = prefetch_table(tg, base.__getitem__, head_limit=head_limit, l2_limit=PREFETCH_MAX_BYTES, l2_min_tile=0)
    seen_head = seen_tail = False
    for t in tg.tasks:
        op = tg.ops[t.op]
        head_addr, head, l2_addr, l2 = (int(v) for v in table[t.id])
        if not OP_KINDS[op.kind].streamed:
            assert head == l2 == 0
            continue
        weight = op.inputs["weight"]
        (r0, r1), k = next(r for r in t.reads if r.role == "weight").box[0], tg.tensors[weight].shape[1]
        row = k * 2
        rows = min(r1 - r0, head_limit // row) // head_rows_align(1) * head_rows_align(1)
        assert head_addr == base[weight] + r0 * row and head == rows * row <= head_limit
        assert l2_addr == head_addr + head and l2 == min((r1 - r0) * row - head, PREFETCH_MAX_BYTES) // 16 * 16
        seen_head |= head > 0
        seen_tail |= l2 > 0
    assert seen_head and seen_tail


def test_a_polled_event_must_be_all_tagged_words():
    """An allreduce that polls tagged words reads readiness from them alone: an event that also has a
    producer writing none, or consumers that wait on its counter beside ones that poll, is refused
    when the tables are built, not left to hang or race on the GPU."""
    import copy

    tg = graph(tiny_cfg(), tp_size=2, batch=1)
    ar = next(t for t in tg.tasks if tg.ops[t.op].kind == "allreduce_tagged")
    build_tables(tg)  # as compiled: every producer of the allreduce's event pushes words

    silent = copy.deepcopy(tg)
    qkv = next(t.id for t in silent.tasks if silent.ops[t.op].kind == "rmsnorm_linear")
    silent.events[ar.wait].producers.append(qkv)
    with pytest.raises(MpkError, match=rf"event {ar.wait}: its consumers poll tagged words, but a producer writes none"):
        build_tables(silent)

    mixed = copy.deepcopy(tg)
    ev = mixed.events[ar.wait]
    waiter = next(t for t in mixed.tasks if mixed.ops[t.op].kind == "rmsnorm_gate_up_silu" and t.id >= ev.stop_task)
    waiter.wait, ev.stop_task = ev.id, waiter.id + 1  # a counter-waiting consumer in the event's range
    for t in mixed.tasks[ev.first_task:ev.stop_task]:
        t.wait = ev.id
    with pytest.raises(MpkError, match=rf"event {ev.id} has consumers that poll tagged words and consumers that wait"):
        build_tables(mixed)

    # The allreduce reads its residual under its producer's acquire: on another SM it would not.
    moved = copy.deepcopy(tg)
    q = next(q for q, queue in enumerate(moved.queues) if ar.id in queue)
    other = next(r for r in range(q // moved.num_sms * moved.num_sms, (q // moved.num_sms + 1) * moved.num_sms)
                 if r != q and not any(p in moved.queues[r] for p in moved.events[ar.wait].producers))
    moved.queues[q].remove(ar.id)
    moved.queues[other].append(ar.id)
    with pytest.raises(MpkError, match=r"polls tagged words but follows none of their producers on its SM"):
        build_tables(moved)


def test_queue_entries_carry_each_position_task_op_event_and_the_next_l2_range():
    """Per rank, position j of the entries is queue_tasks[j]'s task and op rows by value, its wait event's
    target, lag and scope, the counters it signals on their ranks (a peer's flagged for a system-scope
    release), and the L2 range of the next task of the same queue, the first after the last."""
    from mpk.runtime.abi import ENTRY_DTYPE
    from mpk.runtime.tables import queue_entries

    tg = graph(tiny_cfg(), tp_size=2)
    assert ENTRY_DTYPE.itemsize == 256 and ENTRY_DTYPE.fields["next_l2"][1] == 192 and ENTRY_DTYPE.fields["sig"][1] == 208
    rng = np.random.default_rng(0)
    prefetch = rng.integers(1, 1 << 40, size=(len(tg.tasks), 4)).astype(np.uint64)
    crossing = peer_signals = polled = 0
    counters = [1 << 44, 3 << 44]
    for rank in range(2):
        t = build_tables(tg, rank)
        ops, _ = op_table(t.op_args, lambda name: 4096 * (1 + sorted(tg.tensors).index(name)), 1 << 40)
        entries = queue_entries(t, ops, prefetch, counters, rank)
        assert len(entries) == len(t.queue_tasks)
        for q in range(tg.num_sms):
            queue = t.queue_tasks[t.queue_off[q]: t.queue_off[q + 1]].tolist()
            for k, tid in enumerate(queue):
                e = entries[t.queue_off[q] + k]
                assert e["id"] == tid and e["task"].tobytes() == t.tasks[tid].tobytes()
                assert e["op"].tobytes() == ops[t.tasks[tid]["op"]].tobytes()
                ev = int(t.tasks[tid]["wait"])
                want = (t.ev_target[ev], t.ev_lag[ev], t.ev_sys[ev], t.ev_polled[ev]) if ev >= 0 else (0, 0, 0, 0)
                assert (e["ev_target"], e["ev_lag"], e["ev_sys"], e["ev_polled"]) == tuple(want), tg.describe_task(tid)
                polled += int(e["ev_polled"])
                crossing += int(e["ev_sys"])
                assert e["next_l2"].tolist() == prefetch[queue[(k + 1) % len(queue)], 2:4].tolist()
                row = t.tasks[tid]
                sent = range(row["sig_off"], row["sig_off"] + row["sig_cnt"])
                assert e["sig"][: len(sent)].tolist() == [counters[int(t.signal_rank[i])] + 8 * int(t.signals[i]) for i in sent]
                assert e["sig_sys"] == sum(int(t.signal_rank[i] != rank) << n for n, i in enumerate(sent))
                peer_signals += bin(int(e["sig_sys"])).count("1")
    assert crossing and peer_signals  # the sampler waits across ranks, and its producers signal peers
    assert polled  # the allreduces poll their partials' words


def test_prefetch_table_leaves_short_tiles_out_of_l2():
    """Tiles shorter than l2_min_tile get no L2 range; longer ones get one."""
    from mpk.runtime.tables import prefetch_table

    cfg = ModelConfig("LlamaForCausalLM", vocab_size=1000, hidden_size=512, intermediate_size=1408, num_layers=1,
                      num_heads=8, num_kv_heads=2, head_dim=64, max_position_embeddings=256)
    tg = compile_model(cfg, batch=1, max_seq_len=64, num_sms=4, verify=False)
    base = {name: (i + 1) << 32 for i, name in enumerate(tg.tensors)}
    tile_bytes = {}
    for t in tg.tasks:
        if not OP_KINDS[tg.ops[t.op].kind].streamed:
            continue
        read = next(r for r in t.reads if r.role == "weight")
        (r0, r1), k = read.box[0], tg.tensors[read.tensor].shape[1]
        tile_bytes[t.id] = (r1 - r0) * k * 2
    cut = sorted(tile_bytes.values())[len(tile_bytes) // 2]
    table = prefetch_table(tg, base.__getitem__, head_limit=1024, l2_limit=4096, l2_min_tile=cut)
    assert {int(table[i][3]) > 0 for i in tile_bytes} == {True, False}
    for i, n in tile_bytes.items():
        assert (int(table[i][3]) > 0) == (n >= cut)


def test_prefetch_table_gives_a_k_slice_no_head():
    """A decode GEMM split along K streams part of each weight row: no one byte range, so no head."""
    from mpk.runtime.tables import prefetch_table

    cfg = ModelConfig("LlamaForCausalLM", vocab_size=1000, hidden_size=512, intermediate_size=1408, num_layers=1,
                      num_heads=8, num_kv_heads=2, head_dim=64, max_position_embeddings=256)
    tg = compile_model(cfg, batch=12, max_seq_len=64, num_sms=132, verify=False)
    base = {name: (i + 1) << 32 for i, name in enumerate(tg.tensors)}
    table = prefetch_table(tg, base.__getitem__, head_limit=40 * 1024)
    sliced = [t for t in tg.tasks if tg.ops[t.op].params.get("k_range")]
    assert sliced, "the batch-12 graph splits its O and down projections along K"
    assert all(not table[t.id].any() for t in sliced)


@needs_nvcc
def test_a_template_reading_an_undeclared_slot_does_not_build(tg, tmp_path):
    """Slots are names the op kind declares: drop one and the template that reads it fails to compile."""
    from dataclasses import replace

    from mpk.codegen import render_source

    variants, _, _ = graph_variants(tg)
    i = next(i for i, v in enumerate(variants) if v.template == "RmsnormLinear")
    variants[i] = replace(variants[i], ptrs=tuple(r for r in variants[i].ptrs if r != "bias"))
    with pytest.raises(MpkError, match="nvcc failed.*bias"):
        build(render_source(variants), "sm_90a", debug=False, cache=tmp_path)


@needs_nvcc
def test_attention_variants_build_without_register_spills(tmp_path):
    """The attention templates (one pass, and splits with their merge, with and without the K/V ring of
    long splits) over 1..8 query heads per KV head, head_dim 16..256, both activation policies and both
    KV cache types, in one kernel: ptxas reports no spills and no stack frame."""
    shapes = [(1, 16, "float32", "model"), (8, 16, "model", "float32"), (4, 64, "float32", "model"),
              (8, 64, "float32", "model"), (4, 128, "float32", "model"), (8, 128, "float32", "float32"),
              (2, 256, "model", "model")]
    variants = []
    for qpk, hd, activations, kv_cache in shapes:
        cfg = tiny_cfg(num_layers=1, num_heads=2 * qpk, head_dim=hd, max_position_embeddings=8 * ATTN_RING_ROWS)
        for context in (64, 2 * ONE_PASS_ATTN_ROWS, 8 * ATTN_RING_ROWS):  # 2 groups on 8 SMs: 4 splits
            tg = compile_program(build_decode_program(cfg, 1, context, 1, 8, activations, kv_cache=kv_cache))
            variants += [v for v in graph_variants(tg)[0] if v.template.startswith("Attention") and v not in variants]
    assert len(variants) == 4 * len(shapes)
    from mpk.codegen import render_source
    from mpk.runtime.build import nvcc_flags

    src = tmp_path / "attention.cu"
    src.write_text(render_source(variants))
    flags = [f for f in nvcc_flags("sm_90a", debug=False) if f != "-shared"]
    proc = subprocess.run([find_nvcc(), *flags, "-cubin", "-Xptxas", "-v", str(src), "-o", str(tmp_path / "a.cubin")],
                          capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-2000:]
    assert "0 bytes spill stores, 0 bytes spill loads" in log and "0 bytes stack frame" in log, log[-2000:]


@needs_nvcc
def test_eight_rank_kernel_builds(tmp_path):
    """The allreduce and the sampler unrolled over eight ranks (the kernel of each GPU of a TP=8 run)."""
    tg = graph(tiny_cfg(num_heads=8, num_kv_heads=8, intermediate_size=96, vocab_size=160), tp_size=8)
    src = generate_source(tg)
    assert ", 8, ActF32>" in src and "Sample<S" in src
    assert build(src, "sm_90a", debug=False, cache=tmp_path).is_file()


@needs_nvcc
def test_prefill_attention_builds(tmp_path):
    """Both activation policies, both KV cache types, with and without q/k norm, in one kernel."""
    variants = [prefill_attention(tiny_cfg(head_dim=64))[0],
                prefill_attention(tiny_cfg(qk_norm=False, num_heads=16), activations="model", kv_cache="float32")[0]]
    assert build(render_source(variants), "sm_90a", debug=False, cache=tmp_path).is_file()


@needs_nvcc
@pytest.mark.parametrize("script", ["phase_latency", "tp_phase_latency", "gemv_chain", "gap_fill", "load_pattern", "icache",
                                    "reduce_phase", "cluster_phase"])
def test_microbenchmarks_build(tmp_path, script):
    """The standalone microbenchmarks in scripts/ use the runtime's headers: they keep building with them."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([find_nvcc(), "-O3", "-std=c++17", "-arch=sm_90a", f"-I{root / 'mpk' / 'csrc'}", "-o",
                           str(tmp_path / script), str(root / "scripts" / f"{script}.cu")], capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
