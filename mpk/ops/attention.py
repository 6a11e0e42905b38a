"""Attention for one new token per sequence: q/k-norm + RoPE + KV append, split-KV attention, merge.

A task covers one sequence b and one KV group g (its q_per_kv query heads share one K/V head).
The fused QKV output keeps each group's rows together: q heads, then k, then v.
CUDA templates: mpk/csrc/attention.cuh.
"""

from __future__ import annotations

import torch

from mpk.models.functional import rms_norm
from mpk.ops.base import Cuda, OpKind, Operand, TileTask, activation_policy, box, cbool, expect, nbytes, shape, whole


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in transformers' rotate-half layout (first half pairs with second half)."""
    cos = torch.cat([cos, cos], -1).to(x.dtype)
    sin = torch.cat([sin, sin], -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos) + (torch.cat([-x2, x1], -1) * sin)


class QkNormRopeAppend(OpKind):
    """q = rope(norm(q)); k = rope(norm(k)); append k, v at this step's row of the cache."""

    kind = "qk_norm_rope_append"
    header = "attention.cuh"
    template = "QkNormRopeAppend"
    inputs = (Operand("qkv"), Operand("cos"), Operand("sin"),
              Operand("q_norm", optional=True), Operand("k_norm", optional=True))
    outputs = (Operand("q"), Operand("k_cache"), Operand("v_cache"))

    def tiles(self, op, prog):
        qpk, hd = op.params["q_per_kv"], op.params["head_dim"]
        batch, seq, groups, _ = shape(op, prog, "k_cache")
        rows = (qpk + 2) * hd
        tasks = []
        for b in range(batch):
            for g in range(groups):
                reads = [box(op, "qkv", (b, b + 1), (g * rows, (g + 1) * rows)),
                         whole(op, prog, "cos"), whole(op, prog, "sin")]
                if "q_norm" in op.inputs:
                    reads += [whole(op, prog, "q_norm"), whole(op, prog, "k_norm")]
                writes = [box(op, "q", (b, b + 1), (g * qpk, (g + 1) * qpk), (0, hd)),
                          box(op, "k_cache", (b, b + 1), (0, seq), (g, g + 1), (0, hd)),
                          box(op, "v_cache", (b, b + 1), (0, seq), (g, g + 1), (0, hd))]
                # At run time one row of the rope tables and of each cache is touched.
                nb = nbytes(prog, reads[0]) + 2 * hd * 4 + nbytes(prog, writes[0]) + 2 * hd * 2
                tasks.append(TileTask((b, g), reads, writes, nb, 8 * rows))
        return tasks

    def run(self, op, tile, t, step):
        qpk, hd, eps = op.params["q_per_kv"], op.params["head_dim"], op.params["eps"]
        heads = t["qkv"].reshape(qpk + 2, hd)
        q, k, v = heads[:qpk], heads[qpk], heads[qpk + 1]
        if "q_norm" in t:
            q, k = rms_norm(q, t["q_norm"], eps), rms_norm(k, t["k_norm"], eps)
        c, s = t["cos"][step], t["sin"][step]
        t["q"].copy_(_rotate(q, c, s).reshape(t["q"].shape))
        t["k_cache"][0, step, 0].copy_(_rotate(k, c, s))
        t["v_cache"][0, step, 0].copy_(v)

    def cuda(self, op, tg):
        qpk, hd = op.params["q_per_kv"], op.params["head_dim"]
        _, s, g, _ = tg.tensors[op.outputs["k_cache"]].shape
        expect(tg.tensors[op.inputs["qkv"]].shape[1] == g * (qpk + 2) * hd, op,
               "qkv rows are not groups x (q_per_kv + 2) heads")
        expect(hd % 2 == 0, op, f"head_dim {hd} is odd")
        return Cuda((qpk, hd, cbool("q_norm" in op.inputs), activation_policy(tg)),
                    {"groups": g, "seq": s}, {"eps": op.params["eps"]})


class AttentionSplit(OpKind):
    """Softmax attention of group g's query heads over KV rows [c0, c1) of the cache (flash-decoding split).

    Writes the split's normalized output and log-sum-exp; splits past the current position write
    an empty result (lse = -inf) that the merge ignores.
    """

    kind = "attention_split"
    header = "attention.cuh"
    template = "AttentionSplit"
    inputs = (Operand("q"), Operand("k_cache"), Operand("v_cache"))
    outputs = (Operand("part"), Operand("lse"))

    def tiles(self, op, prog):
        batch, seq, groups, hd = shape(op, prog, "k_cache")
        _, _, splits, qpk, _ = shape(op, prog, "part")
        chunk = op.params["chunk"]
        tasks = []
        for b in range(batch):
            for g in range(groups):
                for s in range(splits):
                    c0, c1 = s * chunk, min(seq, (s + 1) * chunk)
                    reads = [box(op, "q", (b, b + 1), (g * qpk, (g + 1) * qpk), (0, hd)),
                             box(op, "k_cache", (b, b + 1), (c0, c1), (g, g + 1), (0, hd)),
                             box(op, "v_cache", (b, b + 1), (c0, c1), (g, g + 1), (0, hd))]
                    writes = [box(op, "part", (b, b + 1), (g, g + 1), (s, s + 1), (0, qpk), (0, hd)),
                              box(op, "lse", (b, b + 1), (g, g + 1), (s, s + 1), (0, qpk))]
                    # Costed at half occupancy: the cache fills as decoding goes on.
                    kv_bytes = (nbytes(prog, reads[1]) + nbytes(prog, reads[2])) // 2
                    nb = nbytes(prog, reads[0]) + kv_bytes + sum(nbytes(prog, w) for w in writes)
                    tasks.append(TileTask((b, g, s), reads, writes, nb, 4 * qpk * hd * (c1 - c0) // 2))
        return tasks

    def run(self, op, tile, t, step):
        chunk, window = op.params["chunk"], op.params["window"]
        k_cache, v_cache, part, lse = t["k_cache"], t["v_cache"], t["part"], t["lse"]
        c0 = tile[2] * chunk
        lo = max(0, step + 1 - window) if window else 0
        a, z = max(c0, lo) - c0, min(c0 + k_cache.shape[1], step + 1) - c0
        if z <= a:
            part.zero_()
            lse.fill_(float("-inf"))
            return
        qh = t["q"][0].float()  # [qpk, hd]
        k = k_cache[0, a:z, 0].float()  # [rows, hd]
        v = v_cache[0, a:z, 0].float()
        scores = (qh @ k.T) * op.params["scale"]
        m = scores.max(-1, keepdim=True).values
        p = torch.exp(scores - m)
        denom = p.sum(-1, keepdim=True)
        part[0, 0, 0].copy_((p @ v) / denom)
        lse[0, 0, 0].copy_((m + torch.log(denom)).squeeze(-1))

    def cuda(self, op, tg):
        _, g, splits, qpk, hd = tg.tensors[op.outputs["part"]].shape
        _, s, _, _ = tg.tensors[op.inputs["k_cache"]].shape
        return Cuda((qpk, hd, activation_policy(tg)),
                    {"groups": g, "seq": s, "splits": splits, "chunk": op.params["chunk"],
                     "window": op.params["window"] or 0},
                    {"scale": op.params["scale"]})


class AttentionMerge(OpKind):
    """Combine the splits of group g by their log-sum-exp weights into the attention output."""

    kind = "attention_merge"
    header = "attention.cuh"
    template = "AttentionMerge"
    inputs = (Operand("part"), Operand("lse"))
    outputs = (Operand("out"),)

    def tiles(self, op, prog):
        batch, groups, splits, qpk, hd = shape(op, prog, "part")
        tasks = []
        for b in range(batch):
            for g in range(groups):
                reads = [box(op, "part", (b, b + 1), (g, g + 1), (0, splits), (0, qpk), (0, hd)),
                         box(op, "lse", (b, b + 1), (g, g + 1), (0, splits), (0, qpk))]
                writes = [box(op, "out", (b, b + 1), (g * qpk * hd, (g + 1) * qpk * hd))]
                nb = sum(nbytes(prog, r) for r in reads + writes)
                tasks.append(TileTask((b, g), reads, writes, nb, 3 * splits * qpk * hd))
        return tasks

    def run(self, op, tile, t, step):
        part, lse = t["part"][0, 0], t["lse"][0, 0]  # [splits, qpk, hd], [splits, qpk]
        weights = torch.softmax(lse, dim=0)  # empty splits (-inf) get weight 0
        merged = (weights.unsqueeze(-1) * part).sum(0)
        t["out"].copy_(merged.reshape(t["out"].shape))

    def cuda(self, op, tg):
        _, g, splits, qpk, hd = tg.tensors[op.inputs["part"]].shape
        return Cuda((qpk, hd, activation_policy(tg)), {"groups": g, "splits": splits})
