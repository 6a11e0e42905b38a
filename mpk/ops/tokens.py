"""The ends of a step: token -> embedding row, and argmax candidates -> the next step's token."""

from __future__ import annotations

import torch

from mpk.ops.base import OpKind, TileTask, nbytes, region, whole


class Embed(OpKind):
    """x[b] = table[tokens[b]]; one task per sequence. Reads the token the previous step sampled."""

    def tiles(self, op, prog):
        tokens, table, out = op.inputs["tokens"], op.inputs["table"], op.outputs["out"]
        batch, hidden = prog.tensor(out).shape
        tasks = []
        for b in range(batch):
            reads = [region(tokens, (b, b + 1)), whole(prog, table)]
            writes = [region(out, (b, b + 1), (0, hidden))]
            tasks.append(TileTask((b,), reads, writes, 8 + 2 * nbytes(prog, writes[0]), 0))
        return tasks

    def run(self, op, tile, reads, writes, step):
        token, table = reads
        writes[0].copy_(table[token])


class Sample(OpKind):
    """Greedy sampling for sequence b: the best candidate over all vocab tiles of all ranks.

    While sequence b is still inside its prompt, the next token is the prompt's instead, so
    prompts run through the same decode step one token at a time.
    """

    def tiles(self, op, prog):
        tokens = op.outputs["tokens"]
        batch = prog.tensor(tokens).shape[0]
        tasks = []
        for b in range(batch):
            reads = []
            for k in range(op.params["ranks"]):
                for role in ("cand_val", "cand_idx"):
                    name = op.inputs[f"{role}{k}"]
                    reads.append(region(name, (b, b + 1), (0, prog.tensor(name).shape[1])))
            reads += [region(op.inputs["prompt"], (b, b + 1), (0, prog.max_seq_len)),
                      region(op.inputs["prompt_len"], (b, b + 1))]
            writes = [region(tokens, (b, b + 1))]
            tasks.append(TileTask((b,), reads, writes, sum(nbytes(prog, r) for r in reads[:-2]) + 24, 0))
        return tasks

    def run(self, op, tile, reads, writes, step):
        *cands, prompt, prompt_len = reads
        if step + 1 < int(prompt_len[0]):
            writes[0].copy_(prompt[0, step + 1])
            return
        vals = torch.cat([v[0] for v in cands[0::2]])
        idxs = torch.cat([i[0] for i in cands[1::2]])
        best = vals.max()
        writes[0].fill_(int(idxs[vals == best].min()))  # ties go to the lowest token id, like argmax
