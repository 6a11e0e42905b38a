"""Per-SM task spans as a Chrome/Perfetto trace (JSON "trace event" format).

Input: the TaskGraph and `RunResult.trace` of a traced megakernel run: for each step and task,
the %globaltimer nanoseconds at which its SM began waiting for its event, started it, and finished.
Each SM is a thread of the trace; a task is a span named after its op, preceded by its wait.
"""

from __future__ import annotations

import json

import torch

from mpk.taskgraph import TaskGraph


def trace_events(tg: TaskGraph, spans: torch.Tensor, first_step: int = 0) -> list[dict]:
    """Trace events (microseconds from the first wait) for every recorded task instance."""
    times = spans.to(torch.int64)
    recorded = times[..., 2] > 0
    origin = int(times[..., 0][recorded].min()) if bool(recorded.any()) else 0
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"mpk {tg.model.get('name', '')}"}}]
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": q, "args": {"name": f"SM {q}"}}
               for q in range(tg.num_queues)]
    for step, task in recorded.nonzero().tolist():
        wait, start, end = (int(v) - origin for v in times[step, task])
        t = tg.tasks[task]
        op = tg.ops[t.op]
        args = {"step": first_step + step, "task": task, "tile": list(t.tile), "event": t.wait}
        if start > wait:
            events.append({"name": "wait", "cat": "wait", "ph": "X", "pid": 0, "tid": t.queue,
                           "ts": wait / 1e3, "dur": (start - wait) / 1e3, "args": args})
        events.append({"name": op.name, "cat": op.kind, "ph": "X", "pid": 0, "tid": t.queue,
                       "ts": start / 1e3, "dur": (end - start) / 1e3, "args": args})
    return events


def write_trace(path: str, tg: TaskGraph, spans: torch.Tensor, first_step: int = 0) -> int:
    """Write the trace to `path` (open it in Perfetto or chrome://tracing); returns the number of spans."""
    events = trace_events(tg, spans, first_step)
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ns"}, f)
    return sum(1 for e in events if e["ph"] == "X")
