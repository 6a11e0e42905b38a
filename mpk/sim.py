"""The CPU executor: runs a TaskGraph the way the megakernel would, one task at a time, in PyTorch.

Each SM's queue is replayed step after step; at every point a seeded random SM among those whose
head task's event has fired runs next, so steps overlap exactly as far as the events allow.
A task sees views of exactly the regions it declared, bound by role. Activations and the KV cache
start poisoned (`mpk.execution.allocate`), so a read of anything the graph did not order before it
shows.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import Callable

import torch

from mpk.errors import MpkError
from mpk.execution import Executor, RunResult, allocate, check_steps, per_sequence_limits
from mpk.graph import TOKENS, tensor_name
from mpk.ops import OP_KINDS
from mpk.paging import KvPages, gather, scatter
from mpk.taskgraph import TaskGraph

# step_done(step, buffers) after every sampling task of a step has run; True stops after that step.
StepDone = Callable[[int, dict[str, torch.Tensor]], bool]


def _view(buf: torch.Tensor, box) -> torch.Tensor:
    return buf[tuple(slice(a, b) for a, b in box)]


def run(tg: TaskGraph, bufs: dict[str, torch.Tensor], num_steps: int, step_done: StepDone | None = None,
        seed: int = 0, first_step: int = 0, position_offsets: list[int] | None = None,
        kv_table: torch.Tensor | None = None) -> int:
    """Execute decode steps [first_step, first_step + num_steps); returns the number run. Sequence b
    is at position step - position_offsets[b] (default: the step). With `kv_table` the state
    buffers are paged pools (`mpk.paging`): a task gets copies of its state regions, and what it
    writes there goes back to the pool's blocks."""
    offsets = position_offsets or [0] * tg.batch
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
        paged = {r.role for r in task.reads + task.writes if kv_table is not None and tg.tensors[r.tensor].kind == "state"}
        views = {r.role: gather(bufs[r.tensor], kv_table, r.box) if r.role in paged else _view(bufs[r.tensor], r.box)
                 for r in task.reads + task.writes}
        kind = OP_KINDS[op.kind]
        at = first_step + step
        kind.run(op, task.tile, views, at - offsets[task.tile[0]] if kind.per_sequence else at)
        for r in task.writes:
            if r.role in paged:
                scatter(bufs[r.tensor], kv_table, r.box, views[r.role])
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
            if samples_done[step] == sample_tasks and step_done is not None and step_done(first_step + step, bufs):
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


class CpuExecutor(Executor):
    """The CPU executor behind the same run shape as the megakernel (`mpk.execution.Executor`)."""

    def __init__(self, tg: TaskGraph, weights: dict[str, torch.Tensor], meta: dict[str, torch.Tensor], seed: int = 0,
                 buffers: dict[str, torch.Tensor] | None = None, kv_pages: KvPages | None = None):
        self.tg, self.seed, self.kv_pages = tg, seed, kv_pages
        self.buffers = dict(buffers) if buffers is not None else allocate(tg, weights, meta, kv_pages=kv_pages)

    def run(self, num_steps, max_new_tokens=None, on_step=None, *, first_step=0, eos_token_ids=None,
            collect_logits=False, position_offsets=None) -> RunResult:
        tg = self.tg
        offsets = check_steps(tg, first_step, num_steps, position_offsets)
        self.check_kv_table()
        limits = per_sequence_limits(tg.batch, max_new_tokens)
        eos = set(tg.model.get("eos_token_ids", ()) if eos_token_ids is None else eos_token_ids)
        if first_step == 0 and position_offsets is None:
            self.restart_tokens()
        prompt_len = self.prompt_lengths()
        finished = [False] * tg.batch
        tokens: list[list[int]] = []
        logits: list[torch.Tensor] = []
        token_buf = self.buffers[tensor_name(0, tg.tp_size, TOKENS)]

        def step_done(step: int, bufs) -> bool:
            toks = token_buf.tolist()
            tokens.append(toks)
            if collect_logits:
                logits.append(self.logits())
            # The kernel's rule: new tokens start at the prompt's last position.
            for b, tok in enumerate(toks):
                made = step - offsets[b] - prompt_len[b] + 2
                if made >= 1 and (tok in eos or (limits[b] is not None and made >= limits[b])):
                    finished[b] = True
            asked = on_step is not None and bool(on_step(step, toks))
            return asked or all(finished)

        t0 = time.perf_counter()
        steps = run(tg, self.buffers, num_steps, step_done, self.seed, first_step, offsets, self.kv_table)
        return RunResult(tokens, steps, time.perf_counter() - t0, steps < num_steps, logits)

    def close(self) -> None:
        self.buffers = {}
