"""Prefill: a prompt's first tokens through the model a chunk at a time, filling the KV cache for decode.

A prefill program processes positions [start, start + rows) of every sequence of a batch together
(chunks after the first attend to the positions earlier chunks cached): the
embedding of batch x rows tokens, then per layer the QKV projection over all rows, causal attention
that also writes the K/V rows into the cache (`mpk.ops.prefill`), the O projection and the MLP:
the decode ops' matrix products, tiled as GEMMs (blocks of rows x weight rows, `Gemv.tile_as_gemm`).
The last layer stops after its attention: only its K/V rows are needed. It has the decode
program's weights and KV cache tensors, by name and shape, so it runs on the decode executor's
buffers, and the next chunk or decode continues at position start + rows. A prefill graph runs
one step per launch (`TaskGraph.one_step`).

It runs three ways over the same ops:
- as a verified TaskGraph on the CPU executor, task by task (`compile_prefill`, `run_prefill`);
- as the same TaskGraph on the GPU's persistent runtime, one megakernel launch per chunk
  (`prefill_graphs`: tensor-core GEMM tiles and flash-attention tiles);
- op by op, each op whole in one PyTorch call (`run_prefill_ops`, `OpKind.run_whole`), on the
  device of the buffers: on the GPU over the megakernel's own buffers, with cuBLAS GEMMs on bf16
  inputs and fused (flash) attention in its fast mode (`prefill_ops`). The exact mode computes what
  the tasks compute. This is how the GPU prefills: measured 3x faster than the task graphs today
  (docs/decisions.md, "Prefill").

Prompts of different lengths share a batch: prefill covers the positions before the shortest
prompt's last token, and decode steps through the rest of each prompt as it always does (its
sample op forwards prompt tokens). Continuous batching prefills one prompt at a time into its own
slot of a running batch (`prefill_slot`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import torch

from mpk import defaults
from mpk.compiler import compile_program
from mpk.dtypes import torch_dtype
from mpk.errors import MpkError
from mpk.execution import INT_POISON, allocate
from mpk.graph import (DEFAULT_ACTIVATIONS, DEFAULT_KV_CACHE, EMBED, ROPE, Program, declare_layer, mlp_block,
                       precision_of, qkv_tile, rank_name, row_parallel_linear, shard_of, tensor_name)
from mpk.ops import OP_KINDS
from mpk.ops.linear import Gemv
from mpk.paging import gather, physical_rows, scatter
from mpk.taskgraph import TaskGraph, TensorSpec
from mpk.util import cdiv

PREFILL_TOKENS = "prefill_tokens"  # meta [batch * rows] int64: the prompt tokens of the chunk's positions
DEFAULT_CHUNK = 256  # positions per prefill graph; longer prompts take several, one after another
# Rows (sequences x positions) of one op-by-op chunk. Every chunk reads all the weights once and a
# chunk from position 0 attends with flash attention, so fewer, larger chunks are faster. The cap
# bounds what is live at once (at the MLP about 8192 x (5 intermediate + 4 hidden) floats: 2.5 GB
# on an 8B model) and still takes 8 prompts of 1024 tokens, or one of 8192, in one chunk.
OP_CHUNK_ROWS = defaults.PREFILL_CHUNK_ROWS
PROGRAMS_KEPT = 64  # op-by-op programs `prefill_ops` keeps (one per prompt length, in a server)
KERNELS_KEPT = 2  # prefill megakernels `prefill_graphs` keeps (each holds its chunk's activations)


def build_prefill_program(cfg, batch: int, rows: int, max_seq_len: int, tp_size: int = 1,
                          num_sms: int = defaults.NUM_SMS, activations: str = DEFAULT_ACTIVATIONS,
                          weights: str = "bfloat16", kv_cache: str = DEFAULT_KV_CACHE, start: int = 0) -> Program:
    """Positions [start, start + rows) of `batch` sequences (earlier chunks cached [0, start)), for a
    decode program of the same arguments."""
    if rows < 1 or start < 0 or start + rows >= max_seq_len:
        raise MpkError(f"a prefill of positions {start}..{start + rows - 1} does not fit a context of {max_seq_len} "
                       "(decode needs the last position)")
    prog = Program(cfg, batch, max_seq_len, tp_size, num_sms, precision_of(weights, activations, kv_cache),
                   one_step=True)
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
    for op in prog.ops:  # the decode ops' column tiles suit 1-8 rows; a chunk's rows make them GEMMs
        if isinstance(OP_KINDS[op.kind], Gemv):
            OP_KINDS[op.kind].tile_as_gemm(op)
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


def prefill_program(decode: TaskGraph, cfg, rows: int, start: int = 0, batch: int | None = None) -> Program:
    """The prefill program of positions [start, start + rows) matching a compiled decode graph (its
    batch unless `batch` says otherwise, context, ranks, SMs and precisions)."""
    pr = decode.precision
    return build_prefill_program(cfg, batch or decode.batch, rows, decode.max_seq_len, decode.tp_size, decode.num_sms,
                                 "float32" if pr.activations == "float32" else "model", pr.weights,
                                 "float32" if pr.kv_cache == "float32" else "model", start)


def compile_prefill(decode: TaskGraph, cfg, rows: int, verify: bool = True, start: int = 0,
                    batch: int | None = None) -> TaskGraph:
    """The verified prefill TaskGraph of `prefill_program`."""
    tg = compile_program(prefill_program(decode, cfg, rows, start, batch))
    if verify:
        from mpk.compiler.verify import verify as run_verifier

        tg.stats["verify"] = run_verifier(tg).as_dict()
    return tg


def run_prefill(tg: TaskGraph, decode_buffers: dict[str, torch.Tensor], prompts: list[list[int]], seed: int = 0,
                kv_table: torch.Tensor | None = None) -> None:
    """Run a prefill graph on the CPU executor over the decode executor's buffers (the weights and
    the KV cache it fills are shared; its own activations are new). `kv_table`: the block table of a
    paged cache (`mpk.paging`)."""
    from mpk.sim import run

    start, rows = chunk_of(tg)
    bufs = _graph_buffers(tg, decode_buffers, _chunk_tokens(prompts, start, rows), paged=kv_table is not None)
    run(tg, bufs, 1, lambda step, b: False, seed, 0, kv_table=kv_table)


def _graph_buffers(tg: TaskGraph, decode_buffers: dict[str, torch.Tensor], tokens: torch.Tensor,
                   paged: bool = False) -> dict[str, torch.Tensor]:
    """Buffers for a prefill graph: the decode buffers' weights and KV cache, and activations and
    the chunk's tokens of its own, each on its rank's device."""
    shared = _shared(tg, decode_buffers, paged)
    devices = _devices(tg, decode_buffers)
    meta = {tensor_name(r, tg.tp_size, PREFILL_TOKENS): tokens for r in range(tg.tp_size)}
    own = {name: spec for name, spec in tg.tensors.items() if name not in shared}
    bufs = allocate(replace(tg, tensors=own), {}, meta, devices)
    bufs.update(shared)
    return bufs


def prefill_graphs(executor, cfg, prompts: list[list[int]], kernels: dict, chunk_rows: int = OP_CHUNK_ROWS) -> int:
    """Prefill on the persistent runtime: each of the `op_chunks` is a verified prefill TaskGraph
    run as one launch of its own megakernel (GEMM tiles on tensor cores, causal attention tiles)
    over the decode megakernel's weights and KV cache. Sets each sequence's next token and returns
    the decode step that continues after the prefill, as `prefill_ops` does. `kernels` keeps the
    chunks' megakernels by (start, rows) from one call to the next (compiling a graph of a long
    chunk takes tens of seconds; each holds its chunk's activations on the GPU)."""
    from mpk.runtime import Megakernel

    done = 0
    for start, rows in op_chunks(prefill_rows(prompts), executor.tg.batch, chunk_rows):
        tokens = _chunk_tokens(prompts, start, rows)

        def make():
            tg = compile_prefill(executor.tg, cfg, rows, start=start)
            _check_activations_fit(tg, executor.devices)
            return Megakernel(tg, devices=executor.devices, kv_pages=executor.kv_pages,
                              buffers=_graph_buffers(tg, executor.buffers, tokens, executor.kv_pages is not None))

        mk = keep(kernels, (start, rows), make, KERNELS_KEPT, on_drop=lambda old: old.close())
        if mk.kv_pages is not None:
            mk.set_kv_table(executor.kv_table)
        for r in range(mk.tg.tp_size):
            mk.buffers[tensor_name(r, mk.tg.tp_size, PREFILL_TOKENS)].copy_(tokens)
        mk.run(1)
        done = start + rows
    if done:
        executor.set_tokens([p[done] for p in prompts])
    return done


def run_prefill_ops(prog: Program | TaskGraph, decode_buffers: dict[str, torch.Tensor], prompts: list[list[int]],
                    fast: bool = False, kv_table: torch.Tensor | None = None) -> None:
    """Run a prefill program op by op in program order (every op reads only what earlier ops
    wrote), each op whole (`OpKind.run_whole`), over the decode buffers on their devices (a rank's
    ops on its GPU). Activations are made when first written and dropped after their last use;
    the exact mode poisons them first (NaN), so an op that leaves part of its output unwritten shows.
    `fast`: bf16 GEMM inputs with float32 accumulation and fused attention. With `kv_table` (a
    paged cache) the ops see the sequences' rows [0, start + rows) gathered from the pools, and the
    chunk's rows go back to their blocks at the end."""
    start, rows = chunk_of(prog)
    tokens = _chunk_tokens(prompts, start, rows)
    devices = _devices(prog, decode_buffers)
    index = pool_rows(prog, decode_buffers, kv_table) if kv_table is not None else None
    run_ops(prog, decode_buffers, [tokens.to(d) for d in devices], fast, index)


def pool_rows(prog: Program | TaskGraph, decode_buffers: dict[str, torch.Tensor],
              kv_table: torch.Tensor) -> dict[tuple, torch.Tensor]:
    """The flat pool rows (`physical_rows`) of the rows [0, start + rows) of every sequence of a
    prefill chunk, by (device, block rows) of the pools holding them: one table lookup serves every
    cache tensor."""
    start, rows = chunk_of(prog)
    index = {}
    for name, buf in decode_buffers.items():
        if name in prog.tensors and prog.tensors[name].kind == "state":
            key = (buf.device, buf.shape[1])
            if key not in index:
                index[key] = physical_rows(kv_table, buf.shape[1], range(prog.batch), range(start + rows), buf.device)
    return index


def run_ops(prog: Program | TaskGraph, decode_buffers: dict[str, torch.Tensor], tokens: list[torch.Tensor],
            fast: bool, index: dict[tuple, torch.Tensor] | None) -> None:
    """The device work of `run_prefill_ops`, with no host work between its kernels (so a CUDA graph
    can capture it): each rank's chunk tokens on its device, and with a paged cache the `pool_rows`
    of the chunk."""
    start, rows = chunk_of(prog)
    bufs = _shared(prog, decode_buffers, paged=index is not None)

    def rows_of(name: str, r0: int, r1: int):
        """The logical box of rows [r0, r1) of every sequence of a cache tensor."""
        _, _, groups, hd = prog.tensors[name].shape
        return (0, prog.batch), (r0, r1), (0, groups), (0, hd)

    pools = {}  # a paged cache tensor's pool; the ops get the rows [0, start + rows) gathered
    if index is not None:
        for name in [n for n in bufs if prog.tensors[n].kind == "state"]:
            pool = pools[name] = bufs[name]
            bufs[name] = gather(pool, None, rows_of(name, 0, start + rows), index[pool.device, pool.shape[1]])
    devices = _devices(prog, decode_buffers)
    for r in range(prog.tp_size):
        bufs[tensor_name(r, prog.tp_size, PREFILL_TOKENS)] = tokens[r]
    last_use = {name: i for i, op in enumerate(prog.ops) for name in _bound(op).values()}
    with torch.no_grad():
        for i, op in enumerate(prog.ops):
            for name in op.outputs.values():
                if name not in bufs:
                    spec = prog.tensors[name]
                    bufs[name] = _activation(spec, devices[spec.rank], poison=not fast)
            OP_KINDS[op.kind].run_whole(op, {role: bufs[name] for role, name in _bound(op).items()}, start, fast)
            for name in _bound(op).values():
                if last_use[name] == i and prog.tensors[name].kind == "activation":
                    del bufs[name]
        for name, pool in pools.items():
            scatter(pool, None, rows_of(name, start, start + rows), bufs[name][:, start:start + rows],
                    index[pool.device, pool.shape[1]][:, start:])


def prefill_ops(executor, cfg, prompts: list[list[int]], fast: bool = True, chunk_rows: int = OP_CHUNK_ROWS,
                programs: dict | None = None) -> int:
    """Prefill, op by op, the positions every prompt has before its last token over an executor's
    buffers (the megakernel's on the GPU), in `op_chunks`; set each sequence's next token; return
    the decode step that continues after them (0: nothing to prefill). `programs` keeps the latest
    chunks' programs by (start, rows) from one call to the next (building one takes milliseconds)."""
    programs = {} if programs is None else programs
    done = 0
    for start, rows in op_chunks(prefill_rows(prompts), executor.tg.batch, chunk_rows):
        prog = keep(programs, (start, rows), partial(prefill_program, executor.tg, cfg, rows, start), PROGRAMS_KEPT)
        run_prefill_ops(prog, executor.buffers, prompts, fast, executor.kv_table)
        done = start + rows
    if done:
        executor.set_tokens([p[done] for p in prompts])
        _wait_for(executor)
    return done


def prefill_slot(executor, cfg, prompt: list[int], slot: int, programs: dict, fast: bool = True,
                 cached: int = 0, limit: int | None = None, replays=None) -> int:
    """Prefill one prompt into one sequence slot of a running batch (`mpk.batching`): the positions
    before its last token, into that slot's rows of the KV cache, leaving the other slots alone.
    On the GPU op by op in PyTorch (`run_prefill_ops`); on the CPU executor as the verified task
    graphs `LLM.generate` runs for one prompt, so a request gets the same tokens either way.
    `programs` caches the programs or graphs by (start, rows). The first `cached` rows are in the
    cache already (a shared prefix, or earlier chunks: `mpk.batching`); at most `limit` more are
    filled. With `replays` (`mpk.prefill_replay.PrefillReplays`) a fast prefill into a paged cache on
    one GPU replays each chunk as a CUDA graph. Returns the positions filled, `cached` included."""
    if len(prompt) < 2:
        return 0
    if not 0 <= cached <= len(prompt) - 1:
        raise MpkError(f"{cached} cached rows of a {len(prompt)}-token prompt; at most {len(prompt) - 1} can be")
    positions = len(prompt) - 1 if limit is None else min(len(prompt) - 1, cached + limit)
    tg = executor.tg
    paged = executor.kv_table is not None
    # The slot alone: its rows of the KV cache (of a paged cache: its row of the block table).
    table = executor.kv_table[slot:slot + 1] if paged else None
    views = {name: buf[slot:slot + 1] if tg.tensors[name].kind == "state" and not paged else buf
             for name, buf in executor.buffers.items()}
    on_gpu = views[tensor_name(0, tg.tp_size, EMBED)].device.type == "cuda"
    pieces = op_chunks(positions - cached, 1) if on_gpu else chunks(positions - cached)
    replay = False
    if replays is not None:
        from mpk.prefill_replay import replayable

        replay = fast and on_gpu and replayable(executor)
    for start, rows in [(cached + s, r) for s, r in pieces]:
        if replay and replays.run(executor, cfg, prompt, start, rows, table):
            continue
        if replays is not None:
            replays.eager += 1
        make = partial(prefill_program, tg, cfg, rows, start, batch=1) if on_gpu else \
            partial(compile_prefill, tg, cfg, rows, start=start, batch=1)
        graph = keep(programs, (start, rows), make, PROGRAMS_KEPT)
        if on_gpu:
            run_prefill_ops(graph, views, [prompt], fast, table)
        else:
            run_prefill(graph, views, [prompt], kv_table=table)
    _wait_for(executor)
    return positions


def keep(store: dict, key, make, limit: int, on_drop=None):
    """store[key], made by `make()` on first use; the first entries go (to `on_drop`) so that at
    most `limit` stay."""
    if key not in store:
        while len(store) >= limit:
            old = store.pop(next(iter(store)))
            if on_drop is not None:
                on_drop(old)
        store[key] = make()
    return store[key]


def _check_activations_fit(tg: TaskGraph, devices) -> None:
    """A prefill graph holds every layer's activations of its chunk at once (each a tensor of its
    own): refuse in one line, before allocating, a chunk whose activations do not fit."""
    from mpk.memory import available_gpu_bytes, gib

    for r, device in enumerate(devices):
        need = sum(math.prod(spec.shape) * torch_dtype(spec.dtype).itemsize for spec in tg.tensors.values()
                   if spec.rank == r and spec.kind in ("activation", "meta"))
        free = available_gpu_bytes(device)
        if need > free:
            raise MpkError(f"the prefill graph of {chunk_of(tg)[1]} positions x {tg.batch} sequences needs "
                           f"{gib(need)} of activations on {device} and {gib(free)} is free; use a smaller "
                           "chunk_rows")


def _wait_for(executor) -> None:
    """Let the GPUs finish the prefill: the megakernel's watchdog counts from its launch, and prefill
    ops still queued ahead of it on the stream would look like a stall."""
    for device in _devices(executor.tg, executor.buffers):
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _devices(prog: Program | TaskGraph, buffers: dict[str, torch.Tensor]) -> list[torch.device]:
    """Each rank's device, where `buffers` hold its weights."""
    return [buffers[tensor_name(r, prog.tp_size, EMBED)].device for r in range(prog.tp_size)]


def op_chunks(positions: int, batch: int, chunk_rows: int = OP_CHUNK_ROWS) -> list[tuple[int, int]]:
    """(start, rows) of the op-by-op chunks covering positions [0, positions): as few as keep
    batch x rows within `chunk_rows`, of equal length but the last."""
    if positions < 1:
        return []
    n = cdiv(positions, max(1, chunk_rows // batch))
    size = cdiv(positions, n)
    return [(start, min(size, positions - start)) for start in range(0, positions, size)]


def chunk_of(prog: Program | TaskGraph) -> tuple[int, int]:
    """(start, rows) of a prefill program or graph."""
    attention = next(op for op in prog.ops if op.kind == "prefill_attention")
    return attention.params["start"], attention.params["rows"]


def _chunk_tokens(prompts: list[list[int]], start: int, rows: int) -> torch.Tensor:
    if min(len(p) for p in prompts) <= start + rows:
        raise MpkError(f"a prefill of positions {start}..{start + rows - 1} needs prompts of at least "
                       f"{start + rows + 1} tokens")
    return torch.tensor([t for p in prompts for t in p[start:start + rows]], dtype=torch.int64)


def _shared(prog: Program | TaskGraph, decode_buffers: dict[str, torch.Tensor],
            paged: bool = False) -> dict[str, torch.Tensor]:
    """The decode buffers the prefill shares: the weights and the KV cache (block pools when
    `paged`), checked against its shapes."""
    shared = {name: buf for name, buf in decode_buffers.items() if name in prog.tensors and prog.tensors[name].kind
              in ("weight", "state")}
    for name, buf in shared.items():
        spec = prog.tensors[name]
        if paged and spec.kind == "state":
            if tuple(buf.shape[2:]) != spec.shape[2:]:
                raise MpkError(f"the prefill graph's {name} has rows of {spec.shape[2:]}, the decode pool "
                               f"{tuple(buf.shape[2:])}")
        elif tuple(buf.shape) != spec.shape:
            raise MpkError(f"the prefill graph's {name} is {prog.tensors[name].shape}, the decode buffer "
                           f"{tuple(buf.shape)}")
    return shared


def _bound(op) -> dict[str, str]:
    return {**op.inputs, **op.outputs}


def _activation(spec: TensorSpec, device, poison: bool) -> torch.Tensor:
    dt = torch_dtype(spec.dtype)
    if not poison:
        return torch.empty(spec.shape, dtype=dt, device=device)
    return torch.full(spec.shape, INT_POISON if dt == torch.int64 else float("nan"), dtype=dt, device=device)
