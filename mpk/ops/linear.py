"""Matrix-vector ops: every task owns a block of output columns and streams that block of weight rows.

CUDA templates: mpk/csrc/gemv.cuh.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpk.errors import MpkError
from mpk.graph import CTA_WARPS
from mpk.models.functional import rms_norm
from mpk.ops.base import Cuda, OpKind, Operand, TileTask, activation_policy, bf16_over_float32, box, cbool, expect, \
    linear_bf16, matmul, nbytes, shape, spans, whole
from mpk.util import cdiv

# A GEMM task's block (MmaGemm in mpk/csrc/gemm.cuh): up to GEMM_ROWS rows x one of GEMM_WEIGHT_ROWS.
GEMM_ROWS, GEMM_WEIGHT_ROWS = 128, (64, 128)


def product(op, fast: bool = False):
    """The matrix product of `op`: on inputs rounded to bf16 when its graph says so (Precision.
    matmul_inputs) or in a fast whole-op run, else exactly in the activation precision."""
    return matmul(fast or op.params.get("bf16_inputs", False))


def policy(op, tg) -> str:
    """The activation policy a matrix-product template gets (mpk/csrc/common.cuh): the graph's, or
    float32 activations with bf16 inputs to the product."""
    return "ActF32Bf16Inputs" if op.params.get("bf16_inputs", False) else activation_policy(tg)


def normed_product(op, t, mm, bias=None) -> torch.Tensor:
    """rmsnorm(x) @ W^T (+ bias) with the views of `t`, `mm` the product. A GEMM tile (mpk/csrc/
    gemm.cuh) multiplies x * norm rounded to bf16 and scales the sums by 1/rms after; where the graph
    says its products round (a decode batch's GEMMs, or any over bf16 activations), so does this. A
    prefill graph's GEMMs over float32 activations are exact here: a reference for the GPU's, which
    stays inside the accuracy bound."""
    x, norm, eps = t["x"], t["norm"], op.params["eps"]
    if not (is_gemm(op) and (op.params.get("bf16_inputs", False) or x.dtype == torch.bfloat16)):
        return mm(rms_norm(x, norm, eps), t["weight"], bias)
    x32 = x.float()
    y = linear_bf16(x32 * norm.float(), t["weight"]) * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y if bias is None else y + bias.float()).to(x.dtype)


def k_range(op, k: int) -> tuple[int, int]:
    """The columns [k0, k1) of x and the weight that `op` multiplies: all K, or a slice of a product
    split along K (`mpk.graph.k_splits`; the `linear` kind only)."""
    return tuple(op.params.get("k_range", (0, k)))


def is_gemm(op) -> bool:
    """Whether a matrix-product op is tiled by rows as well as columns and runs as a GEMM on tensor
    cores: over a prefill chunk's many rows, or a decode batch of more than 8 (`Gemv.tile_as_gemm`)."""
    return op.params.get("gemm", False)


class Gemv(OpKind):
    """What the matrix-vector kinds share: tasks over output columns [c0, c1) of `out` that read all
    of x and weight rows [c0, c1) * rows_per_col. A kind whose columns do not depend on the tile
    computes them in `compute`, for one task's columns (`run`) or all of them (`run_whole`)."""

    header = "gemv.cuh"
    streamed = "weight"
    out_role = "out"
    rows_per_col = 1

    def out_shape(self, op, prog) -> tuple[int, int]:
        """(batch rows, output columns) of the columns the tasks cover."""
        return shape(op, prog, self.out_role)

    def tiles(self, op, prog):
        batch, n_out = self.out_shape(op, prog)
        k0, k1 = k_range(op, shape(op, prog, "weight")[1])
        gemm = is_gemm(op)
        tasks = []
        for ri, (r0, r1) in enumerate(spans(batch, GEMM_ROWS) if gemm else [(0, batch)]):
            for i, (c0, c1) in enumerate(spans(n_out, op.params["tile"])):
                reads = [box(op, "x", (r0, r1), (k0, k1)), *self.extra_reads(op, prog, r0, r1, c0, c1),
                         box(op, "weight", (c0 * self.rows_per_col, c1 * self.rows_per_col), (k0, k1))]
                writes = self.tile_writes(op, prog, i, r0, r1, c0, c1)
                nb = sum(nbytes(prog, r) for r in reads + writes)
                tasks.append(TileTask((ri, i) if gemm else (i,), reads, writes, nb,
                                      2 * (r1 - r0) * (c1 - c0) * self.rows_per_col * (k1 - k0)))
        return tasks

    def tile_as_gemm(self, op, weight_rows: int = max(GEMM_WEIGHT_ROWS)) -> None:
        """Tile `op` by blocks of GEMM_ROWS rows x `weight_rows` (one of GEMM_WEIGHT_ROWS): a GEMM
        on tensor cores, for many rows. Its template rounds x to bf16, and so does `product`."""
        if weight_rows not in GEMM_WEIGHT_ROWS:
            raise MpkError(f"{op.name}: a GEMM task takes {' or '.join(map(str, GEMM_WEIGHT_ROWS))} weight rows, "
                           f"not {weight_rows}")
        op.params["gemm"] = True
        op.params["tile"] = weight_rows // self.rows_per_col

    def run(self, op, tile, t, step):
        self.compute(op, t, product(op))

    def run_whole(self, op, t, step, fast=False):
        self.compute(op, t, product(op, fast))

    def compute(self, op, t, mm) -> None:
        """The outputs of the columns the views hold, `mm(x, weight, bias)` the matrix product. None
        here: a kind whose tiles differ in more than their columns (the LM head's candidates) has
        only `run`."""
        raise MpkError(f"op kind {self.kind!r} ({op.name}) cannot run as one whole op")

    def extra_reads(self, op, prog, r0, r1, c0, c1):
        return []

    def tile_writes(self, op, prog, i, r0, r1, c0, c1):
        return [box(op, self.out_role, (r0, r1), (c0, c1))]

    def columns_per_warp(self, op) -> int:
        """The most output columns one of the CTA's warps owns in a tile, up to the CTA's warp count
        (a template argument: the CUDA-core GEMV loads up to that many columns' rows together when K
        is short; more never pays). For a GEMM (`is_gemm`) minus its weight rows per task: the
        template then tiles rows too."""
        if is_gemm(op):
            return -op.params["tile"] * self.rows_per_col
        return min(CTA_WARPS, cdiv(op.params["tile"], CTA_WARPS))

    def gemv_shape(self, op, tg) -> tuple[int, int, int]:
        """(B, K, N), checking the weight is [N * rows_per_col, K]."""
        b, k = tg.tensors[op.inputs["x"]].shape
        out = tg.tensors[op.outputs[self.out_role]].shape
        n = out[1]
        expect(out[0] == b, op, f"output {out} does not have batch {b}")
        w = tg.tensors[op.inputs["weight"]].shape
        expect(w == (n * self.rows_per_col, k), op, f"weight {w} is not [{n * self.rows_per_col}, {k}]")
        expect(tg.tensors[op.inputs["weight"]].dtype == "bfloat16", op, "the GEMV templates stream bfloat16 weights")
        return b, k, n


class RmsnormLinear(Gemv):
    """out[:, c0:c1] = rmsnorm(x) @ W[c0:c1]^T (+ bias): the fused QKV projection."""

    kind = "rmsnorm_linear"
    template = "RmsnormLinear"
    inputs = (Operand("x"), Operand("norm"), Operand("weight"), Operand("bias", optional=True))
    outputs = (Operand("out"),)

    def extra_reads(self, op, prog, r0, r1, c0, c1):
        return [whole(op, prog, "norm")] + ([box(op, "bias", (c0, c1))] if "bias" in op.inputs else [])

    def compute(self, op, t, mm):
        t["out"].copy_(normed_product(op, t, mm, t.get("bias")))

    def cuda(self, op, tg):
        b, k, n = self.gemv_shape(op, tg)
        return Cuda((b, k, cbool("bias" in op.inputs), policy(op, tg), self.columns_per_warp(op)),
                    {"n": n, "tile": op.params["tile"]}, {"eps": op.params["eps"]})


class RmsnormGateUpSilu(Gemv):
    """out[:, c0:c1] = silu(gate) * up, gate/up rows interleaved in the fused weight (row 2i, 2i+1)."""

    kind = "rmsnorm_gate_up_silu"
    template = "RmsnormGateUpSilu"
    inputs = (Operand("x"), Operand("norm"), Operand("weight"))
    outputs = (Operand("out"),)
    rows_per_col = 2

    def extra_reads(self, op, prog, r0, r1, c0, c1):
        return [whole(op, prog, "norm")]

    def compute(self, op, t, mm):
        y = normed_product(op, t, mm)
        gate_up = y.unflatten(-1, (-1, 2))
        # copy_ rounds where `out` is stored in bf16 (mpk.graph.product_input_dtype)
        t["out"].copy_(F.silu(gate_up[..., 0]) * gate_up[..., 1])

    def cuda(self, op, tg):
        b, k, n = self.gemv_shape(op, tg)
        stored = ("bf16",) if bf16_over_float32(tg, op.outputs["out"]) else ()
        return Cuda((b, k, policy(op, tg), self.columns_per_warp(op)) + stored, {"n": n, "tile": op.params["tile"]},
                    {"eps": op.params["eps"]})


class LinearResidual(Gemv):
    """out[:, c0:c1] = residual[:, c0:c1] + x @ W[c0:c1]^T: the O and down projections on one GPU."""

    kind = "linear_residual"
    template = "LinearResidual"
    inputs = (Operand("x"), Operand("weight"), Operand("residual"))
    outputs = (Operand("out"),)

    def extra_reads(self, op, prog, r0, r1, c0, c1):
        return [box(op, "residual", (r0, r1), (c0, c1))]

    def compute(self, op, t, mm):
        x = t["x"].to(t["residual"].dtype)  # a bf16 x of a float32 graph (product_input_dtype): a float32 product
        t["out"].copy_(t["residual"] + mm(x, t["weight"]))

    def cuda(self, op, tg):
        b, k, n = self.gemv_shape(op, tg)
        if bf16_over_float32(tg, op.inputs["x"]):
            return Cuda((b, k, "ActF32Bf16X", self.columns_per_warp(op), "float"), {"n": n, "tile": op.params["tile"]})
        return Cuda((b, k, policy(op, tg), self.columns_per_warp(op)), {"n": n, "tile": op.params["tile"]})


class Linear(Gemv):
    """out[:, c0:c1] = x @ W[c0:c1]^T in float32: one rank's partial sum of a row-parallel projection,
    or one K slice's (`k_range`) of a projection split along K; `allreduce_residual` adds them up."""

    kind = "linear"
    template = "Linear"
    inputs = (Operand("x"), Operand("weight"))
    outputs = (Operand("out"),)

    def compute(self, op, t, mm):
        t["out"].copy_(mm(t["x"], t["weight"]).float())

    def cuda(self, op, tg):
        b, k, n = self.gemv_shape(op, tg)
        expect(tg.tensors[op.outputs["out"]].dtype == "float32", op, "partial sums are float32")
        k0, k1 = k_range(op, k)
        expect((k0, k1) == (0, k) or (is_gemm(op) and k0 % 8 == 0 and 0 <= k0 < k1 <= k), op,
               f"columns {k0}..{k1} of K = {k}: a slice of K runs as a GEMM, from a multiple of 8")
        return Cuda((b, k1 - k0, policy(op, tg), self.columns_per_warp(op), k), {"n": n, "tile": op.params["tile"], "k0": k0})


class AllreduceResidual(OpKind):
    """out[:, c0:c1] = residual + sum over ranks of their partials, read from every GPU's memory; on one
    GPU, the sum of a product's K slices (`mpk.graph.k_splits`), `ranks` of them."""

    kind = "allreduce_residual"
    header = "allreduce.cuh"
    template = "AllreduceResidual"
    inputs = (Operand("partial", per_rank=True), Operand("residual"))
    outputs = (Operand("out"),)

    def tiles(self, op, prog):
        batch, n = shape(op, prog, "out")
        tasks = []
        for i, (c0, c1) in enumerate(spans(n, op.params["tile"])):
            reads = [box(op, f"partial{k}", (0, batch), (c0, c1)) for k in range(op.params["ranks"])]
            reads.append(box(op, "residual", (0, batch), (c0, c1)))
            writes = [box(op, "out", (0, batch), (c0, c1))]
            nb = sum(nbytes(prog, r) for r in reads + writes)
            tasks.append(TileTask((i,), reads, writes, nb, batch * (c1 - c0) * op.params["ranks"]))
        return tasks

    def run(self, op, tile, t, step):
        total = t["partial0"].to(t["out"].device, copy=True)
        for k in range(1, op.params["ranks"]):
            total += t[f"partial{k}"].to(total.device)  # a peer GPU's partial, when whole ops run on several
        t["out"].copy_(t["residual"] + total.to(t["residual"].dtype))

    def run_whole(self, op, t, step, fast=False):
        self.run(op, None, t, step)

    def cuda(self, op, tg):
        batch, n = tg.tensors[op.outputs["out"]].shape
        for k in range(op.params["ranks"]):
            part = tg.tensors[op.inputs[f"partial{k}"]]
            expect(part.shape == (batch, n) and part.dtype == "float32", op, f"partial{k} is not float32 [{batch}, {n}]")
        return Cuda((batch, op.params["ranks"], activation_policy(tg)), {"n": n, "tile": op.params["tile"]})


class LinearTagged(Gemv):
    """One rank's partial x @ W[c0:c1]^T of a row-parallel projection, pushed into every rank's inbox
    (`inbox{k}`: rank k's [ranks, B, 2n] words, at slot `slot`, this rank's) as float32 values each
    paired with its step's tag: `allreduce_tagged` polls them in its own memory, with no counter
    between them (`mpk.graph.exchanges_words`). Here a word is a (value, tag) pair of float32
    elements; the tag lives only on the GPU, whose template writes each pair as one 8-byte store."""

    kind = "linear_tagged"
    template = "LinearTagged"
    inputs = (Operand("x"), Operand("weight"))
    outputs = (Operand("inbox", per_rank=True),)
    pushes_words = True

    def out_shape(self, op, prog) -> tuple[int, int]:
        return shape(op, prog, "x")[0], shape(op, prog, "weight")[0]

    def tile_writes(self, op, prog, i, r0, r1, c0, c1):
        me = op.params["slot"]
        return [box(op, f"inbox{k}", (me, me + 1), (r0, r1), (2 * c0, 2 * c1)) for k in range(op.params["ranks"])]

    def compute(self, op, t, mm):
        y = mm(t["x"], t["weight"]).float()
        for k in range(op.params["ranks"]):
            t[f"inbox{k}"][0, :, 0::2] = y

    def run_whole(self, op, t, step, fast=False):
        raise MpkError(f"op kind {self.kind!r} ({op.name}) runs tile by tile only: its tiles write one slot of "
                       "every rank's inbox")

    def cuda(self, op, tg):
        b, k = tg.tensors[op.inputs["x"]].shape
        n = tg.tensors[op.inputs["weight"]].shape[0]
        ranks = op.params["ranks"]
        for r in range(ranks):
            expect(tg.tensors[op.outputs[f"inbox{r}"]].shape == (ranks, b, 2 * n), op, f"inbox{r} is not [{ranks}, {b}, {2 * n}]")
        return Cuda((b, k, policy(op, tg), self.columns_per_warp(op), ranks),
                    {"n": n, "tile": op.params["tile"], "slot": op.params["slot"]})


class AllreduceTagged(OpKind):
    """out[:, c0:c1] = residual + sum over ranks of their partials, all read from this rank's own
    memory as the tagged words `linear_tagged` pushed: the template polls them until they carry the
    step's tag, and waits on no counter. Sums in rank order in float32, as `allreduce_residual`.
    The residual is a plain tensor: each task runs right after its own rank's producer of the same
    tile, on that SM (`mpk.compiler.follows`; the tables check it), whose wait acquired it."""

    kind = "allreduce_tagged"
    header = "allreduce.cuh"
    template = "AllreduceTagged"
    inputs = (Operand("inbox"), Operand("residual"))
    outputs = (Operand("out"),)
    polls_inputs = True

    def tiles(self, op, prog):
        batch, n = shape(op, prog, "out")
        ranks = op.params["ranks"]
        tasks = []
        for i, (c0, c1) in enumerate(spans(n, op.params["tile"])):
            reads = [box(op, "inbox", (0, ranks), (0, batch), (2 * c0, 2 * c1)),
                     box(op, "residual", (0, batch), (c0, c1))]
            writes = [box(op, "out", (0, batch), (c0, c1))]
            nb = sum(nbytes(prog, r) for r in reads + writes)
            tasks.append(TileTask((i,), reads, writes, nb, batch * (c1 - c0) * ranks))
        return tasks

    def run(self, op, tile, t, step):
        inbox, out = t["inbox"], t["out"]
        total = inbox[0, :, 0::2].clone()
        for k in range(1, op.params["ranks"]):
            total += inbox[k, :, 0::2]
        out.copy_(t["residual"] + total.to(out.dtype))

    def cuda(self, op, tg):
        batch, n = tg.tensors[op.outputs["out"]].shape
        ranks = op.params["ranks"]
        expect(tg.tensors[op.inputs["inbox"]].shape == (ranks, batch, 2 * n), op, f"inbox is not [{ranks}, {batch}, {2 * n}]")
        return Cuda((batch, ranks, activation_policy(tg)), {"n": n, "tile": op.params["tile"]})


class RmsnormLmHeadArgmax(Gemv):
    """Final norm + LM head over vocab rows [v0, v1) + that tile's argmax candidate per sequence."""

    kind = "rmsnorm_lm_head_argmax"
    template = "RmsnormLmHeadArgmax"
    inputs = (Operand("x"), Operand("norm"), Operand("weight"))
    outputs = (Operand("logits"), Operand("cand_val"), Operand("cand_idx"))
    out_role = "logits"

    def extra_reads(self, op, prog, r0, r1, c0, c1):
        return [whole(op, prog, "norm")]

    def tile_writes(self, op, prog, i, r0, r1, c0, c1):
        return [box(op, "logits", (r0, r1), (c0, c1)),
                box(op, "cand_val", (r0, r1), (i, i + 1)), box(op, "cand_idx", (r0, r1), (i, i + 1))]

    def run(self, op, tile, t, step):
        y = normed_product(op, t, product(op)).float()
        t["logits"].copy_(y)
        best = torch.argmax(y, dim=-1, keepdim=True)  # first index among equal maxima
        t["cand_val"].copy_(torch.gather(y, -1, best))
        t["cand_idx"].copy_(best + op.params["vocab_start"] + tile[-1] * op.params["tile"])  # the vocab tile

    def cuda(self, op, tg):
        b, k, v = self.gemv_shape(op, tg)
        n_tiles = tg.tensors[op.outputs["cand_val"]].shape[1]
        expect(n_tiles == cdiv(v, op.params["tile"]), op, "candidate count is not the number of vocab tiles")
        return Cuda((b, k, policy(op, tg), self.columns_per_warp(op)),
                    {"vocab": v, "tile": op.params["tile"], "n_tiles": n_tiles, "vocab_start": op.params["vocab_start"]},
                    {"eps": op.params["eps"]})
