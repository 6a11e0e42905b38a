"""Causal attention over a chunk of a prompt's positions at once (prefill), writing their K/V rows.

A task covers one sequence b and one KV group g: it norms and ropes the group's q and k for the
positions [start, start + rows) from the fused QKV output (rows b * rows .. (b + 1) * rows - 1 of
it), stores k and v in the cache, and attends every position to the cached positions before the
chunk (earlier chunks wrote them) and the chunk's own up to it, within the sliding window. The
next chunk, or decode, continues at position start + rows. No GPU kernel yet: the CPU executor
runs it (`mpk.prefill`).
"""

from __future__ import annotations

import torch

from mpk.models.functional import rms_norm
from mpk.ops.base import OpKind, Operand, TileTask, box, nbytes, shape, whole


def rotate_rows(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [rows, heads, head_dim] with each row's table entry rope [rows, head_dim]
    (cos, then sin), in x's dtype: the decode ops' `_rotate`, a row at a time."""
    cos, sin = rope.chunk(2, dim=-1)
    cos = torch.cat([cos, cos], -1).to(x.dtype)[:, None]
    sin = torch.cat([sin, sin], -1).to(x.dtype)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class PrefillAttention(OpKind):
    kind = "prefill_attention"
    # k_past / v_past: the cache tensors again, for the positions before the chunk (chunks after the first).
    inputs = (Operand("qkv"), Operand("rope"), Operand("q_norm", optional=True), Operand("k_norm", optional=True),
              Operand("k_past", optional=True), Operand("v_past", optional=True))
    outputs = (Operand("out"), Operand("k_cache"), Operand("v_cache"))

    def tiles(self, op, prog):
        batch, _, groups, hd = shape(op, prog, "k_cache")
        rows, start, qpk = op.params["rows"], op.params["start"], op.params["q_per_kv"]
        per_group = (qpk + 2) * hd
        tasks = []
        for b in range(batch):
            r0, r1 = b * rows, (b + 1) * rows
            for g in range(groups):
                qkv = box(op, "qkv", (r0, r1), (g * per_group, (g + 1) * per_group))
                past = [box(op, role, (b, b + 1), (0, start), (g, g + 1), (0, hd)) for role in ("k_past", "v_past")
                        if role in op.inputs]
                reads = [qkv, whole(op, prog, "rope"), *past]
                reads += [whole(op, prog, role) for role in ("q_norm", "k_norm") if role in op.inputs]
                writes = [box(op, "out", (r0, r1), (g * qpk * hd, (g + 1) * qpk * hd)),
                          box(op, "k_cache", (b, b + 1), (start, start + rows), (g, g + 1), (0, hd)),
                          box(op, "v_cache", (b, b + 1), (start, start + rows), (g, g + 1), (0, hd))]
                nb = sum(nbytes(prog, r) for r in [qkv, *past, *writes])
                flops = 4 * qpk * hd * rows * (start + (rows + 1) // 2)
                tasks.append(TileTask((b, g), reads, writes, nb, flops))
        return tasks

    def run(self, op, tile, t, step):
        rows, start = op.params["rows"], op.params["start"]
        qpk, hd = op.params["q_per_kv"], op.params["head_dim"]
        heads = t["qkv"].reshape(rows, qpk + 2, hd)
        q, k, v = heads[:, :qpk], heads[:, qpk], heads[:, qpk + 1]
        if "q_norm" in t:
            q = rms_norm(q, t["q_norm"], op.params["eps"])
            k = rms_norm(k, t["k_norm"], op.params["eps"])
        rope = t["rope"][start:start + rows]
        q = rotate_rows(q, rope)  # [rows, qpk, hd]
        kv_dtype = t["k_cache"].dtype
        k = rotate_rows(k[:, None], rope)[:, 0].to(kv_dtype)
        v = v.to(kv_dtype)
        if start:
            k_all, v_all = torch.cat([t["k_past"][0, :, 0], k]), torch.cat([t["v_past"][0, :, 0], v])
        else:
            k_all, v_all = k, v
        t["k_cache"][0, :, 0].copy_(k)  # the view holds the chunk's positions
        t["v_cache"][0, :, 0].copy_(v)
        scores = torch.einsum("rqd,sd->qrs", q.float(), k_all.float()) * op.params["scale"]  # [qpk, rows, keys]
        query, key = torch.arange(start, start + rows)[:, None], torch.arange(start + rows)[None, :]
        allowed = key <= query
        if op.params["window"]:
            allowed &= key > query - op.params["window"]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out = torch.einsum("qrs,sd->rqd", probs, v_all.float())  # [rows, qpk, hd]
        t["out"].copy_(out.reshape(rows, qpk * hd))
