"""Codegen: the CUDA source and the device tables of one TaskGraph.

The source depends only on the graph's op *variants* (op kind + the shapes that fix register
layouts, e.g. batch and K of a GEMV, heads per group and head_dim of attention): every layer
shares one variant, and the pointers and remaining sizes of each op instance come from a device
table at run time. Two graphs with the same variants (another max_seq_len, SM count or layer
count) therefore share one compiled kernel.

The tables mirror the structs of mpk/csrc/mpk_runtime.cuh: TaskDesc (TASK_DTYPE) and OpDesc
(OP_DTYPE); OP_ARGS lists, per op kind, the tensor role that fills each pointer slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpk.errors import MpkError
from mpk.taskgraph import OpSpec, TaskGraph

HEADERS = ("mpk_host.cuh", "gemv.cuh", "attention.cuh", "tokens.cuh")

TASK_DTYPE = np.dtype([("variant", "<i4"), ("op", "<i4"), ("tile", "<i4", (3,)), ("wait", "<i4"),
                       ("sig_off", "<i4"), ("sig_cnt", "<i4")])
OP_PTRS, OP_INTS, OP_FLOATS = 8, 8, 4
OP_DTYPE = np.dtype([("ptr", "<u8", (OP_PTRS,)), ("i", "<i8", (OP_INTS,)), ("f", "<f4", (OP_FLOATS,))])

# Pointer slots per op kind, by tensor role (a key of op.inputs or op.outputs), in the order the
# device code reads OpDesc::ptr. A role the op lacks (no qkv bias, no q/k-norm) is a null pointer.
OP_ARGS: dict[str, tuple[str, ...]] = {
    "embed": ("tokens", "table", "out"),
    "rmsnorm_linear": ("x", "norm", "weight", "bias", "out"),
    "qk_norm_rope_append": ("qkv", "cos", "sin", "q_norm", "k_norm", "q", "k_cache", "v_cache"),
    "attention_split": ("q", "k_cache", "v_cache", "part", "lse"),
    "attention_merge": ("part", "lse", "out"),
    "linear_residual": ("x", "weight", "residual", "out"),
    "rmsnorm_gate_up_silu": ("x", "norm", "weight", "out"),
    "rmsnorm_lm_head_argmax": ("x", "norm", "weight", "logits", "cand_val", "cand_idx"),
    "sample": ("cand_val0", "cand_idx0", "prompt", "prompt_len", "tokens"),
}


@dataclass(frozen=True)
class OpArgs:
    """What one op instance puts in its OpDesc: tensor names per pointer slot, ints, floats."""

    ptrs: tuple[str | None, ...]
    ints: tuple[int, ...] = ()
    floats: tuple[float, ...] = ()


@dataclass
class KernelTables:
    """Everything the kernel reads besides tensors, as plain arrays (see mpk_runtime.cuh)."""

    variants: list[str]  # C++ type of each variant, in dispatch order
    tasks: np.ndarray  # TASK_DTYPE [num_tasks]
    signals: np.ndarray  # int32
    queue_off: np.ndarray  # int32 [num_sms + 1]
    queue_tasks: np.ndarray  # int32
    ev_target: np.ndarray  # int32 [num_events]
    ev_lag: np.ndarray  # int32 [num_events]
    op_args: list[OpArgs]  # per op of the graph
    n_sample: int  # sample tasks per step


def _shape(tg: TaskGraph, name: str) -> tuple[int, ...]:
    return tg.tensors[name].shape


def _expect(cond: bool, op: OpSpec, what: str) -> None:
    if not cond:
        raise MpkError(f"op {op.name} ({op.kind}) does not match the GPU kernels: {what}")


def _cbool(v: bool) -> str:
    return "true" if v else "false"


def _gemv(tg: TaskGraph, op: OpSpec, out_role: str, rows_per_col: int = 1) -> tuple[int, int, int]:
    """(B, K, N) of a matrix-vector op; checks the weight is [N * rows_per_col, K]."""
    b, k = _shape(tg, op.inputs["x"])
    out = _shape(tg, op.outputs[out_role])
    n = out[1]
    _expect(out[0] == b, op, f"output {out} does not have batch {b}")
    _expect(_shape(tg, op.inputs["weight"]) == (n * rows_per_col, k), op,
            f"weight {_shape(tg, op.inputs['weight'])} is not [{n * rows_per_col}, {k}]")
    return b, k, n


def lower_op(tg: TaskGraph, op: OpSpec) -> tuple[str, OpArgs]:
    """The C++ variant type of one op instance and its run-time arguments."""
    p = op.params
    names = {**op.inputs, **op.outputs}
    act = activation_policy(tg)
    ptrs = tuple(names.get(role) for role in OP_ARGS.get(op.kind, ()))
    if op.kind == "embed":
        vocab, h = _shape(tg, op.inputs["table"])
        return f"Embed<{h}, {act}>", OpArgs(ptrs, (vocab,))
    if op.kind == "rmsnorm_linear":
        b, k, n = _gemv(tg, op, "out")
        bias = "bias" in op.inputs
        return f"RmsnormLinear<{b}, {k}, {_cbool(bias)}, {act}>", OpArgs(ptrs, (n, p["tile"]), (p["eps"],))
    if op.kind == "rmsnorm_gate_up_silu":
        b, k, n = _gemv(tg, op, "out", rows_per_col=2)
        return f"RmsnormGateUpSilu<{b}, {k}, {act}>", OpArgs(ptrs, (n, p["tile"]), (p["eps"],))
    if op.kind == "linear_residual":
        b, k, n = _gemv(tg, op, "out")
        return f"LinearResidual<{b}, {k}, {act}>", OpArgs(ptrs, (n, p["tile"]))
    if op.kind == "rmsnorm_lm_head_argmax":
        b, k, v = _gemv(tg, op, "logits")
        n_tiles = _shape(tg, op.outputs["cand_val"])[1]
        _expect(n_tiles == -(-v // p["tile"]), op, "candidate count is not the number of vocab tiles")
        return f"RmsnormLmHeadArgmax<{b}, {k}, {act}>", OpArgs(ptrs, (v, p["tile"], n_tiles, p["vocab_start"]), (p["eps"],))
    if op.kind == "qk_norm_rope_append":
        qpk, hd = p["q_per_kv"], p["head_dim"]
        _, s, g, _ = _shape(tg, op.outputs["k_cache"])
        _expect(_shape(tg, op.inputs["qkv"])[1] == g * (qpk + 2) * hd, op, "qkv rows are not groups x (q_per_kv + 2) heads")
        _expect(hd % 2 == 0, op, f"head_dim {hd} is odd")
        qk_norm = "q_norm" in op.inputs
        return f"QkNormRopeAppend<{qpk}, {hd}, {_cbool(qk_norm)}, {act}>", OpArgs(ptrs, (g, s), (p["eps"],))
    if op.kind == "attention_split":
        _, g, splits, qpk, hd = _shape(tg, op.outputs["part"])
        _, s, _, _ = _shape(tg, op.inputs["k_cache"])
        return f"AttentionSplit<{qpk}, {hd}, {act}>", OpArgs(ptrs, (g, s, splits, p["chunk"], p["window"] or 0), (p["scale"],))
    if op.kind == "attention_merge":
        _, g, splits, qpk, hd = _shape(tg, op.inputs["part"])
        return f"AttentionMerge<{qpk}, {hd}, {act}>", OpArgs(ptrs, (g, splits))
    if op.kind == "sample":
        _expect(p["ranks"] == 1, op, "sampling over several ranks")
        n_tiles = _shape(tg, op.inputs["cand_val0"])[1]
        return "Sample", OpArgs(ptrs, (n_tiles, _shape(tg, op.inputs["prompt"])[1]))
    raise MpkError(f"op kind {op.kind!r} ({op.name}) has no GPU kernel yet")


def activation_policy(tg: TaskGraph) -> str:
    """The device policy of the graph's activation precision (mpk/csrc/common.cuh)."""
    return {"model": "ActBf16", "float32": "ActF32"}[tg.tensors["x.0"].dtype]


def check_supported(tg: TaskGraph) -> None:
    if tg.tp_size != 1:
        raise MpkError(f"the GPU runtime runs one GPU for now; this graph has tensor parallelism {tg.tp_size} "
                       "(compile with --tp 1)")



def graph_variants(tg: TaskGraph) -> tuple[list[str], list[int], list[OpArgs]]:
    """(variant types in first-use order, variant index per op, arguments per op)."""
    check_supported(tg)
    variants: list[str] = []
    index: dict[str, int] = {}
    op_variant, op_args = [], []
    for op in tg.ops:
        cpp, args = lower_op(tg, op)
        op_variant.append(index.setdefault(cpp, len(variants)))
        if op_variant[-1] == len(variants):
            variants.append(cpp)
        op_args.append(args)
    return variants, op_variant, op_args


def render_source(variants: list[str]) -> str:
    """The .cu of a kernel over these variants (also what the build cache hashes)."""
    lines = ["// Generated by mpk.codegen: one persistent megakernel over the op variants below. Do not edit."]
    lines += [f'#include "{h}"' for h in HEADERS]
    lines += ["", "namespace {", "using namespace mpk;", ""]
    lines += [f"using V{i} = {v};" for i, v in enumerate(variants)]
    names = ", ".join(f"V{i}" for i in range(len(variants)))
    lines += [
        "",
        f"constexpr int kNumVariants = {len(variants)};",
        f"constexpr int kSmemBytes = max_smem<{names}>();",
        'static_assert(kSmemBytes <= 227 * 1024, "the op variants need more shared memory than an SM has");',
        "",
        "struct Dispatch {",
        "  __device__ __forceinline__ static void run(int variant, const TaskCtx& t, const OpDesc& op, unsigned char* smem) {",
        "    switch (variant) {",
    ]
    lines += [f"      case {i}: V{i}::run(t, op, smem); break;" for i in range(len(variants))]
    lines += [
        "      default: MPK_ASSERT(false && \"unknown task variant\"); break;",
        "    }",
        "  }",
        "};",
        "",
        "}  // namespace",
        "",
        "__global__ void __launch_bounds__(mpk::kThreads, 1) mpk_kernel(const __grid_constant__ mpk::MpkParams p) {",
        "  mpk::persistent_loop<Dispatch>(p);",
        "}",
        "",
        'extern "C" {',
        "int mpk_launch(const mpk::MpkParams* p, cudaStream_t stream) { return mpk::launch(mpk_kernel, kSmemBytes, *p, stream); }",
        "int mpk_blocks_per_sm(int* out) { return mpk::blocks_per_sm(mpk_kernel, kSmemBytes, out); }",
        "int mpk_smem_bytes() { return kSmemBytes; }",
        "int mpk_num_variants() { return kNumVariants; }",
        f'const char* mpk_variants() {{ return "{";".join(variants)}"; }}',
        "}",
        "",
    ]
    return "\n".join(lines)


def generate_source(tg: TaskGraph) -> str:
    """The CUDA source of `tg`'s megakernel."""
    return render_source(graph_variants(tg)[0])


def build_tables(tg: TaskGraph) -> KernelTables:
    """The task, queue and event tables of `tg` as the kernel reads them."""
    variants, op_variant, op_args = graph_variants(tg)
    tasks = np.zeros(len(tg.tasks), dtype=TASK_DTYPE)
    signals: list[int] = []
    for i, t in enumerate(tg.tasks):
        if t.id != i:
            raise MpkError(f"task ids must be positions in the task list; task at {i} has id {t.id}")
        if len(t.tile) > 3:
            raise MpkError(f"{tg.describe_task(i)} has more than 3 tile coordinates")
        tasks[i]["variant"] = op_variant[t.op]
        tasks[i]["op"] = t.op
        tasks[i]["tile"][: len(t.tile)] = t.tile
        tasks[i]["wait"] = t.wait
        tasks[i]["sig_off"] = len(signals)
        tasks[i]["sig_cnt"] = len(t.signals)
        signals.extend(t.signals)
    lengths = [len(q) for q in tg.queues]
    if len(lengths) != tg.num_sms:
        raise MpkError(f"the graph has {len(lengths)} queues for {tg.num_sms} SMs")
    queue_off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    queue_tasks = np.array([tid for q in tg.queues for tid in q], dtype=np.int32)
    if sorted(queue_tasks.tolist()) != list(range(len(tg.tasks))):
        raise MpkError("the queues do not hold every task exactly once")
    return KernelTables(
        variants=variants,
        tasks=tasks,
        signals=np.array(signals or [0], dtype=np.int32),
        queue_off=queue_off,
        queue_tasks=queue_tasks,
        ev_target=np.array([e.target for e in tg.events] or [0], dtype=np.int32),
        ev_lag=np.array([e.lag for e in tg.events] or [0], dtype=np.int32),
        op_args=op_args,
        n_sample=sum(1 for t in tg.tasks if tg.ops[t.op].kind == "sample"),
    )


def op_table(op_args: list[OpArgs], pointer_of) -> np.ndarray:
    """OP_DTYPE rows for every op; `pointer_of(tensor name)` gives its device address."""
    table = np.zeros(len(op_args), dtype=OP_DTYPE)
    for i, a in enumerate(op_args):
        if len(a.ptrs) > OP_PTRS or len(a.ints) > OP_INTS or len(a.floats) > OP_FLOATS:
            raise MpkError(f"op {i} has more arguments than an OpDesc holds")
        table[i]["ptr"][: len(a.ptrs)] = [pointer_of(n) if n is not None else 0 for n in a.ptrs]
        table[i]["i"][: len(a.ints)] = a.ints
        table[i]["f"][: len(a.floats)] = a.floats
    return table


PREFETCH_MAX_BYTES = 128 * 1024  # per task: about what HBM delivers to one SM during an event wait
DYNAMIC_WEIGHTS = ("embed", "rope_cos", "rope_sin")  # read at rows chosen at run time: nothing to prefetch


def prefetch_table(tg: TaskGraph, pointer_of, limit: int = PREFETCH_MAX_BYTES) -> np.ndarray:
    """[num_tasks, 2] u64: address and length of the head of each task's largest weight tile.

    A weight read covers whole rows (a row range of a row-major matrix), so it is one contiguous
    byte range; the head of it (up to `limit` bytes, in whole 16-byte units) is prefetched into L2.
    """
    table = np.zeros((len(tg.tasks), 2), dtype=np.uint64)
    for t in tg.tasks:
        best = None
        for r in t.reads:
            spec = tg.tensors[r.tensor]
            if spec.kind != "weight" or r.tensor.rsplit("/", 1)[-1] in DYNAMIC_WEIGHTS:
                continue
            if any((a, b) != (0, n) for (a, b), n in zip(r.box[1:], spec.shape[1:])):
                continue  # not whole rows: not one contiguous range
            row_bytes = 2 if spec.dtype == "model" else 4
            for n in spec.shape[1:]:
                row_bytes *= n
            (r0, r1) = r.box[0]
            if best is None or (r1 - r0) * row_bytes > best[1]:
                best = (pointer_of(r.tensor) + r0 * row_bytes, (r1 - r0) * row_bytes)
        if best is not None:
            start = best[0] // 16 * 16
            stop = min(best[0] + best[1], start + limit)
            table[t.id] = (start, (stop - start) // 16 * 16)  # round down: never past the tensor's end
    return table
