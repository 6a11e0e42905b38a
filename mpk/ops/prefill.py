"""Causal attention over a prompt's rows at once (prefill), writing their K/V rows into the cache.

A task covers one sequence b and one KV group g: it norms and ropes the group's q and k for the
prompt rows [0, rows) from the fused QKV output (rows b * rows .. (b + 1) * rows - 1 of it),
stores k and v in the cache, and attends every row to the rows up to it (within the sliding
window). The decode program then continues at position `rows` over the filled cache. No GPU
kernel yet: the CPU executor runs it (`mpk.prefill`).
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
    inputs = (Operand("qkv"), Operand("rope"), Operand("q_norm", optional=True), Operand("k_norm", optional=True))
    outputs = (Operand("out"), Operand("k_cache"), Operand("v_cache"))

    def tiles(self, op, prog):
        batch, _, groups, hd = shape(op, prog, "k_cache")
        rows, qpk = op.params["rows"], op.params["q_per_kv"]
        per_group = (qpk + 2) * hd
        tasks = []
        for b in range(batch):
            r0, r1 = b * rows, (b + 1) * rows
            for g in range(groups):
                reads = [box(op, "qkv", (r0, r1), (g * per_group, (g + 1) * per_group)), whole(op, prog, "rope")]
                reads += [whole(op, prog, role) for role in ("q_norm", "k_norm") if role in op.inputs]
                writes = [box(op, "out", (r0, r1), (g * qpk * hd, (g + 1) * qpk * hd)),
                          box(op, "k_cache", (b, b + 1), (0, rows), (g, g + 1), (0, hd)),
                          box(op, "v_cache", (b, b + 1), (0, rows), (g, g + 1), (0, hd))]
                nb = sum(nbytes(prog, r) for r in [reads[0]] + writes)
                tasks.append(TileTask((b, g), reads, writes, nb, 4 * qpk * hd * rows * (rows + 1) // 2))
        return tasks

    def run(self, op, tile, t, step):
        rows, qpk, hd = op.params["rows"], op.params["q_per_kv"], op.params["head_dim"]
        heads = t["qkv"].reshape(rows, qpk + 2, hd)
        q, k, v = heads[:, :qpk], heads[:, qpk], heads[:, qpk + 1]
        if "q_norm" in t:
            q = rms_norm(q, t["q_norm"], op.params["eps"])
            k = rms_norm(k, t["k_norm"], op.params["eps"])
        rope = t["rope"][:rows]
        q = rotate_rows(q, rope)  # [rows, qpk, hd]
        kv_dtype = t["k_cache"].dtype
        k = rotate_rows(k[:, None], rope)[:, 0].to(kv_dtype)
        v = v.to(kv_dtype)
        t["k_cache"][0, :, 0].copy_(k)
        t["v_cache"][0, :, 0].copy_(v)
        scores = torch.einsum("rqd,sd->qrs", q.float(), k.float()) * op.params["scale"]  # [qpk, rows, rows]
        pos = torch.arange(rows)
        allowed = pos[None, :] <= pos[:, None]
        if op.params["window"]:
            allowed &= pos[None, :] > pos[:, None] - op.params["window"]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("qrs,sd->rqd", probs, v.float())  # [rows, qpk, hd]
        t["out"].copy_(out.reshape(rows, qpk * hd))
