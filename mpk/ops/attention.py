"""Attention for one new token per sequence: q/k-norm + RoPE + KV append, split-KV attention, merge.

A task covers one sequence b and one KV group g (its q_per_kv query heads share one K/V head).
The fused QKV output keeps each group's rows together: q heads, then k, then v.
"""

from __future__ import annotations

import torch

from mpk.ops.base import OpKind, TileTask, nbytes, region, rmsnorm, whole


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in transformers' rotate-half layout (first half pairs with second half)."""
    cos = torch.cat([cos, cos], -1).to(x.dtype)
    sin = torch.cat([sin, sin], -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos) + (torch.cat([-x2, x1], -1) * sin)


class QkNormRopeAppend(OpKind):
    """q = rope(norm(q)); k = rope(norm(k)); append k, v at this step's row of the cache."""

    def tiles(self, op, prog):
        qkv, q_out = op.inputs["qkv"], op.outputs["q"]
        kc, vc = op.outputs["k_cache"], op.outputs["v_cache"]
        qpk, hd = op.params["q_per_kv"], op.params["head_dim"]
        batch, seq, groups, _ = prog.tensor(kc).shape
        rows = (qpk + 2) * hd
        tasks = []
        for b in range(batch):
            for g in range(groups):
                reads = [region(qkv, (b, b + 1), (g * rows, (g + 1) * rows)),
                         whole(prog, op.inputs["cos"]), whole(prog, op.inputs["sin"])]
                if "q_norm" in op.inputs:
                    reads += [whole(prog, op.inputs["q_norm"]), whole(prog, op.inputs["k_norm"])]
                writes = [region(q_out, (b, b + 1), (g * qpk, (g + 1) * qpk), (0, hd)),
                          region(kc, (b, b + 1), (0, seq), (g, g + 1), (0, hd)),
                          region(vc, (b, b + 1), (0, seq), (g, g + 1), (0, hd))]
                # At run time one row of the rope tables and of each cache is touched.
                nb = nbytes(prog, reads[0]) + 2 * hd * 4 + nbytes(prog, writes[0]) + 2 * hd * 2
                tasks.append(TileTask((b, g), reads, writes, nb, 8 * rows))
        return tasks

    def run(self, op, tile, reads, writes, step):
        qkv, cos, sin = reads[:3]
        q_out, k_cache, v_cache = writes
        qpk, hd, eps = op.params["q_per_kv"], op.params["head_dim"], op.params["eps"]
        heads = qkv.reshape(qpk + 2, hd)
        q, k, v = heads[:qpk], heads[qpk], heads[qpk + 1]
        if len(reads) > 3:
            q, k = rmsnorm(q, reads[3], eps), rmsnorm(k, reads[4], eps)
        c, s = cos[step], sin[step]
        q_out.copy_(_rotate(q, c, s).reshape(q_out.shape))
        k_cache[0, step, 0].copy_(_rotate(k, c, s))
        v_cache[0, step, 0].copy_(v)


class AttentionSplit(OpKind):
    """Softmax attention of group g's query heads over KV rows [c0, c1) of the cache (flash-decoding split).

    Writes the split's normalized output and log-sum-exp; splits past the current position write
    an empty result (lse = -inf) that the merge ignores.
    """

    def tiles(self, op, prog):
        q, kc, vc = op.inputs["q"], op.inputs["k_cache"], op.inputs["v_cache"]
        part, lse = op.outputs["part"], op.outputs["lse"]
        batch, seq, groups, hd = prog.tensor(kc).shape
        _, _, splits, qpk, _ = prog.tensor(part).shape
        chunk = op.params["chunk"]
        tasks = []
        for b in range(batch):
            for g in range(groups):
                for s in range(splits):
                    c0, c1 = s * chunk, min(seq, (s + 1) * chunk)
                    reads = [region(q, (b, b + 1), (g * qpk, (g + 1) * qpk), (0, hd)),
                             region(kc, (b, b + 1), (c0, c1), (g, g + 1), (0, hd)),
                             region(vc, (b, b + 1), (c0, c1), (g, g + 1), (0, hd))]
                    writes = [region(part, (b, b + 1), (g, g + 1), (s, s + 1), (0, qpk), (0, hd)),
                              region(lse, (b, b + 1), (g, g + 1), (s, s + 1), (0, qpk))]
                    # Costed at half occupancy: the cache fills as decoding goes on.
                    kv_bytes = (nbytes(prog, reads[1]) + nbytes(prog, reads[2])) // 2
                    nb = nbytes(prog, reads[0]) + kv_bytes + sum(nbytes(prog, w) for w in writes)
                    tasks.append(TileTask((b, g, s), reads, writes, nb, 4 * qpk * hd * (c1 - c0) // 2))
        return tasks

    def run(self, op, tile, reads, writes, step):
        q, k_cache, v_cache = reads
        part, lse = writes
        chunk, window = op.params["chunk"], op.params["window"]
        c0 = tile[2] * chunk
        lo = max(0, step + 1 - window) if window else 0
        a, z = max(c0, lo) - c0, min(c0 + k_cache.shape[1], step + 1) - c0
        if z <= a:
            part.zero_()
            lse.fill_(float("-inf"))
            return
        qh = q[0].float()  # [qpk, hd]
        k = k_cache[0, a:z, 0].float()  # [rows, hd]
        v = v_cache[0, a:z, 0].float()
        scores = (qh @ k.T) * op.params["scale"]
        m = scores.max(-1, keepdim=True).values
        p = torch.exp(scores - m)
        denom = p.sum(-1, keepdim=True)
        part[0, 0, 0].copy_((p @ v) / denom)
        lse[0, 0, 0].copy_((m + torch.log(denom)).squeeze(-1))


class AttentionMerge(OpKind):
    """Combine the splits of group g by their log-sum-exp weights into the attention output."""

    def tiles(self, op, prog):
        part, lse, out = op.inputs["part"], op.inputs["lse"], op.outputs["out"]
        batch, groups, splits, qpk, hd = prog.tensor(part).shape
        tasks = []
        for b in range(batch):
            for g in range(groups):
                reads = [region(part, (b, b + 1), (g, g + 1), (0, splits), (0, qpk), (0, hd)),
                         region(lse, (b, b + 1), (g, g + 1), (0, splits), (0, qpk))]
                writes = [region(out, (b, b + 1), (g * qpk * hd, (g + 1) * qpk * hd))]
                nb = sum(nbytes(prog, r) for r in reads + writes)
                tasks.append(TileTask((b, g), reads, writes, nb, 3 * splits * qpk * hd))
        return tasks

    def run(self, op, tile, reads, writes, step):
        part, lse = reads[0][0, 0], reads[1][0, 0]  # [splits, qpk, hd], [splits, qpk]
        weights = torch.softmax(lse, dim=0)  # empty splits (-inf) get weight 0
        merged = (weights.unsqueeze(-1) * part).sum(0)
        writes[0].copy_(merged.reshape(writes[0].shape))
