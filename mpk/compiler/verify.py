"""The verifier: proves a TaskGraph safe to run, for any number of steps, before anything runs.

Execution model (what both executors do): queue `q` is run by one SM in order, step after step.
Before task `t` of step `s` runs, the SM waits until `counter[t.wait] >= target * (s + 1 - lag)`;
after it runs, every event in `t.signals` gets +1. Counters start at 0.

Checks, in order; the first failing one raises `VerificationError` naming tasks, tensors, boxes
and events:

1. structure: every task in exactly one queue, regions inside their tensors, no writes to weights,
   each event's producers are exactly the tasks that signal it, its target is their number, and
   its consumers are exactly its task range.
2. deadlock: two unrolled steps run to completion (a worklist over the SMs; counters only grow,
   so if any interleaving finishes, this one does). Its execution order feeds the vector clocks.
3. races: any two task instances of the same or consecutive steps that touch intersecting boxes,
   one of them writing, are ordered by happens-before.
4. coverage: every activation read is covered by the boxes of the writes that happen-before it
   (the writer's most recent instance); state and meta start with the host's contents.
5. counters: no producer can signal an event for the next step before a consumer has waited on
   it, so a fast producer's signal never stands in for a slow one's. (With the compiler's events
   this follows from 3, as producers write what consumers read; hand-made events need not.)

Why two steps suffice: the graph is the same every step, and happens-before edges never go back
in steps, so an order proven between steps 0 and 1 (or within a step) holds between any `s` and
`s + 1`; the lag-1 edges that step 0 lacks only add orders in later steps. A graph that runs one
step per launch (`TaskGraph.one_step`, a prefill chunk: the launch's end orders it against the next)
is proven for that one step.

Happens-before uses vector clocks: queues run in order, so the ancestors of an instance are a
prefix of each queue, one position per queue. `a` happens-before-or-equals `b` iff
`vc[b][queue(a)] >= pos(a)`, one array lookup, which is what makes 40k-task graphs fast.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from mpk.errors import MpkError
from mpk.taskgraph import Box, Region, TaskGraph

STEPS = 2  # unrolled steps


def steps_of(tg: TaskGraph) -> int:
    """Steps the checks unroll: two, or one for a graph that runs one step per launch."""
    return 1 if tg.one_step else STEPS
PAIR_CHUNK = 1 << 21  # box-pair elements per numpy batch: bounds the memory of the intersection matrices
LIST_MAX = 4  # tasks or SMs named in one message before "and N more"


class VerificationError(MpkError):
    """A TaskGraph failed a verifier check; `check` names which one, the message says where."""

    def __init__(self, check: str, message: str):
        super().__init__(f"verification failed ({check}): {message}")
        self.check = check


@dataclass
class VerifyReport:
    """What was proven, for `mpk inspect`."""

    tasks: int = 0
    events: int = 0
    queues: int = 0
    steps: int = STEPS  # steps unrolled
    instances: int = 0  # task instances run in the deadlock simulation
    race_pairs: int = 0  # instance pairs with intersecting boxes, one writing, proven ordered
    covered_reads: int = 0  # activation read instances proven covered by earlier writes
    counter_pairs: int = 0  # (consumer, producer) pairs proven not to signal a step early
    seconds: float = 0.0
    check_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return (f"{self.tasks:,} tasks x {self.steps} steps on {self.queues} queues deadlock-free; "
                f"{self.events:,} event targets; {self.race_pairs:,} overlapping pairs ordered; "
                f"{self.covered_reads:,} reads covered")

    def as_dict(self) -> dict:
        return {"verdict": "pass", "summary": self.summary, **asdict(self)}


def verify(tg: TaskGraph) -> VerifyReport:
    """Run every check on `tg`; return the counts, or raise VerificationError at the first failure."""
    report = VerifyReport(tasks=len(tg.tasks), events=len(tg.events), queues=tg.num_queues, steps=steps_of(tg))
    t_start = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        report.check_seconds[name] = now - last
        last = now

    accesses = check_structure(tg)
    lap("structure")
    order = check_deadlock(tg)
    report.instances = len(order)
    clocks = Clocks.from_order(tg, order)
    lap("deadlock+clocks")
    report.race_pairs = check_races(tg, clocks, accesses)
    lap("races")
    report.covered_reads = check_coverage(tg, clocks, accesses)
    lap("coverage")
    report.counter_pairs = check_counters(tg, clocks) if steps_of(tg) > 1 else 0
    lap("counters")
    report.seconds = time.perf_counter() - t_start
    return report


# ---------------------------------------------------------------------------------------------
# Naming things in messages


def _queue_name(tg: TaskGraph, q: int) -> str:
    rank, sm = divmod(q, tg.num_sms)
    return f"queue {q} (SM {sm})" if tg.tp_size == 1 else f"queue {q} (rank {rank} SM {sm})"


def _at(tg: TaskGraph, tid: int, step: int) -> str:
    return f"{tg.describe_task(tid)} in step {step}"


def _some(tg: TaskGraph, tids) -> str:
    tids = list(tids)
    named = ", ".join(tg.describe_task(t) for t in tids[:LIST_MAX])
    return named + (f" and {len(tids) - LIST_MAX} more" if len(tids) > LIST_MAX else "")


def _tensor_name(tg: TaskGraph, name: str) -> str:
    return f"{tg.tensors[name].kind} tensor '{name}'"


# ---------------------------------------------------------------------------------------------
# 1. Structure: queues, regions, event targets


@dataclass
class Accesses:
    """Every declared access of one tensor: task, box and whether it writes (arrays, one row each)."""

    tasks: np.ndarray  # [n] task ids
    boxes: np.ndarray  # [n, dims, 2] start/stop per dimension
    writes: np.ndarray  # [n] bool

    def region(self, i: int, name: str) -> Region:
        return Region(name, tuple((int(a), int(b)) for a, b in self.boxes[i]))


def check_structure(tg: TaskGraph) -> dict[str, Accesses]:
    """Check queues, regions and event targets; return the accesses grouped by tensor."""
    _check_queues(tg)
    accesses = _collect_accesses(tg)
    _check_events(tg)
    return accesses


def _check_queues(tg: TaskGraph) -> None:
    def fail(msg: str) -> VerificationError:
        return VerificationError("queues", msg)

    if len(tg.queues) != tg.num_queues:
        raise fail(f"the graph has {len(tg.queues)} queues, but tp_size x num_sms = {tg.num_queues}")
    for i, t in enumerate(tg.tasks):
        if t.id != i:
            raise fail(f"tasks[{i}] has id {t.id}; task ids must be their positions")
    seen = [-1] * len(tg.tasks)
    for q, queue in enumerate(tg.queues):
        for tid in queue:
            if not 0 <= tid < len(tg.tasks):
                raise fail(f"{_queue_name(tg, q)} lists task {tid}, but there are {len(tg.tasks)} tasks")
            if seen[tid] >= 0:
                raise fail(f"{tg.describe_task(tid)} is listed on {_queue_name(tg, seen[tid])} "
                           f"and again on {_queue_name(tg, q)}")
            seen[tid] = q
            if tg.tasks[tid].queue != q:
                raise fail(f"{tg.describe_task(tid)} is on {_queue_name(tg, q)} "
                           f"but says queue {tg.tasks[tid].queue}")
    missing = [t for t, q in enumerate(seen) if q < 0]
    if missing:
        raise fail(f"{_some(tg, missing)} are on no queue, so they would never run")


def _collect_accesses(tg: TaskGraph) -> dict[str, Accesses]:
    def fail(tid: int, msg: str) -> VerificationError:
        return VerificationError("regions", f"{tg.describe_task(tid)} {msg}")

    lists: dict[str, tuple[list, list, list]] = {name: ([], [], []) for name in tg.tensors}
    for t in tg.tasks:
        for regions, writing in ((t.reads, False), (t.writes, True)):
            for r in regions:
                spec = tg.tensors.get(r.tensor)
                if spec is None:
                    raise fail(t.id, f"accesses {r}, but there is no tensor '{r.tensor}'")
                if len(r.box) != len(spec.shape):
                    raise fail(t.id, f"accesses {r} with {len(r.box)} dimensions; "
                                     f"{_tensor_name(tg, r.tensor)} has shape {spec.shape}")
                if writing and spec.kind == "weight":
                    raise fail(t.id, f"writes {r}, but weights are read-only")
                tids, boxes, writes = lists[r.tensor]
                tids.append(t.id)
                boxes.append(r.box)
                writes.append(writing)
    accesses = {}
    for name, (tids, boxes, writes) in lists.items():
        if not tids:
            continue
        shape = tg.tensors[name].shape
        acc = Accesses(np.array(tids, dtype=np.int64),
                       np.array(boxes, dtype=np.int64).reshape(len(tids), len(shape), 2),
                       np.array(writes, dtype=bool))
        start, stop = acc.boxes[..., 0], acc.boxes[..., 1]
        outside = (start < 0) | (start > stop) | (stop > np.array(shape, dtype=np.int64))
        bad = np.nonzero(outside.any(axis=1))[0]
        if len(bad):
            i = int(bad[0])
            raise fail(int(acc.tasks[i]), f"accesses {acc.region(i, name)}, outside {_tensor_name(tg, name)} "
                                          f"of shape {shape}")
        accesses[name] = acc
    return accesses


def _check_events(tg: TaskGraph) -> None:
    def fail(msg: str) -> VerificationError:
        return VerificationError("events", msg)

    num_events = len(tg.events)
    signalers: list[list[int]] = [[] for _ in range(num_events)]
    waiters: list[list[int]] = [[] for _ in range(num_events)]
    for t in tg.tasks:
        if not -1 <= t.wait < num_events:
            raise fail(f"{tg.describe_task(t.id)} waits on event {t.wait}, but there are {num_events} events")
        if t.wait >= 0:
            waiters[t.wait].append(t.id)
        if len(set(t.signals)) != len(t.signals):
            raise fail(f"{tg.describe_task(t.id)} signals {t.signals}, with an event twice")
        for e in t.signals:
            if not 0 <= e < num_events:
                raise fail(f"{tg.describe_task(t.id)} signals event {e}, but there are {num_events} events")
            signalers[e].append(t.id)
    for i, ev in enumerate(tg.events):
        if ev.id != i:
            raise fail(f"events[{i}] has id {ev.id}; event ids must be their positions")
        if ev.lag not in (0, 1):
            raise fail(f"event {i} has lag {ev.lag}; only 0 (this step) and 1 (the previous step) are supported")
        if sorted(ev.producers) != signalers[i]:
            extra = sorted(set(signalers[i]) - set(ev.producers))
            silent = sorted(set(ev.producers) - set(signalers[i]))
            what = []
            if extra:
                what.append(f"{_some(tg, extra)} signal it but are not listed as producers")
            if silent:
                what.append(f"producers {_some(tg, silent)} do not signal it")
            if not what:
                what.append(f"its producer list {ev.producers} has duplicates")
            raise fail(f"event {i}: " + "; ".join(what))
        if ev.target != len(signalers[i]):
            effect = ("would wait for signals that never come" if ev.target > len(signalers[i])
                      else "would run before all of them finished")
            count = f"{len(signalers[i])} tasks signal it" if len(signalers[i]) != 1 else "1 task signals it"
            raise fail(f"event {i} has target {ev.target}, but {count} "
                       f"({_some(tg, signalers[i])}); its consumers {effect}")
        if waiters[i] != list(range(ev.first_task, ev.stop_task)):
            shown = ", ".join(map(str, waiters[i][:2 * LIST_MAX])) + (" ..." if len(waiters[i]) > 2 * LIST_MAX else "")
            raise fail(f"event {i} names consumers [{ev.first_task}, {ev.stop_task}), "
                       f"but the tasks waiting on it are [{shown}]")


# ---------------------------------------------------------------------------------------------
# 2. Deadlock freedom


def check_deadlock(tg: TaskGraph) -> list[int]:
    """Run two steps (`steps_of`) on all SMs; return the instances (`step * num_tasks + task`) in the
    order run.

    Each SM runs as far as it can, then parks on the event its head task waits for; it is woken
    when that counter reaches a multiple of the target (every threshold is one). Running ahead
    greedily also gives fast producers the best chance to signal a step early, which is checked:
    a consumer must only pass once every producer of the step it waits for has run, so that the
    order is a valid execution of the happens-before graph the clocks are built from.
    """
    n_tasks, num_events, steps = len(tg.tasks), len(tg.events), steps_of(tg)
    wait = [t.wait for t in tg.tasks]
    signals = [t.signals for t in tg.tasks]
    target = [ev.target for ev in tg.events]
    lag = [ev.lag for ev in tg.events]
    counter = [0] * num_events
    per_step = [[0] * steps for _ in range(num_events)]  # signals of each step, to catch early ones
    done = [0] * n_tasks  # instances of each task run so far
    head = [0] * tg.num_queues
    parked: list[list[int]] = [[] for _ in range(num_events)]
    work = list(range(tg.num_queues - 1, -1, -1))
    order: list[int] = []
    while work:
        q = work.pop()
        queue = tg.queues[q]
        n = len(queue)
        k = head[q]
        while k < steps * n:
            s = k // n
            t = queue[k - s * n]
            e = wait[t]
            if e >= 0:
                if counter[e] < target[e] * (s + 1 - lag[e]):
                    parked[e].append(q)
                    break
                if s >= lag[e] and per_step[e][s - lag[e]] < target[e]:
                    raise _early_signal_error(tg, t, s, e, done)
            order.append(s * n_tasks + t)
            done[t] += 1
            for x in signals[t]:
                counter[x] += 1
                per_step[x][s] += 1
                if parked[x] and counter[x] % target[x] == 0:
                    work.extend(parked[x])
                    parked[x] = []
            k += 1
        head[q] = k
    if len(order) < steps * n_tasks:
        raise _deadlock_error(tg, head, counter, done)
    return order


def _deadlock_error(tg: TaskGraph, head, counter, done) -> VerificationError:
    stuck = []  # (waits for a producer queued behind it on its own SM, message)
    for q, queue in enumerate(tg.queues):
        if head[q] >= steps_of(tg) * len(queue):
            continue
        s, i = divmod(head[q], len(queue))
        t = tg.tasks[queue[i]]
        ev = tg.events[t.wait]
        need = ev.target * (s + 1 - ev.lag)
        missing = [p for p in ev.producers if done[p] <= s - ev.lag]
        own = any(tg.tasks[p].queue == q for p in missing)
        stuck.append((not own, f"{_queue_name(tg, q)} is stuck at {_at(tg, t.id, s)}, waiting on event {ev.id} "
                               f"(counter {counter[ev.id]} < {need} needed; producers not yet run in step "
                               f"{s - ev.lag}: {_some(tg, missing) or 'none'})"))
    stuck.sort(key=lambda x: x[0])  # SMs that wait on themselves first: they are the cause
    named = "; ".join(msg for _, msg in stuck[:LIST_MAX])
    more = f"; and {len(stuck) - LIST_MAX} more SMs" if len(stuck) > LIST_MAX else ""
    return VerificationError("deadlock", f"the queues deadlock: {named}{more}. "
                                         "Every queue must follow one global topological order")


def _early_signal_error(tg: TaskGraph, t: int, s: int, e: int, done) -> VerificationError:
    ev = tg.events[e]
    late = [p for p in ev.producers if done[p] <= s - ev.lag]
    early = [p for p in ev.producers if done[p] > s - ev.lag + 1]
    return VerificationError(
        "counters",
        f"{_at(tg, t, s)} passed event {e} before {_some(tg, late)} ran in step {s - ev.lag}: "
        f"{_some(tg, early)} had already signalled for step {s - ev.lag + 1}, and the counter cannot tell "
        "the steps apart; each consumer must happen-before every producer's next-step instance")


# ---------------------------------------------------------------------------------------------
# Happens-before


@dataclass
class Clocks:
    """Vector clocks of the task instances of steps 0 and 1 (or 0 alone: `steps_of`); instance id is
    `step * num_tasks + task`.

    `pos[i]` is the position of instance `i` in its queue unrolled over the steps, and
    `vc[i, q]` the last position on queue `q` that happens-before-or-equals `i` (-1: none).
    """

    num_tasks: int
    queue_of: np.ndarray  # [num_tasks] queue of each task
    pos: np.ndarray  # [steps * num_tasks]
    vc: np.ndarray  # [steps * num_tasks, num_queues] int32

    @classmethod
    def from_order(cls, tg: TaskGraph, order: list[int]) -> "Clocks":
        """Clocks from an execution order in which every instance follows all its predecessors.

        vc(i) = max(vc(previous instance on i's queue), clock of the event instance i waits for),
        then i's own position. An event instance's clock is the max over its producers, computed
        once as they run and shared by all its consumers.
        """
        n, num_queues, steps = len(tg.tasks), tg.num_queues, steps_of(tg)
        queue_of = np.array([t.queue for t in tg.tasks], dtype=np.int64)
        pos = np.empty(steps * n, dtype=np.int64)
        for queue in tg.queues:
            for s in range(steps):
                pos[s * n + np.array(queue, dtype=np.int64)] = s * len(queue) + np.arange(len(queue))
        vc = np.empty((steps * n, num_queues), dtype=np.int32)
        event_vc = np.full((len(tg.events) * steps, num_queues), -1, dtype=np.int32)  # row e * steps + s
        wait = [t.wait for t in tg.tasks]
        signals = [t.signals for t in tg.tasks]
        lag = [ev.lag for ev in tg.events]
        task_queue = queue_of.tolist()
        last = [-1] * num_queues  # instance last run on each queue
        pos_list = pos.tolist()
        for i in order:
            s, t = divmod(i, n)
            q = task_queue[t]
            row = vc[i]
            if last[q] >= 0:
                row[:] = vc[last[q]]
            else:
                row.fill(-1)
            e = wait[t]
            if e >= 0 and s >= lag[e]:
                np.maximum(row, event_vc[e * steps + s - lag[e]], out=row)
            row[q] = pos_list[i]
            for x in signals[t]:
                np.maximum(event_vc[x * steps + s], row, out=event_vc[x * steps + s])
            last[q] = i
        return cls(n, queue_of, pos, vc)

    def ordered(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Elementwise: instance a happens-before-or-equals instance b."""
        return self.vc[b, self.queue_of[a % self.num_tasks]] >= self.pos[a]

    def happens_before(self, a_task: int, a_step: int, b_task: int, b_step: int) -> bool:
        """Whether task a of step a_step happens-before (or is) task b of step b_step."""
        a, b = a_step * self.num_tasks + a_task, b_step * self.num_tasks + b_task
        return bool(self.ordered(np.array([a]), np.array([b]))[0])


# ---------------------------------------------------------------------------------------------
# 3. Races


def _chunks(rows: int, cols: int, dims: int):
    """Row slices of a rows x cols x dims pair computation that fit PAIR_CHUNK elements."""
    step = max(1, PAIR_CHUNK // max(1, cols * max(1, dims)))
    for lo in range(0, rows, step):
        yield slice(lo, min(rows, lo + step))


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] extents of the intersection of every pair of boxes, per dimension (>= 0)."""
    lo = np.maximum(a[:, None, :, 0], b[None, :, :, 0])
    hi = np.minimum(a[:, None, :, 1], b[None, :, :, 1])
    return np.maximum(hi - lo, 0)


def check_races(tg: TaskGraph, clocks: Clocks, accesses: dict[str, Accesses]) -> int:
    """Prove every conflicting pair ordered; return the number of instance pairs proven.

    Pairs are (write, any other access of another task) with intersecting boxes. Within a step,
    either order will do; checking step 0 covers every step, since a same-step path never leaves
    its step and the edges inside a step are the same in all of them. Across steps, the earlier
    step's instance must come first, in both roles: w(0) before x(1) and x(0) before w(1).

    One bug usually causes several races; the one reported is the most direct: two writes of one
    step (a box that spills into a sibling's), then a read of an earlier task's write in the same
    step (a dropped dependency), then other same-step pairs, then pairs across steps.
    """
    n = clocks.num_tasks
    proven = 0
    worst = None  # (rank key, tensor, access i, step i, access j, step j)
    for name, acc in accesses.items():
        if tg.tensors[name].kind == "weight":
            continue
        rows = np.nonzero(acc.writes)[0]
        dims = acc.boxes.shape[1]
        for part in _chunks(len(rows), len(acc.tasks), dims):
            w = rows[part]
            hit = (_overlap(acc.boxes[w], acc.boxes) > 0).all(axis=-1)
            hit &= acc.tasks[w][:, None] != acc.tasks[None, :]
            wi, xi = np.nonzero(hit)
            wi = w[wi]
            tw, tx = acc.tasks[wi], acc.tasks[xi]
            checks = ((clocks.ordered(tw, tx) | clocks.ordered(tx, tw), 0, 0),)
            if steps_of(tg) > 1:
                checks += ((clocks.ordered(tw, n + tx), 0, 1), (clocks.ordered(tx, n + tw), 1, 0))
            for ok, step_w, step_x in checks:
                bad = np.nonzero(~ok)[0]
                if not len(bad):
                    continue
                a, b = tw[bad], tx[bad]
                if step_w != step_x:
                    rank = np.full(len(bad), 3)
                else:
                    rank = np.where(acc.writes[xi[bad]], 0, np.where(a < b, 1, 2))
                late, early = np.maximum(a, b), np.minimum(a, b)
                m = np.lexsort((early, late, rank))[0]
                key = (int(rank[m]), int(late[m]), int(early[m]))
                if worst is None or key < worst[0]:
                    worst = (key, name, int(wi[bad[m]]), step_w, int(xi[bad[m]]), step_x)
            proven += len(checks) * len(wi)
    if worst is not None:
        raise _race_error(tg, worst[1], accesses[worst[1]], *worst[2:])
    return proven


def _race_error(tg: TaskGraph, name: str, acc: Accesses, i: int, si: int, j: int, sj: int) -> VerificationError:
    def side(k: int, s: int) -> str:
        verb = "writes" if acc.writes[k] else "reads"
        return f"{_at(tg, int(acc.tasks[k]), s)} {verb} {acc.region(k, name)}"

    return VerificationError(
        "race", f"race on {_tensor_name(tg, name)}: {side(i, si)} and {side(j, sj)}, and neither happens-before "
                "the other; add a dependency between them or make the boxes disjoint")


# ---------------------------------------------------------------------------------------------
# 4. Coverage


def check_coverage(tg: TaskGraph, clocks: Clocks, accesses: dict[str, Accesses]) -> int:
    """Prove every activation read covered by earlier writes; return the read instances proven.

    A writer counts with its most recent instance: the same step if its op comes earlier in the
    program than the reader's op, else the previous step. It must happen-before the reader.
    The writes' clipped volumes summing to the read's volume proves coverage when the counted
    pieces are disjoint; where two of them overlap, the boxes are subtracted exactly.
    """
    n = clocks.num_tasks
    op = np.array([t.op for t in tg.tasks], dtype=np.int64)
    proven = 0
    for name, acc in accesses.items():
        if tg.tensors[name].kind not in ("activation", "mailbox"):
            continue  # weights are constant; state and meta start with the host's contents
        reads, writes = np.nonzero(~acc.writes)[0], np.nonzero(acc.writes)[0]
        if not len(reads):
            continue
        wt, wb = acc.tasks[writes], acc.boxes[writes]
        overlapping = _overlapping_writes(wb)
        for part in _chunks(len(reads), len(writes), wb.shape[1]):
            r = reads[part]
            rt, rb = acc.tasks[r], acc.boxes[r]
            vol = _overlap(rb, wb).prod(axis=-1)  # [reads, writes] clipped volumes
            need = (rb[..., 1] - rb[..., 0]).prod(axis=-1)
            same_step = op[wt][None, :] < op[rt][:, None]
            for s in range(steps_of(tg)):
                w_step = np.where(same_step, s, s - 1)
                ri, wj = np.nonzero((vol > 0) & (w_step >= 0))
                before = clocks.ordered(w_step[ri, wj] * n + wt[wj], s * n + rt[ri])
                counted = np.zeros(vol.shape, dtype=bool)
                counted[ri[before], wj[before]] = True
                got = np.where(counted, vol, 0).sum(axis=1)
                exact = (got >= need) & ((counted & overlapping[None, :]).sum(axis=1) >= 2)
                for k in np.nonzero((got < need) | exact)[0]:
                    cutters = [tuple(map(tuple, wb[j])) for j in np.nonzero(counted[k])[0]]
                    read_box = tuple(map(tuple, rb[k]))
                    hole = _uncovered(read_box, cutters)
                    if hole is not None:
                        raise _coverage_error(tg, name, acc, int(r[k]), s, hole)
                proven += len(r)
    return proven


def _overlapping_writes(wb: np.ndarray) -> np.ndarray:
    """[writes] bool: the write box intersects another write box of the tensor."""
    out = np.zeros(len(wb), dtype=bool)
    for part in _chunks(len(wb), len(wb), wb.shape[1]):
        hit = (_overlap(wb[part], wb) > 0).all(axis=-1)
        hit[np.arange(hit.shape[0]), np.arange(part.start, part.stop)] = False
        out[part] = hit.any(axis=1)
    return out


def _subtract(box: Box, cut: Box) -> list[Box]:
    """Disjoint boxes covering `box` minus `cut`."""
    if any(max(a, c) >= min(b, d) for (a, b), (c, d) in zip(box, cut)):
        return [box]
    pieces = []
    rest = list(box)
    for dim, ((a, b), (c, d)) in enumerate(zip(box, cut)):
        if a < c:
            pieces.append(tuple(rest[:dim]) + ((a, c),) + tuple(rest[dim + 1:]))
        if d < b:
            pieces.append(tuple(rest[:dim]) + ((d, b),) + tuple(rest[dim + 1:]))
        rest[dim] = (max(a, c), min(b, d))
    return pieces


def _uncovered(box: Box, cutters: list[Box]) -> Box | None:
    """A non-empty part of `box` that no cutter covers, or None if their union covers it."""
    if any(a >= b for a, b in box):
        return None
    left = [box]
    for cut in cutters:
        left = [p for piece in left for p in _subtract(piece, cut)]
        if not left:
            return None
    return left[0]


def _coverage_error(tg: TaskGraph, name: str, acc: Accesses, k: int, s: int, hole: Box) -> VerificationError:
    t = int(acc.tasks[k])
    read = acc.region(k, name)
    gap = Region(name, hole)
    if hole == read.box:
        msg = f"{_at(tg, t, s)} reads {read} of {_tensor_name(tg, name)}, which nothing wrote before it"
    else:
        msg = f"{_at(tg, t, s)} reads {read} of {_tensor_name(tg, name)}, but nothing wrote {gap} before it"
    hole_box = np.array(hole, dtype=np.int64)[None]
    hits = acc.writes & (_overlap(hole_box, acc.boxes)[0] > 0).all(axis=-1)
    writers = sorted(set(acc.tasks[hits].tolist()))
    op = tg.tasks[t].op
    if writers and s == 0 and all(tg.tasks[w].op >= op for w in writers):
        msg += (f" (its writers {_some(tg, writers)} come later in the program, and only meta and state "
                "tensors start with contents)")
    elif writers:
        msg += f" (its writers {_some(tg, writers)} are not ordered before this read)"
    return VerificationError("coverage", msg)


# ---------------------------------------------------------------------------------------------
# 5. Counters


def check_counters(tg: TaskGraph, clocks: Clocks) -> int:
    """Prove that no producer signals an event for the next step before its consumers waited.

    A consumer of step s counts signals of steps <= s - lag; one from step s - lag + 1 arriving
    first would stand in for a missing one. So each consumer c must happen-before every producer
    p of step s - lag + 1; in the steady state that is c(lag) before p(1). The producers' clocks
    are met (elementwise min) once per event, then each consumer is one lookup.
    """
    n = clocks.num_tasks
    proven = 0
    for ev in tg.events:
        if not ev.producers or ev.first_task == ev.stop_task:
            continue
        producers = n + np.array(ev.producers, dtype=np.int64)  # step 1 instances
        meet = clocks.vc[producers].min(axis=0)
        consumers = np.arange(ev.first_task, ev.stop_task, dtype=np.int64)
        mine = ev.lag * n + consumers
        bad = np.nonzero(meet[clocks.queue_of[consumers]] < clocks.pos[mine])[0]
        if len(bad):
            c = int(consumers[bad[0]])
            early = [p for p in ev.producers if not clocks.happens_before(c, ev.lag, p, 1)]
            raise VerificationError(
                "counters",
                f"{_some(tg, early)} can signal event {ev.id} for step 1 before {_at(tg, c, ev.lag)} has "
                f"waited on it, so a fast producer's signal can stand in for a slow one's; make the "
                "consumer happen-before every producer's next-step instance")
        proven += len(consumers) * len(producers)
    return proven
