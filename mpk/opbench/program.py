"""One-op programs: one op instance of a model's decode graph, alone, as its own TaskGraph.

The op keeps its real shapes, tile and CUDA variant, and its tasks come from its op kind's `tiles`.
Nothing else runs, so no task waits on another: each task writes its own region and reads tensors
the host filled before the launch. Those activation inputs become *state* here (host contents at
launch, which is how the verifier and the executors treat state).

Replicas: a decode step reads every layer's weights once, so they always come from HBM. Alone, an
op would re-read the same few MB every step out of L2 (50 MB on an H100). So the program holds
`replicas` copies of the op, each with its own per-layer weights and state (the KV cache) and its
own outputs, enough that one step streams STREAM_BYTES of distinct data (`replicas_for`). The
copies follow each other with no dependency, so the all-SM time of one copy is the template's own
throughput, without an operator-boundary stall. Activation inputs are shared: in the decode step
the previous op has just written them, so they sit in L2 there too. The first replica keeps the
decode graph's names, so a one-replica program is a subset of it.
"""

from __future__ import annotations

from mpk.compiler import compile_program
from mpk.dtypes import dtype
from mpk.errors import MpkError
from mpk.graph import Program
from mpk.models.config import ModelConfig
from mpk.ops import OP_KINDS
from mpk.taskgraph import OpSpec, TaskGraph, TensorSpec
from mpk.util import cdiv

LAYER_PREFIX = "layers."  # mpk.graph names every per-layer tensor so
STREAM_BYTES = 256 << 20  # distinct bytes per step: five times an H100's or H200's L2
MAX_REPLICAS = 64
MIN_LAYER_BYTES = 1 << 20  # below this, HBM or L2 changes an op's time by well under a microsecond


def gpu_kinds(tg: TaskGraph) -> list[str]:
    """The op kinds of `tg` that have a CUDA template, in graph order."""
    kinds = []
    for op in tg.ops:
        if OP_KINDS[op.kind].template is not None and op.kind not in kinds:
            kinds.append(op.kind)
    return kinds


def bench_ops(tg: TaskGraph, kinds: list[str] | None = None) -> list[OpSpec]:
    """The first op instance of every CUDA variant of `tg` (of `kinds` only, if given), in graph order.

    One per variant rather than per kind: the O and down projections are one kind but two
    variants (another K), and each variant is its own compiled code.
    """
    from mpk.codegen import lower_op

    available = gpu_kinds(tg)
    for kind in kinds or ():
        if kind not in available:
            raise MpkError(f"the decode graph has no GPU op of kind {kind!r}; its GPU op kinds: {', '.join(available)}")
    seen, ops = set(), []
    for op in tg.ops:
        if op.kind not in available or (kinds and op.kind not in kinds):
            continue
        variant = str(lower_op(tg, op)[0])
        if variant not in seen:
            seen.add(variant)
            ops.append(op)
    return ops


def replica_name(name: str, k: int) -> str:
    return name if k == 0 else f"{name}@{k}"


def one_op_program(cfg: ModelConfig, tg: TaskGraph, op: OpSpec, num_sms: int, replicas: int = 1) -> Program:
    """`op` of the decode graph `tg`, `replicas` times, as a program of its own for `num_sms` SMs."""
    if replicas < 1:
        raise MpkError(f"an op needs at least one replica, not {replicas}")
    prog = Program(cfg, tg.batch, tg.max_seq_len, 1, num_sms, tg.precision)
    bound = {**op.inputs, **op.outputs}
    for k in range(replicas):
        names = {}
        for role, name in bound.items():
            spec = tg.tensors[name]
            own = role in op.outputs or from_hbm(tg, name)
            new = replica_name(name, k) if own else name
            kind = "state" if spec.kind == "activation" and role in op.inputs else spec.kind
            prog.tensors[new] = TensorSpec(new, kind, spec.shape, spec.dtype)
            names[role] = new
        prog.add_op(0, op.kind, replica_name(op.name, k), op.layer, {r: names[r] for r in op.inputs},
                    {r: names[r] for r in op.outputs}, **op.params)
    return prog


def compile_one_op(cfg: ModelConfig, tg: TaskGraph, op: OpSpec, num_sms: int, replicas: int = 1) -> TaskGraph:
    """The TaskGraph of `one_op_program`: tasks spread over `num_sms` SMs (1: one queue holds them all)."""
    one = compile_program(one_op_program(cfg, tg, op, num_sms, replicas))
    if one.events:
        raise MpkError(f"the tasks of {op.name} ({op.kind}) depend on each other, so it cannot run alone")
    return one


ATTENDING = ("attention_split", "attention")  # kinds whose static cache boxes cover the whole column


def region_bytes(tg: TaskGraph, task, region, step: int) -> int:
    """Bytes of `region` that `task` touches at decode position `step`.

    The op kinds cost an attention split at half its cache rows (the mean over a generation); at a
    fixed position it reads exactly the rows up to it, which is what GB/s must count here.
    """
    n = dtype(tg.tensors[region.tensor].dtype).bytes
    for a, b in region.box:
        n *= b - a
    op = tg.ops[task.op]
    if op.kind in ATTENDING and region.role in ("k_cache", "v_cache", "k_past", "v_past"):
        from mpk.ops.attention import split_rows

        c0, c1 = region.box[1]
        if op.kind == "attention_split":
            a, z = split_rows(step, op.params.get("window"), task.tile[2], op.params["splits"])
        elif region.role in ("k_past", "v_past"):  # the one-pass task reads the rows before `step` ...
            a, z = split_rows(step, op.params.get("window"), 0, 1)
            z -= 1
        else:  # ... and writes row `step`
            a, z = step, step + 1
        n = n // (c1 - c0) * max(0, z - a)
    return n


def run_bytes(tg: TaskGraph, task, step: int) -> int:
    """Bytes `task` moves at decode position `step`: its cost-model bytes, but exact for attention."""
    if tg.ops[task.op].kind not in ATTENDING:
        return task.bytes
    return sum(region_bytes(tg, task, r, step) for r in task.reads + task.writes)


def op_bytes(tg: TaskGraph, op_index: int, step: int) -> int:
    """Bytes one instance (op `op_index` of `tg`) moves per step at position `step`."""
    return sum(run_bytes(tg, t, step) for t in tg.tasks if t.op == op_index)


def from_hbm(tg: TaskGraph, name: str) -> bool:
    """A tensor of the decode graph `tg` that every step reads from HBM: a per-layer weight or state."""
    return tg.tensors[name].kind in ("weight", "state") and name.startswith(LAYER_PREFIX)


def replicas_for(cfg: ModelConfig, tg: TaskGraph, op: OpSpec, step: int, stream_bytes: int = STREAM_BYTES) -> int:
    """Copies of `op` so that one step streams `stream_bytes` of per-layer data (at most MAX_REPLICAS).

    Ops that stream under MIN_LAYER_BYTES of it per step get one: their time hardly depends on where
    those bytes come from (the embedding, sampling, the LM head read none; RoPE reads two norm vectors).
    """
    alone = compile_one_op(cfg, tg, op, 1)
    streamed = sum(region_bytes(alone, t, r, step) for t in alone.tasks for r in t.reads if from_hbm(tg, r.tensor))
    if streamed < MIN_LAYER_BYTES:
        return 1
    return max(1, min(MAX_REPLICAS, cdiv(stream_bytes, streamed)))
