"""The ends of a step: token -> embedding row, and logits (or their argmax candidates) -> the next step's token.

CUDA templates: mpk/csrc/tokens.cuh.
"""

from __future__ import annotations

import torch

from mpk import sampling
from mpk.errors import MpkError
from mpk.ops.base import Cuda, OpKind, Operand, TileTask, activation_policy, box, expect, nbytes, shape, whole
from mpk.util import cdiv


class Embed(OpKind):
    """x[b] = table[tokens[b]]; one task per sequence. Reads the token the previous step sampled."""

    kind = "embed"
    header = "tokens.cuh"
    template = "Embed"
    inputs = (Operand("tokens"), Operand("table"))
    outputs = (Operand("out"),)

    def tiles(self, op, prog):
        batch, hidden = shape(op, prog, "out")
        tasks = []
        for b in range(batch):
            reads = [box(op, "tokens", (b, b + 1)), whole(op, prog, "table")]
            writes = [box(op, "out", (b, b + 1), (0, hidden))]
            tasks.append(TileTask((b,), reads, writes, 8 + 2 * nbytes(prog, writes[0]), 0))
        return tasks

    def run(self, op, tile, t, step):
        t["out"].copy_(t["table"][t["tokens"]])

    def run_whole(self, op, t, step, fast=False):
        self.run(op, None, t, step)

    def cuda(self, op, tg):
        vocab, hidden = tg.tensors[op.inputs["table"]].shape
        expect(tg.tensors[op.inputs["table"]].dtype == "bfloat16", op, "the embedding table must be bfloat16")
        return Cuda((hidden, activation_policy(tg)), {"vocab": vocab})


class Sample(OpKind):
    """The next token of sequence b, from the logits of all vocab tiles of all ranks.

    Greedy (temperature 0): the best of the LM head tiles' argmax candidates. Otherwise a draw
    from the whole logits row under the sequence's temperature, top-k and top-p, by its seed and
    the position (`mpk.sampling`). While sequence b is still inside its prompt, the next token is
    the prompt's instead, so prompts run through the same decode step one token at a time.
    """

    kind = "sample"
    per_sequence = True
    header = "tokens.cuh"
    template = "Sample"
    inputs = (Operand("cand_val", per_rank=True), Operand("cand_idx", per_rank=True), Operand("logits", per_rank=True),
              Operand("prompt"), Operand("prompt_len"), Operand("sample_floats"), Operand("sample_ints"))
    outputs = (Operand("tokens"),)

    def tiles(self, op, prog):
        batch = shape(op, prog, "tokens")[0]
        ranks = range(op.params["ranks"])
        tasks = []
        for b in range(batch):
            reads = [box(op, f"{role}{k}", (b, b + 1), (0, shape(op, prog, f"{role}{k}")[1]))
                     for k in ranks for role in ("cand_val", "cand_idx")]
            cand_bytes = sum(nbytes(prog, r) for r in reads)
            # The cost counts the greedy path (candidates only); a sampled row reads its logits too.
            reads += [box(op, f"logits{k}", (b, b + 1), (0, shape(op, prog, f"logits{k}")[1])) for k in ranks]
            reads += [box(op, "prompt", (b, b + 1), (0, prog.max_seq_len))]
            reads += [box(op, "prompt_len", (b, b + 1)), box(op, "sample_floats", (b, b + 1), (0, 2)),
                      box(op, "sample_ints", (b, b + 1), (0, 2))]
            writes = [box(op, "tokens", (b, b + 1))]
            tasks.append(TileTask((b,), reads, writes, cand_bytes + 24, 0))
        return tasks

    def run(self, op, tile, t, step):
        if step + 1 < int(t["prompt_len"][0]):
            t["tokens"].copy_(t["prompt"][0, step + 1])
            return
        ranks = range(op.params["ranks"])
        vals = torch.cat([t[f"cand_val{k}"][0] for k in ranks])
        if not bool(torch.isfinite(vals).all()):
            raise MpkError(f"the logits of sequence {tile[0]} are not finite at position {step} (the model overflowed "
                           "in its activation precision); try --activations float32")
        (temperature, top_p), (top_k, seed) = t["sample_floats"][0].tolist(), t["sample_ints"][0].tolist()
        if temperature > 0:
            logits = torch.cat([t[f"logits{k}"][0] for k in ranks])
            t["tokens"].fill_(sampling.sample(logits, temperature, top_k, top_p, seed, step + 1))
            return
        idxs = torch.cat([t[f"cand_idx{k}"][0] for k in ranks])
        best = vals.max()
        t["tokens"].fill_(int(idxs[vals == best].min()))  # ties go to the lowest token id, like argmax

    def cuda(self, op, tg):
        ranks = op.params["ranks"]
        n_tiles = tg.tensors[op.inputs["cand_val0"]].shape[1]
        expect(all(tg.tensors[op.inputs[f"cand_val{k}"]].shape[1] == n_tiles for k in range(ranks)), op,
               "every rank's LM head has the same number of vocab tiles")
        vocab = sum(tg.tensors[op.inputs[f"logits{k}"]].shape[1] for k in range(ranks))
        per_rank = cdiv(vocab, ranks)
        expect(all(tg.tensors[op.inputs[f"logits{k}"]].shape[1] == max(0, min(vocab, (k + 1) * per_rank) - k * per_rank)
                   for k in range(ranks)), op, "the vocabulary is split over the ranks as mpk.graph.shard_of splits it")
        return Cuda((ranks,), {"n_tiles": n_tiles, "seq": tg.tensors[op.inputs["prompt"]].shape[1], "vocab": vocab})
