"""Prefill: a prompt's first tokens through the model a chunk at a time, filling the KV cache for decode.

A prefill program processes positions [start, start + rows) of every sequence of a batch together
(chunks after the first attend to the positions earlier chunks cached): the
embedding of batch x rows tokens, then per layer the QKV projection over all rows, causal attention
that also writes the K/V rows into the cache (`mpk.ops.prefill`), the O projection and the MLP,
each a matrix product tiled by output columns like the decode ops (which take any number of rows).
The last layer stops after its attention: only its K/V rows are needed. It has the decode
program's weights and KV cache tensors, by name and shape, so it runs on the decode executor's
buffers, and the next chunk or decode continues at position start + rows.

Prompts of different lengths share a batch: prefill covers the positions before the shortest
prompt's last token, and decode steps through the rest of each prompt as it always does (its
sample op forwards prompt tokens). Runs on the CPU executor; the GPU has no prefill kernels yet.
"""

from __future__ import annotations

from functools import partial

import torch

from mpk import defaults
from mpk.compiler import compile_program
from mpk.errors import MpkError
from mpk.graph import (DEFAULT_ACTIVATIONS, DEFAULT_KV_CACHE, EMBED, ROPE, Program, declare_layer, mlp_block,
                       precision_of, qkv_tile, rank_name, row_parallel_linear, shard_of)
from mpk.taskgraph import TaskGraph

PREFILL_TOKENS = "prefill_tokens"  # meta [batch * rows] int64: the prompt tokens of the chunk's positions
DEFAULT_CHUNK = 256  # positions per prefill graph; longer prompts take several, one after another


def build_prefill_program(cfg, batch: int, rows: int, max_seq_len: int, tp_size: int = 1,
                          num_sms: int = defaults.NUM_SMS, activations: str = DEFAULT_ACTIVATIONS,
                          weights: str = "bfloat16", kv_cache: str = DEFAULT_KV_CACHE, start: int = 0) -> Program:
    """Positions [start, start + rows) of `batch` sequences (earlier chunks cached [0, start)), for a
    decode program of the same arguments."""
    if rows < 1 or start < 0 or start + rows >= max_seq_len:
        raise MpkError(f"a prefill of positions {start}..{start + rows - 1} does not fit a context of {max_seq_len} "
                       "(decode needs the last position)")
    prog = Program(cfg, batch, max_seq_len, tp_size, num_sms, precision_of(weights, activations, kv_cache))
    shards = [shard_of(cfg, r, tp_size) for r in range(tp_size)]
    for r, sh in enumerate(shards):
        _declare(prog, r, sh, batch * rows)
    for r in range(tp_size):
        prog.add_op(r, "embed", "embed", None, {"tokens": rank_name(prog, r, PREFILL_TOKENS), "table": rank_name(prog, r, EMBED)},
                    {"out": rank_name(prog, r, "x.0")})
    for layer in range(cfg.num_layers):
        _attention(prog, layer, shards, rows, start)
        if layer < cfg.num_layers - 1:  # the last layer's output feeds no K/V row
            p = f"layers.{layer}."
            row_parallel_linear(prog, layer, "o", p + "attn", f"x.{2 * layer}", f"x.{2 * layer + 1}")
            mlp_block(prog, layer, shards)
    return prog


def _declare(prog: Program, r: int, sh, n_rows: int) -> None:
    """The decode program's weights and caches (same names and shapes), and activations of n_rows rows."""
    cfg = prog.cfg
    prog.add_tensor(r, PREFILL_TOKENS, "meta", (n_rows,), "int64")
    prog.add_tensor(r, EMBED, "weight", (cfg.vocab_size, cfg.hidden_size), prog.precision.weights)
    prog.add_tensor(r, ROPE, "weight", (prog.max_seq_len, cfg.head_dim), "float32")
    prog.add_tensor(r, "x.0", "activation", (n_rows, cfg.hidden_size), prog.precision.activations)
    for layer in range(cfg.num_layers):
        declare_layer(prog, r, sh, layer, n_rows, mlp=layer < cfg.num_layers - 1)


def _attention(prog: Program, layer: int, shards, rows: int, start: int) -> None:
    cfg = prog.cfg
    p = f"layers.{layer}."
    for r, sh in enumerate(shards):
        n = partial(rank_name, prog, r)
        inputs = {"x": n(f"x.{2 * layer}"), "norm": n(p + "attn_norm"), "weight": n(p + "qkv")}
        if cfg.qkv_bias:
            inputs["bias"] = n(p + "qkv_bias")
        prog.add_op(r, "rmsnorm_linear", p + "qkv", layer, inputs, {"out": n(p + "qkv_out")},
                    tile=qkv_tile(cfg, sh, prog.num_sms), eps=cfg.rms_norm_eps)
        norms = {role: n(p + role) for role in ("q_norm", "k_norm")} if cfg.qk_norm else {}
        past = {"k_past": n(p + "k_cache"), "v_past": n(p + "v_cache")} if start else {}
        prog.add_op(r, "prefill_attention", p + "attention", layer,
                    {"qkv": n(p + "qkv_out"), "rope": n(ROPE), **norms, **past},
                    {"out": n(p + "attn"), "k_cache": n(p + "k_cache"), "v_cache": n(p + "v_cache")},
                    rows=rows, start=start, q_per_kv=cfg.q_per_kv, head_dim=cfg.head_dim, eps=cfg.rms_norm_eps,
                    scale=cfg.head_dim ** -0.5, window=cfg.sliding_window)


def prefill_rows(prompts: list[list[int]]) -> int:
    """Positions every prompt has before its last token: what prefill can take (0: nothing to do)."""
    return min(len(p) for p in prompts) - 1


def chunks(positions: int, chunk: int = DEFAULT_CHUNK) -> list[tuple[int, int]]:
    """(start, rows) of the prefill chunks covering positions [0, positions): whole chunks of
    `chunk` positions, then the rest in decreasing powers of two, so any prompt length reuses a
    few compiled graphs."""
    out, start = [], 0
    while positions - start >= chunk:
        out.append((start, chunk))
        start += chunk
    for bit in reversed(range((positions - start).bit_length())):
        if (positions - start) >> bit & 1:
            out.append((start, 1 << bit))
            start += 1 << bit
    return out


def compile_prefill(decode: TaskGraph, cfg, rows: int, verify: bool = True, start: int = 0) -> TaskGraph:
    """The verified prefill TaskGraph of positions [start, start + rows) matching a compiled decode
    graph (its batch, context, ranks, SMs and precisions)."""
    pr = decode.precision
    prog = build_prefill_program(cfg, decode.batch, rows, decode.max_seq_len, decode.tp_size, decode.num_sms,
                                 "float32" if pr.activations == "float32" else "model", pr.weights,
                                 "float32" if pr.kv_cache == "float32" else "model", start)
    tg = compile_program(prog)
    if verify:
        from mpk.compiler.verify import verify as run_verifier

        tg.stats["verify"] = run_verifier(tg).as_dict()
    return tg


def run_prefill(tg: TaskGraph, decode_buffers: dict[str, torch.Tensor], prompts: list[list[int]], seed: int = 0) -> None:
    """Run a prefill graph on the CPU executor over the decode executor's buffers (the weights and
    the KV cache it fills are shared; its own activations are new)."""
    from mpk.execution import allocate
    from mpk.graph import tensor_name
    from mpk.sim import run

    attention = next(op for op in tg.ops if op.kind == "prefill_attention")
    start, rows = attention.params["start"], attention.params["rows"]
    if min(len(p) for p in prompts) <= start + rows:
        raise MpkError(f"a prefill of positions {start}..{start + rows - 1} needs prompts of at least "
                       f"{start + rows + 1} tokens")
    tokens = torch.tensor([t for p in prompts for t in p[start:start + rows]], dtype=torch.int64)
    meta = {tensor_name(r, tg.tp_size, PREFILL_TOKENS): tokens for r in range(tg.tp_size)}
    shared = {name: buf for name, buf in decode_buffers.items() if name in tg.tensors and tg.tensors[name].kind
              in ("weight", "state")}
    for name, buf in shared.items():
        if tuple(buf.shape) != tg.tensors[name].shape:
            raise MpkError(f"the prefill graph's {name} is {tg.tensors[name].shape}, the decode buffer {tuple(buf.shape)}")
    own = {name: spec for name, spec in tg.tensors.items() if name not in shared}
    bufs = allocate(_only(tg, own), {}, meta)
    bufs.update(shared)
    run(tg, bufs, 1, lambda step, b: False, seed, 0)


def _only(tg: TaskGraph, tensors: dict) -> TaskGraph:
    """`tg` restricted to some tensors, for allocating just those."""
    from dataclasses import replace

    return replace(tg, tensors=tensors)
