"""Attention for one new token per sequence: split-KV attention, then a merge that appends the K/V row.

A task covers one sequence b and one KV group g (its q_per_kv query heads share one K/V head).
The fused QKV output keeps each group's rows together: q heads, then k, then v.

There is no separate q/k-norm + RoPE + append phase: every split norms and ropes the group's q
heads from the QKV output itself, the split holding the current position computes this step's k
and v and uses them from registers, and splits read only earlier rows from the cache. The merge,
one task per (b, g) that waits for all its splits, computes k and v again and writes them at row
`step` of the cache. So one task per (b, g) writes the cache, after every reader of the step, and
the next step's splits come after it through the event chain (docs/decisions.md, attention).

Splits divide the rows [lo, step] that the current position attends to (lo from the sliding
window) evenly at run time (`split_rows`), so every split has work at any position. A graph for a
short context (`mpk.graph.attention_splits` gives one split) runs `attention` instead: one task
per (b, g) over all the rows, which writes the output and appends the K/V row itself, so the layer
has no merge phase.
CUDA templates: mpk/csrc/attention.cuh.
"""

from __future__ import annotations

import torch

from mpk.dtypes import dtype
from mpk.graph import ATTN_RING_ROWS
from mpk.models.functional import rms_norm
from mpk.ops.base import Cuda, OpKind, Operand, TileTask, activation_policy, bf16_over_float32, box, cbool, expect, \
    nbytes, shape, whole
from mpk.util import cdiv


def split_rows(step: int, window: int | None, split: int, splits: int) -> tuple[int, int]:
    """[r0, r1): the rows split `split` of `splits` attends to at position `step` (the kernel's formula)."""
    lo = max(0, step + 1 - window) if window else 0
    n = step + 1 - lo
    return lo + n * split // splits, lo + n * (split + 1) // splits


def _rotate(x: torch.Tensor, rope_row: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in transformers' rotate-half layout, computed in x's dtype (`rope_row`: cos, then sin)."""
    cos, sin = rope_row.chunk(2)
    cos = torch.cat([cos, cos], -1).to(x.dtype)
    sin = torch.cat([sin, sin], -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos) + (torch.cat([-x2, x1], -1) * sin)


def _heads(op, t) -> torch.Tensor:
    """The QKV rows a task reads, as heads [n, head_dim]: the group's q heads (splits only), k, v."""
    return t["qkv"].reshape(-1, op.params["head_dim"])


def current_kv(op, t, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's k (normed, roped in the activation dtype) and v, in the cache's dtype."""
    k, v = _heads(op, t)[-2:]
    if "k_norm" in t:
        k = rms_norm(k, t["k_norm"], op.params["eps"])
    kv_dtype = t["k_cache"].dtype
    return _rotate(k, t["rope"][step]).to(kv_dtype), v.to(kv_dtype)


def current_q(op, t, step: int) -> torch.Tensor:
    """The group's query heads [q_per_kv, head_dim], normed and roped in the activation dtype."""
    q = _heads(op, t)[:-2]
    if "q_norm" in t:
        q = rms_norm(q, t["q_norm"], op.params["eps"])
    return _rotate(q, t["rope"][step])


def attend_rows(op, t, k_cache, v_cache, step: int, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of the group's query heads over rows [r0, r1) of [lo, step], float32: the
    normalized output [q_per_kv, head_dim] and its log-sum-exp [q_per_kv]. Rows below `step` come from
    the cache column views [1, seq, 1, head_dim]; row `step`, when in range, is this step's k and v."""
    cached = slice(r0, min(r1, step))  # this step's row is not in the cache yet
    k, v = k_cache[0, cached, 0], v_cache[0, cached, 0]
    if r1 == step + 1:
        k_now, v_now = current_kv(op, t, step)
        k, v = torch.cat([k, k_now[None]]), torch.cat([v, v_now[None]])
    scores = (current_q(op, t, step).float() @ k.float().T) * op.params["scale"]  # [qpk, rows]
    m = scores.max(-1, keepdim=True).values
    p = torch.exp(scores - m)
    denom = p.sum(-1, keepdim=True)
    return (p @ v.float()) / denom, (m + torch.log(denom)).squeeze(-1)


def _current_reads(op, prog, b: int, g: int, rows: slice) -> list:
    """QKV rows `rows` of group g (relative to the group), the RoPE table and the norm weights bound."""
    per_group = (op.params["q_per_kv"] + 2) * op.params["head_dim"]
    start, stop, _ = rows.indices(per_group)
    reads = [box(op, "qkv", (b, b + 1), (g * per_group + start, g * per_group + stop)), whole(op, prog, "rope")]
    return reads + [whole(op, prog, role) for role in ("q_norm", "k_norm") if role in op.inputs]


def _cache_column(op, prog, role: str, b: int, g: int):
    _, seq, _, hd = shape(op, prog, role)
    return box(op, role, (b, b + 1), (0, seq), (g, g + 1), (0, hd))


def _attending(op, prog, b: int, g: int, cache_roles: tuple[str, str], splits: int) -> tuple[list, int, int]:
    """What a task attending over the cache column of (b, g) reads: the group's QKV rows, RoPE, the
    norm weights and the whole column through `cache_roles` (static boxes; at run time the rows it
    attends to), with its read bytes and flops costed at half the longest context, shared by `splits`
    tasks."""
    _, seq, _, hd = shape(op, prog, "k_cache")
    reads = _current_reads(op, prog, b, g, slice(None)) + [_cache_column(op, prog, role, b, g) for role in cache_roles]
    kv_bytes = sum(nbytes(prog, r) for r in reads[-2:]) // (2 * splits)
    return reads, nbytes(prog, reads[0]) + kv_bytes, 4 * op.params["q_per_kv"] * hd * seq // (2 * splits)


def _kv_type(op, tg) -> str:
    """The CUDA element type of the KV cache, which the templates take apart from the activations'."""
    k, v = (tg.tensors[op.tensor(role)].dtype for role in ("k_cache", "v_cache"))
    expect(k == v and k in ("bfloat16", "float32"), op, f"the KV cache is {k}/{v}, not bfloat16 or float32")
    return dtype(k).cuda


def _stored(op, tg) -> tuple:
    """The output's element type, as a last template argument where it is not the activations' (bf16
    in a float32 graph: mpk.graph.product_input_dtype)."""
    return ("bf16",) if bf16_over_float32(tg, op.outputs["out"]) else ()


def _check_heads(op, tg) -> None:
    qpk, hd = op.params["q_per_kv"], op.params["head_dim"]
    _, s, g, cache_hd = tg.tensors[op.tensor("k_cache")].shape
    expect(cache_hd == hd, op, f"the cache has head_dim {cache_hd}, not {hd}")
    expect(tg.tensors[op.tensor("qkv")].shape[1] == g * (qpk + 2) * hd, op,
           "qkv rows are not groups x (q_per_kv + 2) heads")
    expect(hd % 2 == 0 and 16 <= hd <= 256, op, f"head_dim {hd} is not even and within 16..256")
    expect(1 <= qpk <= 8, op, f"{qpk} query heads per KV head; the kernel takes 1 to 8")


def _cuda_shapes(op, tg, norm_role: str) -> tuple[tuple, dict]:
    """What both attention templates take: (q_per_kv, head_dim, normed?, activation policy, KV type)
    and the run-time groups, cache length and splits. `norm_role`: the norm whose presence is a flag."""
    _check_heads(op, tg)
    _, g, splits, _, _ = tg.tensors[op.tensor("part")].shape
    _, s, _, _ = tg.tensors[op.tensor("k_cache")].shape
    args = (op.params["q_per_kv"], op.params["head_dim"], cbool(norm_role in op.inputs), activation_policy(tg),
            _kv_type(op, tg))
    return args, {"groups": g, "seq": s, "splits": splits}


# What every attention task reads first: its group's rows of the QKV output, the position's RoPE row
# and, where the model has them, the q/k-norm weights.
HEAD_INPUTS = (Operand("qkv"), Operand("rope"), Operand("q_norm", optional=True), Operand("k_norm", optional=True))


class AttentionSplit(OpKind):
    """Softmax attention of group g's query heads over split s's share of rows [lo, step] (flash decoding).

    Writes the split's normalized output and log-sum-exp; a split with no rows (early positions)
    writes an empty result (lse = -inf) that the merge ignores.
    """

    kind = "attention_split"
    per_sequence = True
    header = "attention.cuh"
    template = "AttentionSplit"
    inputs = (*HEAD_INPUTS, Operand("k_cache"), Operand("v_cache"))
    outputs = (Operand("part"), Operand("lse"))

    def tiles(self, op, prog):
        batch, _, groups, hd = shape(op, prog, "k_cache")
        splits = op.params["splits"]
        tasks = []
        for b in range(batch):
            for g in range(groups):
                # At run time a split reads the rows below `step` of its share.
                reads, read_bytes, flops = _attending(op, prog, b, g, ("k_cache", "v_cache"), splits)
                for s in range(splits):
                    writes = [box(op, "part", (b, b + 1), (g, g + 1), (s, s + 1), (0, op.params["q_per_kv"]), (0, hd)),
                              box(op, "lse", (b, b + 1), (g, g + 1), (s, s + 1), (0, op.params["q_per_kv"]))]
                    nb = read_bytes + sum(nbytes(prog, w) for w in writes)
                    tasks.append(TileTask((b, g, s), list(reads), writes, nb, flops))
        return tasks

    def run(self, op, tile, t, step):
        part, lse = t["part"], t["lse"]
        r0, r1 = split_rows(step, op.params["window"], tile[2], op.params["splits"])
        if r1 <= r0:
            part.zero_()
            lse.fill_(float("-inf"))
            return
        out, log_sum = attend_rows(op, t, t["k_cache"], t["v_cache"], step, r0, r1)
        part[0, 0, 0].copy_(out)
        lse[0, 0, 0].copy_(log_sum)

    def cuda(self, op, tg):
        args, ints = _cuda_shapes(op, tg, "q_norm")
        ring = cdiv(ints["seq"], ints["splits"]) >= ATTN_RING_ROWS  # a split's rows at the longest context
        return Cuda(args + (cbool(ring),), {**ints, "window": op.params["window"] or 0},
                    {"scale": op.params["scale"], "eps": op.params["eps"]})


class AttentionMerge(OpKind):
    """Combine the splits of group g by their log-sum-exp weights; append this step's k, v to the cache.

    The merge waits for every split of (b, g), so its write of row `step` comes after all of this
    step's readers of the cache column, and before the next step's (through the event chain).
    """

    kind = "attention_merge"
    per_sequence = True
    header = "attention.cuh"
    template = "AttentionMerge"
    inputs = (Operand("qkv"), Operand("rope"), Operand("k_norm", optional=True), Operand("part"), Operand("lse"))
    outputs = (Operand("out"), Operand("k_cache"), Operand("v_cache"))

    def tiles(self, op, prog):
        batch, groups, splits, qpk, hd = shape(op, prog, "part")
        tasks = []
        for b in range(batch):
            for g in range(groups):
                reads = _current_reads(op, prog, b, g, slice(qpk * hd, None)) + [
                    box(op, "part", (b, b + 1), (g, g + 1), (0, splits), (0, qpk), (0, hd)),
                    box(op, "lse", (b, b + 1), (g, g + 1), (0, splits), (0, qpk))]
                # Static write box: the cache column of (b, g); at run time row `step` of it.
                writes = [box(op, "out", (b, b + 1), (g * qpk * hd, (g + 1) * qpk * hd)),
                          _cache_column(op, prog, "k_cache", b, g), _cache_column(op, prog, "v_cache", b, g)]
                row_bytes = 2 * hd * dtype(prog.tensor(op.tensor("k_cache")).dtype).bytes
                nb = nbytes(prog, reads[0]) + sum(nbytes(prog, r) for r in reads[-2:]) + nbytes(prog, writes[0])
                tasks.append(TileTask((b, g), reads, writes, nb + row_bytes, 3 * splits * qpk * hd + 8 * hd))
        return tasks

    def run(self, op, tile, t, step):
        part, lse = t["part"][0, 0], t["lse"][0, 0]  # [splits, qpk, hd], [splits, qpk]
        weights = torch.softmax(lse, dim=0)  # empty splits (-inf) get weight 0
        merged = (weights.unsqueeze(-1) * part).sum(0)
        t["out"].copy_(merged.reshape(t["out"].shape))
        k, v = current_kv(op, t, step)
        t["k_cache"][0, step, 0].copy_(k)
        t["v_cache"][0, step, 0].copy_(v)

    def cuda(self, op, tg):
        args, ints = _cuda_shapes(op, tg, "k_norm")
        return Cuda(args + _stored(op, tg), ints, {"eps": op.params["eps"]})


class Attention(OpKind):
    """Softmax attention of group g's query heads over all of [lo, step] in one task, for graphs of
    short contexts: writes the output, then appends this step's k, v at row `step` of the cache.

    The task reads the column's earlier rows through k_past / v_past (the cache tensors again) and
    writes row `step`, which no task of this step reads; the next step's task of (b, g) reads it
    after the event chain, as it would after a merge.
    """

    kind = "attention"
    per_sequence = True
    header = "attention.cuh"
    template = "Attention"
    inputs = (*HEAD_INPUTS, Operand("k_past"), Operand("v_past"))
    outputs = (Operand("out"), Operand("k_cache"), Operand("v_cache"))
    aliases = {"k_past": "k_cache", "v_past": "v_cache"}  # the earlier rows, read through the cache's pointer

    def tiles(self, op, prog):
        batch, _, groups, hd = shape(op, prog, "k_cache")
        qpk = op.params["q_per_kv"]
        row_bytes = 2 * hd * dtype(prog.tensor(op.tensor("k_cache")).dtype).bytes
        tasks = []
        for b in range(batch):
            for g in range(groups):
                # At run time rows [lo, step) are read and row `step` is written (static boxes: the column).
                reads, read_bytes, flops = _attending(op, prog, b, g, ("k_past", "v_past"), 1)
                writes = [box(op, "out", (b, b + 1), (g * qpk * hd, (g + 1) * qpk * hd)),
                          _cache_column(op, prog, "k_cache", b, g), _cache_column(op, prog, "v_cache", b, g)]
                tasks.append(TileTask((b, g), reads, writes, read_bytes + nbytes(prog, writes[0]) + row_bytes, flops))
        return tasks

    def run(self, op, tile, t, step):
        out, _ = attend_rows(op, t, t["k_past"], t["v_past"], step, *split_rows(step, op.params["window"], 0, 1))
        t["out"].copy_(out.reshape(t["out"].shape))
        k, v = current_kv(op, t, step)
        t["k_cache"][0, step, 0].copy_(k)
        t["v_cache"][0, step, 0].copy_(v)

    def cuda(self, op, tg):
        _check_heads(op, tg)
        _, s, g, _ = tg.tensors[op.tensor("k_cache")].shape
        args = (op.params["q_per_kv"], op.params["head_dim"], cbool("q_norm" in op.inputs), activation_policy(tg),
                _kv_type(op, tg)) + _stored(op, tg)
        return Cuda(args, {"groups": g, "seq": s, "window": op.params["window"] or 0},
                    {"scale": op.params["scale"], "eps": op.params["eps"]})
