"""The op contract: everything about one fused operator kind lives in one OpKind subclass.

An op kind declares
- its operands by role name (`inputs`, `outputs`): the program builder binds each role to a
  tensor, tasks keep the role on every region, and the CPU executor and the CUDA template both
  reach an operand by its role;
- its tiling (`tiles`): which boxes of which operands one task reads and writes, and its cost;
- its PyTorch reference (`run`): one task's compute on views of exactly its declared regions,
  passed as a dict by role;
- optionally the whole op in one call (`run_whole`), on its operands' whole tensors: what the
  op-by-op prefill runner (`mpk.prefill.run_prefill_ops`) calls, on the CPU or the GPU. Its exact
  mode computes what all of the op's tasks compute; its fast mode may round matrix-product inputs
  to bf16 (float32 accumulation) and use fused attention;
- its CUDA template (`template` in `header`, under mpk/csrc) and `cuda`: the compile-time
  arguments and the named run-time scalars of one op instance. Codegen gives the template a
  `Slots` struct naming each operand's pointer slot and each scalar's slot, so device code reads
  `op.arg<const bf16>(S::weight)` and `op.i[S::tile]`, never a position.

Regions that depend on run-time values (the KV rows up to the current position, the embedding row
of the current token) declare their static upper bound; `run` narrows them with the step index.
Subclasses register themselves by `kind`; `mpk.ops.OP_KINDS` maps kinds to instances.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from mpk.dtypes import dtype
from mpk.errors import MpkError
from mpk.taskgraph import OpSpec, Region

REGISTRY: dict[str, "OpKind"] = {}


@dataclass(frozen=True)
class Operand:
    role: str
    optional: bool = False  # may be left unbound (no QKV bias): a null pointer on the GPU
    per_rank: bool = False  # one per tensor-parallel rank: roles `role0`, `role1`, ...


@dataclass
class TileTask:
    tile: tuple[int, ...]
    reads: list[Region]
    writes: list[Region]
    bytes: int
    flops: int


@dataclass(frozen=True)
class Cuda:
    """How one op instance maps onto its CUDA template."""

    args: tuple  # compile-time template arguments after the Slots struct (shapes, flags, policies)
    ints: dict[str, int] = field(default_factory=dict)  # run-time integer scalars by slot name
    floats: dict[str, float] = field(default_factory=dict)


class OpKind:
    """One fused decode operator. Subclasses set the class attributes and the four methods."""

    kind: ClassVar[str]
    inputs: ClassVar[tuple[Operand, ...]] = ()
    outputs: ClassVar[tuple[Operand, ...]] = ()
    header: ClassVar[str | None] = None  # the .cuh under mpk/csrc holding `template`
    template: ClassVar[str | None] = None  # None: no GPU kernel yet
    streamed: ClassVar[str | None] = None  # the weight role whose tile a task streams whole (prefetch)
    # Each task serves one sequence, tile[0]; `run` then gets that sequence's position as `step`
    # (sequences join a batch at any step: mpk.execution.Executor.run's position_offsets).
    per_sequence: ClassVar[bool] = False
    # Its tasks learn that their inputs are ready from the inputs themselves: words tagged with the
    # step, written by kinds that `pushes_words` and polled by the template, so the runtime neither
    # waits on their event's counter nor has the producers signal it (mpk.runtime.tables).
    polls_inputs: ClassVar[bool] = False
    pushes_words: ClassVar[bool] = False
    # Input roles that name the tensor of an output role again (input -> output), so that each view
    # holds exactly its region (prefill's k_past: the cache rows before the chunk). The kernel reads
    # them through the output's pointer: they take no slot of their own.
    aliases: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "kind" in cls.__dict__:
            REGISTRY[cls.kind] = cls()

    # --- operands ----------------------------------------------------------------------------

    def roles(self, op: OpSpec) -> list[str]:
        """Every operand role of `op`, inputs then outputs, per-rank roles expanded."""
        return [role for _, role in self._expanded(op)]

    def _expanded(self, op: OpSpec):
        for operand in self.inputs + self.outputs:
            if operand.per_rank:
                for k in range(op.params["ranks"]):
                    yield operand, f"{operand.role}{k}"
            else:
                yield operand, operand.role

    def slots(self, op: OpSpec) -> list[tuple[str, str | tuple[str, ...] | None]]:
        """The GPU's pointer slots: (slot name, tensor bound), one per operand, inputs then outputs.
        A per-rank operand is one slot bound to its tensors of every rank (the kernel gets an
        array of their addresses); an unbound optional operand is None (a null pointer)."""
        bound = {**op.inputs, **op.outputs}
        return [(o.role, tuple(bound[f"{o.role}{k}"] for k in range(op.params["ranks"])) if o.per_rank
                 else bound.get(o.role)) for o in self.inputs + self.outputs if o.role not in self.aliases]

    def check(self, op: OpSpec) -> None:
        """The builder bound every required role and nothing undeclared, on the right side."""
        declared_in = {role for o, role in self._expanded(op) if o in self.inputs}
        declared = set(self.roles(op))
        for operand, role in self._expanded(op):
            bound = op.inputs if operand in self.inputs else op.outputs
            if role not in bound and not operand.optional:
                raise MpkError(f"op {op.name} ({self.kind}) has no tensor for its operand {role!r}")
        extra = (set(op.inputs) - declared_in) | (set(op.outputs) - (declared - declared_in))
        if extra:
            raise MpkError(f"op {op.name} ({self.kind}) binds undeclared operands {sorted(extra)}")
        for alias, role in self.aliases.items():
            if alias in op.inputs and op.inputs[alias] != op.outputs.get(role):
                raise MpkError(f"op {op.name} ({self.kind}): {alias} is not {role}")

    # --- the contract ------------------------------------------------------------------------

    def tiles(self, op: OpSpec, prog) -> list[TileTask]:
        raise NotImplementedError

    def run(self, op: OpSpec, tile: tuple, t: dict[str, torch.Tensor], step: int) -> None:
        raise NotImplementedError

    def run_whole(self, op: OpSpec, t: dict[str, torch.Tensor], step: int, fast: bool = False) -> None:
        """The whole op at once; `t` maps each role to its whole tensor."""
        raise MpkError(f"op kind {self.kind!r} ({op.name}) cannot run as one whole op")

    def cuda(self, op: OpSpec, tg) -> Cuda:
        raise MpkError(f"op kind {self.kind!r} ({op.name}) has no GPU kernel yet")


# --- helpers for tilings ---------------------------------------------------------------------

def box(op: OpSpec, role: str, *ranges: tuple[int, int]) -> Region:
    """The region of operand `role` of `op` covering `ranges`."""
    return Region(op.tensor(role), tuple((int(a), int(b)) for a, b in ranges), role)


def whole(op: OpSpec, prog, role: str) -> Region:
    return Region(op.tensor(role), prog.tensor(op.tensor(role)).full_box(), role)


def shape(op: OpSpec, prog, role: str) -> tuple[int, ...]:
    return prog.tensor(op.tensor(role)).shape


def nbytes(prog, r: Region) -> int:
    n = 1
    for a, b in r.box:
        n *= b - a
    return n * dtype(prog.tensor(r.tensor).dtype).bytes


def spans(n: int, tile: int) -> list[tuple[int, int]]:
    """[start, stop) pieces of length `tile` covering range(n); the last may be shorter."""
    return [(i, min(n, i + tile)) for i in range(0, n, tile)]


def expect(cond: bool, op: OpSpec, what: str) -> None:
    """A shape the GPU template relies on."""
    if not cond:
        raise MpkError(f"op {op.name} ({op.kind}) does not match its GPU kernel: {what}")


def cbool(v: bool) -> str:
    return "true" if v else "false"


def activation_policy(tg) -> str:
    """The device policy of the graph's activation precision (mpk/csrc/common.cuh). The KV cache's
    element type is separate: the attention templates take it as its own argument."""
    policies = {"bfloat16": "ActBf16", "float32": "ActF32"}
    act = tg.precision.activations
    if act not in policies:
        raise MpkError(f"the GPU kernels run {' or '.join(policies)} activations, not {act}")
    return policies[act]


def bf16_over_float32(tg, tensor: str) -> bool:
    """Whether `tensor` is stored in bf16 in a float32-activation graph (mpk.graph.product_input_dtype):
    its template then takes the element type apart from the activation policy's."""
    return tg.precision.activations == "float32" and tg.tensors[tensor].dtype == "bfloat16"


# --- reference math shared by op kinds -------------------------------------------------------

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias), with the activation precision the graph chose.

    Activations in the weights' dtype: transformers' semantics, the output rounded to that dtype.
    Float32 activations over bf16 weights: the weights are widened and the product is float32 (the
    input is never rounded: that rounding alone puts a 36-layer model 2e-2 from float32).
    """
    if x.dtype == weight.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x, weight.float(), None if bias is None else bias.float())


_MM_FLOAT32_OUT = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=torch.float32) on bf16


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) on inputs rounded to bf16, accumulated and returned in float32 (then in x's
    dtype): tensor-core GEMMs on the GPU. The float32 output keeps the rounding to the inputs."""
    xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
    if x.is_cuda and _MM_FLOAT32_OUT:
        y = torch.mm(xb, wb.t(), out_dtype=torch.float32)
    elif x.is_cuda:  # a torch without mm's out_dtype: cuBLAS rounds the output to bf16 too
        y = F.linear(xb, wb).float()
    else:  # the same products and float32 sums, for CPU runs of the fast mode
        y = F.linear(xb.float(), wb.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def matmul(fast: bool):
    """The matrix product of an exact (`linear`) or fast (`linear_bf16`) whole-op run."""
    return linear_bf16 if fast else linear
