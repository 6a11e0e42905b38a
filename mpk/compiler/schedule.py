"""Static per-SM queues, balanced by a cost model, all in the one global topological order.

List scheduling: walk tasks in global order; each goes to the SM of its rank that frees up
first (ties to the least loaded), or where `follows` says to the SM of a task before it,
starting when both the SM and its event are ready. Because
every queue follows the global order, the earliest unfinished task is always at the head of its
queue with its producers done, so the schedule cannot deadlock.
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


def schedule(tasks: list[Task], events: list[Event], task_rank: list[int], tp_size: int, num_sms: int,
             cost: CostModel = CostModel(), follows: dict[int, int] | None = None):
    """Assign every task a queue on the SMs of its rank; return (queues, stats). `follows[t] = p`
    puts task t on the SM of task p, an earlier task of the same rank."""
    follows = follows or {}
    seconds = [cost.seconds(t, num_sms) for t in tasks]
    finish = [0.0] * len(tasks)
    event_ready: dict[int, float] = {}
    sm_heaps = [[(0.0, 0.0, r * num_sms + s) for s in range(num_sms)] for r in range(tp_size)]
    load = [0.0] * (tp_size * num_sms)
    queues: list[list[int]] = [[] for _ in range(tp_size * num_sms)]
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
        if t.id in follows:
            at = next(i for i, entry in enumerate(heap) if entry[2] == tasks[follows[t.id]].queue)
            free, sm_load, q = heap[at]
            heap[at] = heap[-1]
            heap.pop()
            heapq.heapify(heap)
        else:
            free, sm_load, q = heapq.heappop(heap)
        start = max(free, ready)
        finish[t.id] = start + seconds[t.id]
        critical[t.id] = chain + seconds[t.id]
        load[q] = sm_load + seconds[t.id]
        heapq.heappush(heap, (finish[t.id], load[q], q))
        queues[q].append(t.id)
        t.queue = q

    mean_load = sum(load) / len(load)
    stats = {
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

