"""The CPU executor: runs a TaskGraph the way the megakernel would, one task at a time, in PyTorch.

Each SM's queue is replayed step after step; at every point a seeded random SM among those whose
head task's event has fired runs next, so steps overlap exactly as far as the events allow.
A task sees views of exactly the regions it declared. Activations and the KV cache start as NaN
(int tensors as a huge negative), so a read of anything the graph did not order before it shows.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable

import torch

from mpk.errors import MpkError
from mpk.ops import OP_KINDS
from mpk.taskgraph import TaskGraph

INT_POISON = -(2**62)

StepCallback = Callable[[int, dict[str, torch.Tensor]], bool]


def allocate(tg: TaskGraph, weights: dict[str, torch.Tensor], meta: dict[str, torch.Tensor], dtype: torch.dtype,
             device="cpu") -> dict[str, torch.Tensor]:
    """Buffers for every tensor of the graph: given weights and meta, poisoned activations and state.

    The CPU executor and the GPU runtime share it, so both start from the same poisoned state.
    """
    dtypes = {"model": dtype, "float32": torch.float32, "int64": torch.int64}
    bufs = {}
    for name, spec in tg.tensors.items():
        want = dtypes[spec.dtype]
        if spec.kind in ("weight", "meta"):
            given = (weights if spec.kind == "weight" else meta).get(name)
            if given is None:
                raise MpkError(f"no value given for {spec.kind} tensor {name!r} of shape {spec.shape}")
            if tuple(given.shape) != spec.shape:
                raise MpkError(f"{spec.kind} tensor {name!r} has shape {tuple(given.shape)}, the graph needs {spec.shape}")
            bufs[name] = given.to(device=device, dtype=want).contiguous()
        elif want == torch.int64:
            bufs[name] = torch.full(spec.shape, INT_POISON, dtype=want, device=device)
        else:
            bufs[name] = torch.full(spec.shape, float("nan"), dtype=want, device=device)
    return bufs


def _view(buf: torch.Tensor, box) -> torch.Tensor:
    return buf[tuple(slice(a, b) for a, b in box)]


def run(tg: TaskGraph, bufs: dict[str, torch.Tensor], num_steps: int, on_step: StepCallback | None = None,
        seed: int = 0) -> int:
    """Execute `num_steps` decode steps; returns the number run.

    `on_step(step, bufs)` is called once every sampling task of a step has run (the step's tokens
    are then in the `tokens` buffers and its logits complete); returning True stops after that step.
    """
    rng = random.Random(seed)
    counters = [0] * len(tg.events)
    head = [0] * tg.num_queues  # position in the queue, counting across steps
    qlen = [len(q) for q in tg.queues]
    sample_tasks = sum(1 for t in tg.tasks if tg.ops[t.op].kind == "sample")
    samples_done = defaultdict(int)
    waiting = defaultdict(list)  # event -> queues whose head waits on it
    ready: list[int] = []
    steps = num_steps

    def task_at(q):
        step, i = divmod(head[q], qlen[q]) if qlen[q] else (steps, 0)
        return (tg.tasks[tg.queues[q][i]], step) if step < steps else (None, step)

    def threshold(task, step):
        ev = tg.events[task.wait]
        return ev.target * (step + 1 - ev.lag)

    def park(q):
        task, step = task_at(q)
        if task is None:
            return
        if task.wait < 0 or counters[task.wait] >= threshold(task, step):
            ready.append(q)
        else:
            waiting[task.wait].append(q)

    for q in range(tg.num_queues):
        park(q)
    while ready:
        q = ready.pop(rng.randrange(len(ready)))
        task, step = task_at(q)
        if task is None:  # the run was stopped early after this queue was parked
            continue
        op = tg.ops[task.op]
        reads = [_view(bufs[r.tensor], r.box) for r in task.reads]
        writes = [_view(bufs[w.tensor], w.box) for w in task.writes]
        OP_KINDS[op.kind].run(op, task.tile, reads, writes, step)
        head[q] += 1
        for e in task.signals:
            counters[e] += 1
            still = []
            for wq in waiting.pop(e, []):
                wtask, wstep = task_at(wq)
                if wtask is not None and counters[e] >= threshold(wtask, wstep):
                    ready.append(wq)
                elif wtask is not None:
                    still.append(wq)
            if still:
                waiting[e] = still
        if op.kind == "sample":
            samples_done[step] += 1
            if samples_done[step] == sample_tasks and on_step is not None and on_step(step, bufs):
                steps = step + 1
        park(q)

    unfinished = [q for q in range(tg.num_queues) if task_at(q)[0] is not None]
    if unfinished:
        raise MpkError("the task graph stalled: " + _stall_report(tg, counters, unfinished, task_at, threshold))
    return steps


def _stall_report(tg, counters, queues, task_at, threshold) -> str:
    parts = []
    for q in queues[:4]:
        task, step = task_at(q)
        parts.append(
            f"SM {q % tg.num_sms} of rank {q // tg.num_sms} waits in step {step} with {tg.describe_task(task.id)} "
            f"on event {task.wait} ({counters[task.wait]}/{threshold(task, step)})"
        )
    more = f" and {len(queues) - 4} more" if len(queues) > 4 else ""
    return "; ".join(parts) + more
