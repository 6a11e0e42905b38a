"""Causal attention over a chunk of a prompt's positions at once (prefill), writing their K/V rows.

A task covers one sequence b, one KV group g and one block j of the chunk's rows, [r0, r1) with
r0 = j * R (`query_rows`): it norms and ropes the group's q for those rows and k for the rows [0, r1)
from the fused QKV output (rows b * rows .. of it), stores k and v of its own rows [r0, r1) in the
cache, and attends each of its positions start + r0 .. to the cached positions before the chunk
(earlier chunks wrote them) and the chunk's own up to it, within the sliding window. Computing the
chunk's k and v itself, no task waits for another of the op. The next chunk, or decode, continues
at position start + rows. `run_whole` runs every sequence, group and row at once on the CPU or the
GPU (`mpk.prefill`), fast with PyTorch's fused attention.
CUDA template: mpk/csrc/prefill_attention.cuh (flash attention on tensor cores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mpk.models.functional import rms_norm
from mpk.ops.attention import HEAD_INPUTS, _check_heads, _kv_type
from mpk.ops.base import (Cuda, OpKind, Operand, TileTask, activation_policy, box, cbool, expect, nbytes, shape, spans,
                          whole)


def query_rows(q_per_kv: int) -> int:
    """R, the chunk rows of one task: on the GPU each warp takes 16 rows of one query head, so a task
    has (R / 16) x q_per_kv such items, 8 (the CTA's warps) when q_per_kv divides 8."""
    return 16 * max(1, 8 // q_per_kv)


def rope_rows(rope: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [rows, 1, head_dim] in `dtype` from table rows rope [rows, head_dim] (cos, then
    sin), as `rotate_rows` takes them."""
    cos, sin = rope.chunk(2, dim=-1)
    return torch.cat([cos, cos], -1).to(dtype)[:, None], torch.cat([sin, sin], -1).to(dtype)[:, None]


def rotate_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [..., rows, heads, head_dim] with each row's `rope_rows`, in x's dtype:
    the decode ops' `_rotate`, a row at a time."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def head_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fast: bool) -> torch.Tensor:
    """RMSNorm of each head: `rms_norm`, or in a fast run PyTorch's own (one fused kernel on the GPU
    rather than six; the same values up to rounding)."""
    if fast:
        return F.rms_norm(x, x.shape[-1:], weight.to(x.dtype), eps)
    return rms_norm(x, weight, eps)


class PrefillAttention(OpKind):
    kind = "prefill_attention"
    header = "prefill_attention.cuh"
    template = "PrefillAttention"
    # k_past / v_past: the cache tensors again, for the positions before the chunk (chunks after the first).
    inputs = (*HEAD_INPUTS, Operand("k_past", optional=True), Operand("v_past", optional=True))
    outputs = (Operand("out"), Operand("k_cache"), Operand("v_cache"))
    aliases = {"k_past": "k_cache", "v_past": "v_cache"}  # read through the cache's pointer (no slot to spare)

    def tiles(self, op, prog):
        batch, _, groups, hd = shape(op, prog, "k_cache")
        rows, start, qpk = op.params["rows"], op.params["start"], op.params["q_per_kv"]
        window = op.params["window"]
        per_group = (qpk + 2) * hd
        tasks = []
        for b in range(batch):
            at = b * rows
            for g in range(groups):
                past = [box(op, role, (b, b + 1), (0, start), (g, g + 1), (0, hd)) for role in self.aliases
                        if role in op.inputs]
                shared = [whole(op, prog, "rope"), *past]
                shared += [whole(op, prog, role) for role in ("q_norm", "k_norm") if role in op.inputs]
                for j, (r0, r1) in enumerate(spans(rows, query_rows(qpk))):
                    qkv = box(op, "qkv", (at, at + r1), (g * per_group, (g + 1) * per_group))
                    writes = [box(op, "out", (at + r0, at + r1), (g * qpk * hd, (g + 1) * qpk * hd)),
                              *(box(op, role, (b, b + 1), (start + r0, start + r1), (g, g + 1), (0, hd))
                                for role in ("k_cache", "v_cache"))]
                    nb = sum(nbytes(prog, r) for r in [qkv, *past, *writes])
                    keys = sum(min(start + i + 1, window or start + i + 1) for i in range(r0, r1))
                    tasks.append(TileTask((b, g, j), [qkv, *shared], writes, nb, 4 * qpk * hd * keys))
        return tasks

    def run(self, op, tile, t, step):
        r0, _ = spans(op.params["rows"], query_rows(op.params["q_per_kv"]))[tile[2]]
        self.attend(op, t, r0, t["k_cache"], t["v_cache"], t.get("k_past"), t.get("v_past"), fast=False)

    def run_whole(self, op, t, step, fast=False):
        start, rows = op.params["start"], op.params["rows"]
        past = (t["k_past"][:, :start], t["v_past"][:, :start]) if "k_past" in t else (None, None)
        self.attend(op, t, 0, t["k_cache"][:, start:start + rows], t["v_cache"][:, start:start + rows], *past,
                    fast=fast)

    def attend(self, op, t, r0: int, k_new, v_new, k_past, v_past, fast: bool) -> None:
        """Chunk rows [r0, r1) of every sequence and KV group the views hold at once (one of each in a
        task, all of them in a whole run): the qkv rows [0, r1) of each sequence in, [batch * r1,
        groups * (q_per_kv + 2) * head_dim], and the out rows [r0, r1), [batch * (r1 - r0), groups *
        q_per_kv * head_dim]; k_new / v_new [batch, r1 - r0, groups, head_dim] are the cache rows to
        fill, k_past / v_past the rows cached before the chunk (None for the first)."""
        start, qpk, hd = op.params["start"], op.params["q_per_kv"], op.params["head_dim"]
        batch, _, groups, _ = k_new.shape
        r1 = t["qkv"].shape[0] // batch
        heads = t["qkv"].reshape(batch, r1, groups, qpk + 2, hd)
        q, k, v = heads[:, r0:, :, :qpk, :], heads[..., qpk, :], heads[..., qpk + 1, :]
        if "q_norm" in t:
            q = head_norm(q, t["q_norm"], op.params["eps"], fast)
            k = head_norm(k, t["k_norm"], op.params["eps"], fast)
        cos, sin = rope_rows(t["rope"][start:start + r1], q.dtype)
        q = rotate_rows(q.reshape(batch, r1 - r0, groups * qpk, hd), cos[r0:], sin[r0:])  # [batch, rows, heads, hd]
        k = rotate_rows(k, cos, sin).to(k_new.dtype)
        v = v.to(v_new.dtype)
        k_new.copy_(k[:, r0:])
        v_new.copy_(v[:, r0:])
        if k_past is not None:
            k, v = torch.cat([k_past, k], 1), torch.cat([v_past, v], 1)
        window, scale = op.params["window"], op.params["scale"]
        if fast and start + r0 == 0 and (not window or window >= r1):  # SDPA's own causal mask is this one
            out = fused_attention(q, k, v, None, scale)
        else:
            mask = causal_mask(start + r0, start + r1, window, q.device)
            out = (fused_attention if fast else softmax_attention)(q, k, v, mask, scale)
        t["out"].copy_(out.reshape(t["out"].shape))

    def cuda(self, op, tg):
        _check_heads(op, tg)
        qpk, hd = op.params["q_per_kv"], op.params["head_dim"]
        expect(hd % 16 == 0, op, f"prefill attention on the GPU needs head_dim a multiple of 16, not {hd}")
        _, seq, groups, _ = tg.tensors[op.tensor("k_cache")].shape
        args = (qpk, hd, query_rows(qpk), cbool("q_norm" in op.inputs), activation_policy(tg), _kv_type(op, tg))
        ints = {"rows": op.params["rows"], "start": op.params["start"], "window": op.params["window"] or 0,
                "groups": groups, "seq": seq}
        return Cuda(args, ints, {"scale": op.params["scale"], "eps": op.params["eps"]})


def causal_mask(q0: int, q1: int, window: int | None, device) -> torch.Tensor:
    """[q1 - q0, q1] bool: which keys each of positions [q0, q1) attends to (True)."""
    query = torch.arange(q0, q1, device=device)[:, None]
    key = torch.arange(q1, device=device)[None, :]
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


# PyTorch's attention backends other than cuDNN's, which plans each new shape first (1.3 s measured
# on an H200 for a masked chunk of a new (start, rows)): a server's chunks are new shapes all the time.
FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """`softmax_attention` through PyTorch's fused attention on bf16 inputs (flash attention on the
    GPU when `mask` is None: plain causal from position 0; memory-efficient attention with a mask)."""
    heads, groups = q.shape[2], k.shape[2]
    # K/V repeated for each query head of a group: every SDPA backend takes that, masked or not.
    qh = q.transpose(1, 2).to(torch.bfloat16)
    kh, vh = (x.transpose(1, 2).to(torch.bfloat16).repeat_interleave(heads // groups, dim=1) for x in (k, v))
    with sdpa_kernel(FUSED_BACKENDS):
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=scale)
    return out.transpose(1, 2)
