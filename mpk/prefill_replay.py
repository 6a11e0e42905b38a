"""A served prompt's prefill chunks replayed as CUDA graphs.

A GPU prefill pass (`mpk.prefill.run_ops`) is about 2,000 PyTorch kernels, and launching them one by
one from Python takes longer than they run: on an H200, 55 ms of host time for a 1-row chunk of
qwen3-8b, against 22 ms of GPU time for 511 rows (docs/perf.md). A server prefills one slot at a
time (`mpk.prefill.prefill_slot`), so here a chunk shape met twice is captured as a CUDA graph over
the decode buffers and then replayed: one launch per chunk.

Shapes repeat because a chunk is padded to a multiple of REPLAY_ROWS rows (within the context). The
padding positions follow the prompt: their K/V rows land after its last prefilled row, in the slot's
own blocks or the scratch block, where the slot's decode steps write those positions before any step
reads them (a step attends to positions up to its own); the prompt's rows never see them (causal).
The tokens and the chunk's pool rows (`mpk.prefill.pool_rows`) are copied into the graph's static
inputs before each replay. Every replay's activations live in one memory pool: the graphs never run
at the same time, and nothing they allocate outlives a replay.
"""

from __future__ import annotations

import sys

import torch

from mpk.prefill import keep, pool_rows, prefill_program, run_ops
from mpk.util import cdiv

REPLAY_ROWS = 64  # a replayed chunk's rows are a multiple of this (its last row within the context)
# Captured chunk shapes an executor keeps, the least recently replayed going first: more than the
# whole-prompt shapes of a 2048-row budget (32) with room for continuations. A graph costs little
# beside the pool all of them share.
REPLAYS_KEPT = 64
SEEN_KEPT = 4 * REPLAYS_KEPT  # shapes met once, remembered until their second coming


def replay_rows(start: int, rows: int, max_seq_len: int) -> int:
    """The rows a chunk of `rows` positions from `start` is replayed as: padded to REPLAY_ROWS, its
    last position before the context's last (which only decode writes)."""
    return min(cdiv(rows, REPLAY_ROWS) * REPLAY_ROWS, max_seq_len - 1 - start)


def replayable(executor) -> bool:
    """Whether prefill chunks of `executor` replay as CUDA graphs: a paged cache on one GPU."""
    return (executor.tg.tp_size == 1 and executor.kv_table is not None
            and all(buf.is_cuda for buf in executor.buffers.values()))


class ChunkGraph:
    """Positions [start, start + rows) of one sequence slot captured as a CUDA graph over an
    executor's buffers; `run` replays it for some slot's tokens and block-table row."""

    def __init__(self, executor, cfg, start: int, rows: int, pool):
        self.prog = prefill_program(executor.tg, cfg, rows, start, batch=1)
        self.buffers = executor.buffers
        device = executor.devices[0]
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=device)
        scratch_row = torch.zeros((1, executor.kv_table.shape[1]), dtype=executor.kv_table.dtype)
        self.index = pool_rows(self.prog, self.buffers, scratch_row)  # static: set before each replay
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # one eager pass first: library handles and workspaces exist then
            run_ops(self.prog, self.buffers, [self.tokens], True, self.index)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            run_ops(self.prog, self.buffers, [self.tokens], True, self.index)

    def run(self, tokens: list[int], kv_table: torch.Tensor) -> None:
        """Replay over `tokens` (the chunk's positions, padding included) and one slot's row of the
        block table."""
        self.tokens.copy_(torch.tensor(tokens, dtype=torch.int64))
        for key, rows in pool_rows(self.prog, self.buffers, kv_table).items():
            self.index[key].copy_(rows)
        self.graph.replay()


class PrefillReplays:
    """The chunk graphs of one executor (at most REPLAYS_KEPT, the least recently replayed dropped
    first) and the memory pool they share. A shape is captured the second time it comes: a capture costs about
    three eager passes, so a shape seen once (a long prompt's odd tail) stays eager."""

    def __init__(self):
        self.graphs: dict[tuple[int, int], ChunkGraph] = {}
        self.seen: dict[tuple[int, int], None] = {}  # shapes met once, oldest first
        self.pool = None
        self.failed: str | None = None  # why a capture failed: every chunk runs eagerly from then on
        # Prefill passes so far: replayed (a capture's first replay included), captured, and run
        # eagerly (`mpk.prefill.prefill_slot` counts those, replayable or not).
        self.replayed = self.captured = self.eager = 0

    def run(self, executor, cfg, prompt: list[int], start: int, rows: int, kv_table: torch.Tensor) -> bool:
        """Prefill positions [start, start + rows) of `prompt` into the slot whose block-table row is
        `kv_table` by replaying the chunk's padded shape, captured now if it comes the second time.
        False, with nothing run, when the shape is new: the caller runs the chunk eagerly."""
        if self.failed is not None:
            return False
        padded = replay_rows(start, rows, executor.tg.max_seq_len)
        key = (start, padded)
        if key not in self.graphs:
            if key not in self.seen:
                keep(self.seen, key, lambda: None, SEEN_KEPT)
                return False
            del self.seen[key]
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            try:
                keep(self.graphs, key, lambda: ChunkGraph(executor, cfg, start, padded, self.pool), REPLAYS_KEPT)
            except RuntimeError as e:  # the eager path still serves, only slower: say so once
                self.failed = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"mpk: capturing a prefill chunk as a CUDA graph failed ({self.failed}); prefill chunks "
                      "run op by op from now on", file=sys.stderr, flush=True)
                return False
            self.captured += 1
        else:
            self.graphs[key] = self.graphs.pop(key)  # the most recently replayed, last
        self.graphs[key].run(prompt[start:start + rows] + [0] * (padded - rows), kv_table)
        self.replayed += 1
        return True

