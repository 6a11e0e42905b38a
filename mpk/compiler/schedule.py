"""Static per-SM queues, balanced by a cost model, all in the one global topological order.

List scheduling: walk tasks in global order; each goes to the SM of its rank that frees up
first (ties to the least loaded), starting when both the SM and its event are ready. Because
every queue follows the global order, the earliest unfinished task is always at the head of its
queue with its producers done, so the schedule cannot deadlock.

Tail tasks (`choose_tails`) go to no queue: the SM whose signal completes a tail's event runs it
at once, so in the cost model it starts when its event is ready, on the SM of the producer that
finishes last. A tail needs only its event, so it cannot deadlock either.
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass

from mpk.taskgraph import Event, Task


@dataclass(frozen=True)
class CostModel:
    """Roofline per task on one SM's share of the GPU (defaults: H100 SXM, bf16)."""

    hbm_bytes_per_s: float = 3.2e12
    flops_per_s: float = 800e12
    task_overhead_s: float = 1.0e-6  # event wait, dispatch, pipeline ramp

    def seconds(self, task: Task, num_sms: int) -> float:
        return max(task.bytes * num_sms / self.hbm_bytes_per_s, task.flops * num_sms / self.flops_per_s) + self.task_overhead_s


def choose_tails(tasks: list[Task], events: list[Event], task_rank: list[int], wants_tail: list[bool]) -> None:
    """Make each task whose op kind asks for it (`wants_tail`) the tail of its event where that is
    sound (`Event.tail`).

    The SM that completes the event runs the tail in its own step, on its own GPU, once, right
    after its task. So a tail's event has lag 0 (a lag-1 event is completed by the previous step),
    all its producers are on the tail's rank (a counter on another GPU has no SM of this one to
    complete it), and the tail is its only consumer; and no producer completes a second tail (a
    task runs at most one tail after itself).
    """
    completes_tail: set[int] = set()
    for t in tasks:
        if not wants_tail[t.id] or t.wait < 0:
            continue
        ev = events[t.wait]
        if (ev.lag != 0 or ev.stop_task - ev.first_task != 1
                or any(task_rank[p] != task_rank[t.id] or p in completes_tail for p in ev.producers)):
            continue
        ev.tail = t.id
        completes_tail.update(ev.producers)


def schedule(tasks: list[Task], events: list[Event], task_rank: list[int], tp_size: int, num_sms: int,
             cost: CostModel = CostModel()):
    """Assign every task but the tails a queue on the SMs of its rank; return (queues, stats)."""
    seconds = [cost.seconds(t, num_sms) for t in tasks]
    finish = [0.0] * len(tasks)
    event_ready: dict[int, float] = {}
    sm_heaps = [[(0.0, 0.0, r * num_sms + s) for s in range(num_sms)] for r in range(tp_size)]
    load = [0.0] * (tp_size * num_sms)
    queues: list[list[int]] = [[] for _ in range(tp_size * num_sms)]
    sm_of = [-1] * len(tasks)  # the SM each task runs on in the model, tails included
    # Longest chain of same-step dependencies: the time no number of SMs can beat.
    critical = [0.0] * len(tasks)
    event_critical: dict[int, float] = {}

    for t in tasks:
        ready, chain = 0.0, 0.0
        if t.wait >= 0 and events[t.wait].lag == 0:
            e = t.wait
            if e not in event_ready:
                event_ready[e] = max(finish[p] for p in events[e].producers)
                event_critical[e] = max(critical[p] for p in events[e].producers)
            ready, chain = event_ready[e], event_critical[e]
        heap = sm_heaps[task_rank[t.id]]
        critical[t.id] = chain + seconds[t.id]
        if t.wait >= 0 and events[t.wait].tail == t.id:
            last = max(events[t.wait].producers, key=lambda p: finish[p])
            sm_of[t.id] = _run_tail(heap, load, sm_of[last], ready, seconds[t.id])
            finish[t.id] = ready + seconds[t.id]
            continue
        free, sm_load, q = heapq.heappop(heap)
        start = max(free, ready)
        finish[t.id] = start + seconds[t.id]
        load[q] = sm_load + seconds[t.id]
        heapq.heappush(heap, (finish[t.id], load[q], q))
        queues[q].append(t.id)
        t.queue = sm_of[t.id] = q

    mean_load = sum(load) / len(load)
    stats = {
        "tail_tasks": sum(ev.tail >= 0 for ev in events),
        "cost_model": asdict(cost),
        "est_step_us": max(finish) * 1e6,
        "critical_path_us": max(critical) * 1e6,
        "sum_task_us": sum(seconds) * 1e6,
        "load_max_us": max(load) * 1e6,
        "load_mean_us": mean_load * 1e6,
        "load_balance": max(load) / mean_load if mean_load else 1.0,
        "bytes_per_step": sum(t.bytes for t in tasks),
        "bandwidth_floor_us": sum(t.bytes for t in tasks) / tp_size / cost.hbm_bytes_per_s * 1e6,
    }
    return queues, stats


def _run_tail(heap: list, load: list[float], q: int, ready: float, seconds: float) -> int:
    """Put a tail on SM `q` at `ready`: it delays whatever the SM was given after its producer."""
    i = next(i for i, (_, _, sm) in enumerate(heap) if sm == q)
    free, sm_load, _ = heap[i]
    load[q] = sm_load + seconds
    heap[i] = (max(free, ready) + seconds, load[q], q)
    heapq.heapify(heap)
    return q
