"""Causal attention over a chunk of a prompt's positions at once (prefill), writing their K/V rows.

A task covers one sequence b and one KV group g: it norms and ropes the group's q and k for the
positions [start, start + rows) from the fused QKV output (rows b * rows .. (b + 1) * rows - 1 of
it), stores k and v in the cache, and attends every position to the cached positions before the
chunk (earlier chunks wrote them) and the chunk's own up to it, within the sliding window. The
next chunk, or decode, continues at position start + rows. No megakernel template yet: the CPU
executor runs its tasks, and `run_whole` runs every sequence and group at once on the CPU or
the GPU (`mpk.prefill`), fast with PyTorch's fused attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpk.models.functional import rms_norm
from mpk.ops.base import OpKind, Operand, TileTask, box, nbytes, shape, whole


def rotate_rows(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [..., rows, heads, head_dim] with each row's table entry rope [rows,
    head_dim] (cos, then sin), in x's dtype: the decode ops' `_rotate`, a row at a time."""
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
        self.attend(op, t, t["k_cache"], t["v_cache"], t.get("k_past"), t.get("v_past"), fast=False)

    def run_whole(self, op, t, step, fast=False):
        start, rows = op.params["start"], op.params["rows"]
        past = (t["k_past"][:, :start], t["v_past"][:, :start]) if "k_past" in t else (None, None)
        self.attend(op, t, t["k_cache"][:, start:start + rows], t["v_cache"][:, start:start + rows], *past, fast=fast)

    def attend(self, op, t, k_new, v_new, k_past, v_past, fast: bool) -> None:
        """Every sequence and KV group the views hold at once (one of each in a task): the qkv rows
        [batch * rows, groups * (q_per_kv + 2) * head_dim] in, the out rows [batch * rows,
        groups * q_per_kv * head_dim]; k_new / v_new [batch, rows, groups, head_dim] are the cache
        rows to fill, k_past / v_past the rows cached before the chunk (None for the first)."""
        rows, start = op.params["rows"], op.params["start"]
        qpk, hd = op.params["q_per_kv"], op.params["head_dim"]
        batch, _, groups, _ = k_new.shape
        heads = t["qkv"].reshape(batch, rows, groups, qpk + 2, hd)
        q, k, v = heads[..., :qpk, :], heads[..., qpk, :], heads[..., qpk + 1, :]
        if "q_norm" in t:
            q = rms_norm(q, t["q_norm"], op.params["eps"])
            k = rms_norm(k, t["k_norm"], op.params["eps"])
        rope = t["rope"][start:start + rows]
        q = rotate_rows(q.reshape(batch, rows, groups * qpk, hd), rope)  # [batch, rows, heads, hd]
        k = rotate_rows(k, rope).to(k_new.dtype)
        v = v.to(v_new.dtype)
        k_new.copy_(k)
        v_new.copy_(v)
        if k_past is not None:
            k, v = torch.cat([k_past, k], 1), torch.cat([v_past, v], 1)
        window, scale = op.params["window"], op.params["scale"]
        if not fast:
            out = softmax_attention(q, k, v, causal_mask(start, rows, window, q.device), scale)
        elif start == 0 and (not window or window >= rows):  # SDPA's own causal mask is this one
            out = fused_attention(q, k, v, None, scale)
        else:
            out = fused_attention(q, k, v, causal_mask(start, rows, window, q.device), scale)
        t["out"].copy_(out.reshape(t["out"].shape))


def causal_mask(start: int, rows: int, window: int | None, device) -> torch.Tensor:
    """[rows, start + rows] bool: which keys each of positions start.. attends to (True)."""
    query = torch.arange(start, start + rows, device=device)[:, None]
    key = torch.arange(start + rows, device=device)[None, :]
    allowed = key <= query
    if window:
        allowed &= key > query - window
    return allowed


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """The float32 reference: q [batch, rows, heads, hd], k / v [batch, keys, groups, hd] ->
    [batch, rows, heads, hd], each group's q_per_kv heads over its K/V head."""
    batch, rows, heads, hd = q.shape
    groups = k.shape[2]
    qg = q.float().reshape(batch, rows, groups, heads // groups, hd)
    scores = torch.einsum("brgqd,bsgd->bgqrs", qg, k.float()) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bgqrs,bsgd->brgqd", probs, v.float()).reshape(batch, rows, heads, hd)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """`softmax_attention` through PyTorch's fused attention on bf16 inputs (flash attention on the
    GPU when `mask` is None: plain causal from position 0)."""
    heads, groups = q.shape[2], k.shape[2]
    # K/V repeated for each query head of a group: every SDPA backend takes that, masked or not.
    qh = q.transpose(1, 2).to(torch.bfloat16)
    kh, vh = (x.transpose(1, 2).to(torch.bfloat16).repeat_interleave(heads // groups, dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=scale)
    return out.transpose(1, 2)
