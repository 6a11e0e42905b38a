"""Dependencies from region intersection, event fusion, and linearization into one global order.

A task depends on exactly the tasks whose writes intersect its reads (fine-grained): RoPE of KV
group g waits for the QKV tiles of group g only. Activations are single-assignment per step, so a
read's producers are the writer op's tasks: of this step when the writer comes earlier in program
order (lag 0), of the previous step otherwise (lag 1: the token sampled last step).
Consumers with the same producer set share one event (fusion), and the tasks of one event are
placed next to each other (linearization), so an event names a task range.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np

from mpk.errors import MpkError
from mpk.graph import Program
from mpk.taskgraph import Event, Task

DepKey = tuple[frozenset, int]  # (producer task ids, lag)


def _boxes(regions) -> np.ndarray:
    return np.array([r.box for r in regions], dtype=np.int64)  # [n, dims, 2]


def find_producers(prog: Program, tasks: list[Task]) -> list[DepKey | None]:
    """For each task, (producers, lag) from intersecting writes, or None if it waits on nothing.

    Producers implied by others are dropped (transitive reduction): the O projection reads its
    residual tile, but that tile's writer already precedes every attention task it waits for.
    This is what lets all tiles of one op share one event.
    """
    writers = defaultdict(list)  # tensor -> [(task id, region)]
    for t in tasks:
        for w in t.writes:
            writers[w.tensor].append((t.id, w))
    reads_by_op = defaultdict(list)  # (op, tensor) -> [(task id, region)]
    for t in tasks:
        for r in t.reads:
            if prog.tensor(r.tensor).kind != "weight" and writers.get(r.tensor):
                reads_by_op[(t.op, r.tensor)].append((t.id, r))

    per_read = [[] for _ in tasks]  # task -> [(frozenset of producers, lag)], one entry per read
    for (op, tensor), reads in reads_by_op.items():
        wr = writers[tensor]
        a, b = _boxes([r for _, r in reads]), _boxes([w for _, w in wr])
        overlap = np.all((a[:, None, :, 0] < b[None, :, :, 1]) & (b[None, :, :, 0] < a[:, None, :, 1]), axis=-1)
        writer_lag = np.array([0 if tasks[w].op < op else 1 for w, _ in wr])
        # Most reads share a producer set: group them by their row of bits, packed 8 to a byte.
        packed, which = np.unique(np.packbits(overlap, axis=1), axis=0, return_inverse=True)
        rows = np.unpackbits(packed, axis=1, count=len(wr)).astype(bool)
        sets = []
        for row in rows:
            sets.append([(frozenset(wr[j][0] for j in np.nonzero(row & (writer_lag == lag))[0]), lag) for lag in (0, 1)])
        for i, u in enumerate(which.reshape(-1)):
            tid = reads[i][0]
            # A task reading what it wrote itself the step before needs no event: its queue runs it
            # step after step (the one-pass attention task reads its cache column's earlier rows).
            per_read[tid].extend((found, lag) for found, lag in ((f - {tid} if lag else f, lag) for f, lag in sets[u])
                                 if found)
    return _reduce(prog, tasks, per_read)


def _reduce(prog: Program, tasks: list[Task], per_read) -> list[DepKey | None]:
    """Drop same-step producers that are ancestors of another producer, using ancestor bitsets.

    Tasks are in program order here, so same-step producers always come first. Reads that share a
    producer set (every tile reading all of x) share one union of ancestors, computed once.
    A task with producers of both steps keeps this step's only if they already come after the
    previous step's (`_check_previous_step_implied`): the attention splits read the cache column
    the previous step's merge wrote, which the token chain orders before this step's QKV tiles.
    """
    ancestors = [0] * len(tasks)  # bit p set: task p happens-before this task within a step
    union_cache: dict[frozenset, int] = {}
    reduced: dict[tuple, tuple[frozenset, int]] = {}  # tasks with equal reads reduce alike
    keys: list[DepKey | None] = []
    previous_step: dict[int, frozenset] = {}  # task -> lag-1 producers its lag-0 producers must imply
    for t in tasks:
        reads = per_read[t.id]
        lags = {lag for _, lag in reads}
        if len(lags) > 1:
            previous_step[t.id] = frozenset().union(*(s for s, lag in reads if lag == 1))
            reads = [(s, lag) for s, lag in reads if lag == 0]
            lags = {0}
        if not reads:
            keys.append(None)
            continue
        producers = frozenset().union(*(s for s, _ in reads))
        if lags == {1}:
            keys.append((producers, 1))
            continue
        memo_key = tuple(s for s, _ in reads)
        if memo_key not in reduced:
            implied = 0
            for s, _ in reads:
                if s not in union_cache:
                    u = 0
                    for p in s:
                        u |= ancestors[p]
                    union_cache[s] = u
                implied |= union_cache[s]
            kept = frozenset(p for p in producers if not (implied >> p) & 1)
            bits = 0
            for p in kept:
                bits |= 1 << p
            reduced[memo_key] = (kept, implied | bits)
        kept, ancestors[t.id] = reduced[memo_key]
        keys.append((kept, 0))
    _check_previous_step_implied(prog, tasks, keys, ancestors, previous_step)
    return keys


def _check_previous_step_implied(prog: Program, tasks: list[Task], keys, ancestors, previous_step) -> None:
    """Each task of `previous_step` must already come after its previous-step producers: some
    same-step ancestor waits (lag 1) on tasks that have them as ancestors, or are them."""
    lag1 = [t.id for t, key in zip(tasks, keys) if key is not None and key[1] == 1]
    reach: dict[int, int] = {}  # lag-1 task -> previous-step tasks that happen-before it
    for a in lag1:
        bits = 0
        for p in keys[a][0]:
            bits |= ancestors[p] | (1 << p)
        reach[a] = bits
    for tid, wanted in previous_step.items():
        before = 0
        for a in lag1:
            if (ancestors[tid] >> a) & 1:
                before |= reach[a]
        if any(not (before >> p) & 1 for p in wanted):
            t = tasks[tid]
            raise MpkError(
                f"{prog.ops[t.op].name} tile {t.tile} depends on producers of this step and of the previous one, "
                "and this step's do not already follow the previous step's; one event cannot express both"
            )


def fuse_and_linearize(tasks: list[Task], keys: list[DepKey | None]) -> tuple[list[Task], list[Event], dict]:
    """Renumber tasks into a global topological order with each event's consumers contiguous."""
    groups: dict = {}  # key -> list of task ids (old numbering); tasks with no key are singletons
    group_of = []
    for t, key in zip(tasks, keys):
        gkey = key if key is not None else ("alone", t.id)
        group_of.append(groups.setdefault(gkey, []))
        group_of[-1].append(t.id)
    group_list = list(groups.items())
    gindex = {id(members): i for i, (_, members) in enumerate(group_list)}

    # Group-level DAG over same-step edges; Kahn's algorithm, earliest tasks first.
    succ = defaultdict(set)
    indeg = [0] * len(group_list)
    for gi, (gkey, _) in enumerate(group_list):
        if gkey[0] == "alone" or gkey[1] != 0:
            continue
        preds = {gindex[id(group_of[p])] for p in gkey[0]}
        for p in preds:
            succ[p].add(gi)
        indeg[gi] = len(preds)
    heap = [(members[0], gi) for gi, (_, members) in enumerate(group_list) if indeg[gi] == 0]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        _, gi = heapq.heappop(heap)
        order.extend(group_list[gi][1])
        for s in succ[gi]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(heap, (group_list[s][1][0], s))
    if len(order) != len(tasks):
        raise MpkError("the task dependencies form a cycle within one step; the tensor program is malformed")

    new_id = {old: new for new, old in enumerate(order)}
    new_tasks = []
    for new, old in enumerate(order):
        t = tasks[old]
        new_tasks.append(Task(new, t.op, t.tile, t.reads, t.writes, t.bytes, t.flops))
    events: list[Event] = []
    seen = {}
    for new, old in enumerate(order):
        key = keys[old]
        if key is None:
            continue
        if key not in seen:
            producers = sorted(new_id[p] for p in key[0])
            seen[key] = len(events)
            events.append(Event(len(events), producers, len(producers), key[1], new, new))
            for p in producers:
                new_tasks[p].signals.append(seen[key])
        ev = events[seen[key]]
        ev.stop_task = new + 1
        new_tasks[new].wait = ev.id
    stats = {
        "events_unfused": sum(k is not None for k in keys),
        "events": len(events),
        "dependency_edges": sum(len(k[0]) for k in keys if k is not None),
        "event_edges": sum(ev.target for ev in events),
    }
    return new_tasks, events, stats
