"""The device tables of one TaskGraph: tasks, signals, queues, events, op arguments, prefetches.

Layouts are the structs of mpk/csrc/mpk_runtime.cuh (`mpk.runtime.abi`); op arguments come from
each op kind's `cuda` through `mpk.codegen.lower_op`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpk.codegen import OpArgs, Variant, graph_variants
from mpk.dtypes import dtype
from mpk.errors import MpkError
from mpk.ops import OP_KINDS
from mpk.runtime.abi import ENTRY_DTYPE, ENTRY_SIGNALS, OP_DTYPE, TASK_DTYPE
from mpk.taskgraph import TaskGraph

# The L2 prefetch of a task's weights past its head, issued before the task waits. It pays only on
# long tiles: on an H200 it made tiles of 256 KB and more (qwen3-8b) 1-2% faster with 32-64 KB, and
# any amount on tiles of 64-128 KB (qwen3-0.6b) 5-7% slower (docs/perf.md).
PREFETCH_MAX_BYTES = 64 * 1024
PREFETCH_MIN_TILE_BYTES = 256 * 1024


@dataclass
class KernelTables:
    """Everything one rank's kernel reads besides tensors, as plain arrays."""

    variants: list[Variant]  # in dispatch order
    tasks: np.ndarray  # TASK_DTYPE [num_tasks]: every rank's tasks, by global id
    signals: np.ndarray  # int32 event ids
    signal_rank: np.ndarray  # int32, per entry of signals: the rank whose counter it increments
    queue_off: np.ndarray  # int32 [num_sms + 1]: this rank's queues
    queue_tasks: np.ndarray  # int32
    ev_target: np.ndarray  # int32 [num_events]
    ev_lag: np.ndarray  # int32 [num_events]
    ev_sys: np.ndarray  # int32 [num_events]: 1 when producers and consumers are on different ranks
    ev_polled: np.ndarray  # int32 [num_events]: 1 when its consumers poll their inputs' tags (no counter)
    op_args: list[OpArgs]  # per op of the graph
    n_sample: int  # this rank's sample tasks per step


def task_rank(tg: TaskGraph, tid: int) -> int:
    return tg.tasks[tid].queue // tg.num_sms


def build_tables(tg: TaskGraph, rank: int = 0) -> KernelTables:
    """The task, queue and event tables of `tg` as the kernel of GPU `rank` reads them."""
    if not 0 <= rank < tg.tp_size:
        raise MpkError(f"rank {rank} is not one of the graph's {tg.tp_size} tensor-parallel ranks")
    return build_rank_tables(tg)[rank]


def build_rank_tables(tg: TaskGraph) -> list[KernelTables]:
    """The tables of every rank's kernel. All ranks share the task, signal and event tables (task ids
    and event ids are global); each has its own queues.

    Each rank counts every event its tasks wait on in its own memory, so a producer signals once
    per rank with consumers of the event.
    """
    variants, op_variant, op_args = graph_variants(tg)
    polled = polled_events(tg)
    # A polled event's counter is never read, so its producers signal nobody.
    consumer_ranks = [[] if polled[e.id] else sorted({task_rank(tg, c) for c in range(e.first_task, e.stop_task)})
                      for e in tg.events]
    tasks = np.zeros(len(tg.tasks), dtype=TASK_DTYPE)
    signals: list[int] = []
    signal_rank: list[int] = []
    for i, t in enumerate(tg.tasks):
        if t.id != i:
            raise MpkError(f"task ids must be positions in the task list; task at {i} has id {t.id}")
        if len(t.tile) > 3:
            raise MpkError(f"{tg.describe_task(i)} has more than 3 tile coordinates")
        tasks[i]["variant"] = op_variant[t.op]
        tasks[i]["op"] = t.op
        tasks[i]["tile"][: len(t.tile)] = t.tile
        tasks[i]["wait"] = t.wait
        tasks[i]["sig_off"] = len(signals)
        for ev in t.signals:
            signals += [ev] * len(consumer_ranks[ev])
            signal_rank += consumer_ranks[ev]
        tasks[i]["sig_cnt"] = len(signals) - tasks[i]["sig_off"]
    if len(tg.queues) != tg.num_queues:
        raise MpkError(f"the graph has {len(tg.queues)} queues for {tg.tp_size} x {tg.num_sms} SMs")
    ev_sys = [int(len({task_rank(tg, p) for p in e.producers} | set(consumer_ranks[e.id])) > 1) for e in tg.events]
    shared = dict(
        variants=variants,
        tasks=tasks,
        signals=np.array(signals or [0], dtype=np.int32),
        signal_rank=np.array(signal_rank or [0], dtype=np.int32),
        ev_target=np.array([e.target for e in tg.events] or [0], dtype=np.int32),
        ev_lag=np.array([e.lag for e in tg.events] or [0], dtype=np.int32),
        ev_sys=np.array(ev_sys or [0], dtype=np.int32),
        ev_polled=np.array(polled or [0], dtype=np.int32),
        op_args=op_args,
    )
    out = []
    for rank in range(tg.tp_size):
        queues = tg.queues[rank * tg.num_sms:(rank + 1) * tg.num_sms]
        queue_off = np.concatenate([[0], np.cumsum([len(q) for q in queues])]).astype(np.int32)
        queue_tasks = np.array([tid for q in queues for tid in q], dtype=np.int32)
        mine = [t.id for t in tg.tasks if task_rank(tg, t.id) == rank]
        if sorted(queue_tasks.tolist()) != mine:
            raise MpkError(f"the queues of rank {rank} do not hold each of its tasks exactly once")
        n_sample = sum(1 for tid in mine if tg.ops[tg.tasks[tid].op].kind == "sample")
        out.append(KernelTables(queue_off=queue_off, queue_tasks=queue_tasks, n_sample=n_sample, **shared))
    return out


def rank_pointer_count(op_args: list[OpArgs]) -> int:
    """Entries of the per-rank address lists the op table points into."""
    return sum(len(p) for a in op_args for p in a.ptrs if isinstance(p, tuple))


def op_table(op_args: list[OpArgs], pointer_of, lists_at: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """OP_DTYPE rows for every op, and the u64 address lists of per-rank operands.

    `pointer_of(tensor name)` gives a tensor's device address; the caller puts the lists at device
    address `lists_at`, and a per-rank operand's slot points at its list there.
    """
    table = np.zeros(len(op_args), dtype=OP_DTYPE)
    lists: list[int] = []
    for i, a in enumerate(op_args):
        row = []
        for p in a.ptrs:
            if isinstance(p, tuple):
                row.append(lists_at + 8 * len(lists))
                lists += [pointer_of(n) for n in p]
            else:
                row.append(pointer_of(p) if p is not None else 0)
        table[i]["ptr"][: len(row)] = row
        table[i]["i"][: len(a.ints)] = a.ints
        table[i]["f"][: len(a.floats)] = a.floats
    return table, np.array(lists or [0], dtype=np.uint64)


def polled_events(tg: TaskGraph) -> list[int]:
    """Per event, 1 when its consumers poll their inputs (`OpKind.polls_inputs`): every consumer must,
    and every producer must push tagged words (`OpKind.pushes_words`), since the consumer's template
    reads readiness from the words and nothing else. A polling task reads its other inputs as plain
    tensors under the acquire of a producer on its own SM, so it must come after one in its queue
    (`mpk.compiler.follows` puts it right after)."""
    kind = [OP_KINDS[op.kind] for op in tg.ops]
    polled = []
    for e in tg.events:
        polls = {kind[tg.tasks[c].op].polls_inputs for c in range(e.first_task, e.stop_task)}
        if polls == {True} and not all(kind[tg.tasks[p].op].pushes_words for p in e.producers):
            raise MpkError(f"event {e.id}: its consumers poll tagged words, but a producer writes none "
                           f"({tg.describe_task(next(p for p in e.producers if not kind[tg.tasks[p].op].pushes_words))})")
        if len(polls) > 1:
            raise MpkError(f"event {e.id} has consumers that poll tagged words and consumers that wait on its counter")
        polled.append(int(polls == {True}))
    place = {tid: (q, i) for q, queue in enumerate(tg.queues) for i, tid in enumerate(queue)}
    for t in tg.tasks:
        if not kind[t.op].polls_inputs:
            continue
        if t.wait < 0:
            raise MpkError(f"{tg.describe_task(t.id)} polls tagged words but has no event naming their producers")
        q, i = place[t.id]
        if not any(place[p][0] == q and place[p][1] < i for p in tg.events[t.wait].producers):
            raise MpkError(f"{tg.describe_task(t.id)} polls tagged words but follows none of their producers on its SM, "
                           "whose wait would have acquired its other inputs")
    return polled


def queue_entries(t: KernelTables, ops: np.ndarray, prefetch: np.ndarray, counters: list[int], rank: int) -> np.ndarray:
    """ENTRY_DTYPE per queue position of rank `rank`'s tables `t` (queue by queue, as queue_tasks): the
    task's descriptor and its op's row of `ops` by value, its wait event's target, lag and scope, the
    addresses of the first ENTRY_SIGNALS counters it increments (`counters[r]`: rank r's counter
    array; a peer's is flagged in sig_sys), and the L2 range of the task at the next position of the
    same queue (the kernel walks each queue round and round)."""
    ids = t.queue_tasks.astype(np.int64)
    entries = np.zeros(len(ids), dtype=ENTRY_DTYPE)
    if not len(ids):
        return entries
    tasks = t.tasks[ids]
    entries["task"] = tasks
    entries["op"] = ops[tasks["op"]]
    entries["id"] = ids
    wait = tasks["wait"].astype(np.int64)
    has = wait >= 0
    for field, table in (("ev_target", t.ev_target), ("ev_lag", t.ev_lag), ("ev_sys", t.ev_sys),
                         ("ev_polled", t.ev_polled)):
        entries[field][has] = table[wait[has]]
    pos = np.arange(len(ids))
    queue = np.searchsorted(t.queue_off, pos, side="right") - 1
    start, length = t.queue_off[queue], np.diff(t.queue_off)[queue]
    following = ids[start + (pos - start + 1) % length]
    entries["next_l2"] = prefetch[following][:, 2:4]
    counter_base = np.array(counters, dtype=np.uint64)
    for k in range(ENTRY_SIGNALS):
        has_k = tasks["sig_cnt"] > k
        at = tasks["sig_off"][has_k].astype(np.int64) + k
        ev, r = t.signals[at].astype(np.uint64), t.signal_rank[at]
        entries["sig"][has_k, k] = counter_base[r] + np.uint64(8) * ev
        entries["sig_sys"][has_k] |= (r != rank).astype(np.int32) << k
    return entries


def head_rows_align(batch: int) -> int:
    """Rows a weight head is a multiple of: whole 16-row blocks where batches of 2+ may take the
    tensor-core GEMV (a block never straddles the head), else pairs (gate/up rows come in pairs)."""
    return 16 if batch >= 2 else 2


def prefetch_table(tg: TaskGraph, pointer_of, head_limit: int, l2_limit: int = PREFETCH_MAX_BYTES,
                   l2_min_tile: int = PREFETCH_MIN_TILE_BYTES) -> np.ndarray:
    """[num_tasks, 4] u64 per task: the weight head (address, bytes) for shared memory and the range
    (address, bytes) after it to prefetch into L2.

    The op kind names the streamed operand (`OpKind.streamed`). A tile of whole rows of a row-major
    matrix is one contiguous byte range; a tile of part of each row (a K slice) gets no head. The
    head is the longest prefix of whole row blocks (`head_rows_align`) within `head_limit` bytes
    (none when a row is not a multiple of 16 bytes, which bulk copies need); the L2 range is the
    next `l2_limit` bytes, in whole 16-byte units, for tiles of at least `l2_min_tile` bytes.
    """
    table = np.zeros((len(tg.tasks), 4), dtype=np.uint64)
    align = head_rows_align(tg.batch)
    for t in tg.tasks:
        role = OP_KINDS[tg.ops[t.op].kind].streamed
        tile = next((r for r in t.reads if r.role == role), None) if role else None
        if tile is None:
            continue
        spec = tg.tensors[tile.tensor]
        if any((a, b) != (0, n) for (a, b), n in zip(tile.box[1:], spec.shape[1:])):
            continue  # a slice of K (mpk.graph.k_splits) is not one byte range: it streams without a head
        row_bytes = dtype(spec.dtype).bytes * int(np.prod(spec.shape[1:]))
        r0, r1 = tile.box[0]
        first, stop = pointer_of(tile.tensor) + r0 * row_bytes, pointer_of(tile.tensor) + r1 * row_bytes
        head_rows = 0
        if row_bytes % 16 == 0 and first % 16 == 0:
            head_rows = min(r1 - r0, head_limit // row_bytes) // align * align
        head = head_rows * row_bytes
        l2_start = (first + head) // 16 * 16
        l2_stop = min(stop, l2_start + (l2_limit if stop - first >= l2_min_tile else 0))
        table[t.id] = (first, head, l2_start, max(0, l2_stop - l2_start) // 16 * 16)  # never past the tile's end
    return table
