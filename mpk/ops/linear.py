"""Matrix-vector ops: every task owns a block of output columns and streams that block of weight rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpk.ops.base import OpKind, TileTask, linear, nbytes, region, rmsnorm, spans, whole


def _linear_tiles(op, prog, weight: str, out: str, x: str, extra_reads=(), rows_per_col: int = 1, bias: str | None = None):
    """Tasks over output columns [c0, c1): read all of x, weight rows [c0, c1) * rows_per_col."""
    n_out = prog.tensor(out).shape[1]
    k = prog.tensor(weight).shape[1]
    batch = prog.tensor(x).shape[0]
    tasks = []
    for i, (c0, c1) in enumerate(spans(n_out, op.params["tile"])):
        w = region(weight, (c0 * rows_per_col, c1 * rows_per_col), (0, k))
        reads = [whole(prog, x), *[r(c0, c1) for r in extra_reads], w]
        if bias:
            reads.append(region(bias, (c0, c1)))
        writes = [region(out, (0, batch), (c0, c1))]
        nb = sum(nbytes(prog, r) for r in reads + writes)
        tasks.append(TileTask((i,), reads, writes, nb, 2 * batch * (c1 - c0) * rows_per_col * k))
    return tasks


class RmsnormLinear(OpKind):
    """out[:, c0:c1] = rmsnorm(x) @ W[c0:c1]^T (+ bias): the fused QKV projection."""

    def tiles(self, op, prog):
        norm = op.inputs["norm"]
        return _linear_tiles(op, prog, op.inputs["weight"], op.outputs["out"], op.inputs["x"],
                             extra_reads=[lambda c0, c1: whole(prog, norm)], bias=op.inputs.get("bias"))

    def run(self, op, tile, reads, writes, step):
        x, norm, w = reads[:3]
        bias = reads[3] if len(reads) > 3 else None
        writes[0].copy_(linear(rmsnorm(x, norm, op.params["eps"]), w, bias))


class RmsnormGateUpSilu(OpKind):
    """out[:, c0:c1] = silu(gate) * up, gate/up rows interleaved in the fused weight (row 2i, 2i+1)."""

    def tiles(self, op, prog):
        norm = op.inputs["norm"]
        return _linear_tiles(op, prog, op.inputs["weight"], op.outputs["out"], op.inputs["x"],
                             extra_reads=[lambda c0, c1: whole(prog, norm)], rows_per_col=2)

    def run(self, op, tile, reads, writes, step):
        x, norm, w = reads
        y = linear(rmsnorm(x, norm, op.params["eps"]), w)
        gate_up = y.unflatten(-1, (-1, 2))
        writes[0].copy_(F.silu(gate_up[..., 0]) * gate_up[..., 1])


class LinearResidual(OpKind):
    """out[:, c0:c1] = residual[:, c0:c1] + x @ W[c0:c1]^T: the O and down projections on one GPU."""

    def tiles(self, op, prog):
        res, batch = op.inputs["residual"], prog.tensor(op.inputs["x"]).shape[0]
        return _linear_tiles(op, prog, op.inputs["weight"], op.outputs["out"], op.inputs["x"],
                             extra_reads=[lambda c0, c1: region(res, (0, batch), (c0, c1))])

    def run(self, op, tile, reads, writes, step):
        x, residual, w = reads
        writes[0].copy_(residual + linear(x, w))


class Linear(OpKind):
    """out[:, c0:c1] = x @ W[c0:c1]^T in float32: one rank's partial sum of a row-parallel projection."""

    def tiles(self, op, prog):
        return _linear_tiles(op, prog, op.inputs["weight"], op.outputs["out"], op.inputs["x"])

    def run(self, op, tile, reads, writes, step):
        x, w = reads
        writes[0].copy_(linear(x, w).float())


class AllreduceResidual(OpKind):
    """out[:, c0:c1] = residual + sum over ranks of their partials, read from every GPU's memory."""

    def tiles(self, op, prog):
        ranks = op.params["ranks"]
        out = op.outputs["out"]
        batch, n = prog.tensor(out).shape
        tasks = []
        for i, (c0, c1) in enumerate(spans(n, op.params["tile"])):
            reads = [region(op.inputs[f"partial{k}"], (0, batch), (c0, c1)) for k in range(ranks)]
            reads.append(region(op.inputs["residual"], (0, batch), (c0, c1)))
            writes = [region(out, (0, batch), (c0, c1))]
            nb = sum(nbytes(prog, r) for r in reads + writes)
            tasks.append(TileTask((i,), reads, writes, nb, batch * (c1 - c0) * ranks))
        return tasks

    def run(self, op, tile, reads, writes, step):
        *partials, residual = reads
        total = partials[0].clone()
        for p in partials[1:]:
            total += p
        writes[0].copy_(residual + total.to(residual.dtype))


class RmsnormLmHeadArgmax(OpKind):
    """Final norm + LM head over vocab rows [v0, v1) + that tile's argmax candidate per sequence."""

    def tiles(self, op, prog):
        x, norm, weight = op.inputs["x"], op.inputs["norm"], op.inputs["weight"]
        logits, cval, cidx = op.outputs["logits"], op.outputs["cand_val"], op.outputs["cand_idx"]
        batch, vocab = prog.tensor(logits).shape
        k = prog.tensor(weight).shape[1]
        tasks = []
        for i, (v0, v1) in enumerate(spans(vocab, op.params["tile"])):
            reads = [whole(prog, x), whole(prog, norm), region(weight, (v0, v1), (0, k))]
            writes = [region(logits, (0, batch), (v0, v1)),
                      region(cval, (0, batch), (i, i + 1)), region(cidx, (0, batch), (i, i + 1))]
            nb = sum(nbytes(prog, r) for r in reads + writes)
            tasks.append(TileTask((i,), reads, writes, nb, 2 * batch * (v1 - v0) * k))
        return tasks

    def run(self, op, tile, reads, writes, step):
        x, norm, w = reads
        logits, cand_val, cand_idx = writes
        y = linear(rmsnorm(x, norm, op.params["eps"]), w).float()
        logits.copy_(y)
        best = torch.argmax(y, dim=-1, keepdim=True)  # first index among equal maxima
        cand_val.copy_(torch.gather(y, -1, best))
        cand_idx.copy_(best + op.params["vocab_start"] + tile[0] * op.params["tile"])
