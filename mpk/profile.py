"""Per-SM task spans as a Chrome/Perfetto trace (JSON "trace event" format).

Input: the TaskGraph and `RunResult.trace` of a traced megakernel run: for each step and task,
the %globaltimer nanoseconds at which its SM began waiting for its event, started it, and finished.
A task that polls its inputs' tagged words (`OpKind.polls_inputs`) starts when the last of them is in.
Each SM is a thread of the trace; a task is a span named after its op, preceded by its wait.
Under tensor parallelism each GPU stamps its own timer, and GPUs' timers differ by some offset:
`align_rank_clocks` estimates the offsets from the cross-GPU waits and puts every rank on rank 0's.
"""

from __future__ import annotations

import json

import torch

from mpk.taskgraph import TaskGraph


def align_rank_clocks(tg: TaskGraph, spans: torch.Tensor) -> torch.Tensor:
    """The spans with every rank's times moved onto rank 0's timer.

    Rank b's timer reads rank a's plus some offset. A task on b that waits for tasks on a starts at
    least a wake latency after the last of them ends, so the least gap d(a, b) between such an end
    and start, in the two timers, is the shortest wake plus the offset, and d(b, a) the shortest wake
    minus it: the offset is (d(a, b) - d(b, a)) / 2, exact when the shortest wakes either way are
    equal. A rank with no waits in both directions with rank 0 keeps its own timer. A task that polls
    tagged words is stamped as starting when the last of them is in, which may be just before its
    producer stamps its end: a gap of either sign, the same either way, so it serves as well."""
    times = spans.to(torch.int64).clone()
    if tg.tp_size == 1 or times.shape[0] == 0:
        return times
    tp, big = tg.tp_size, 2**62
    rank = torch.tensor([tg.ops[t.op].rank for t in tg.tasks])
    recorded = times[..., 2] > 0
    # done[:, ev * tp + a]: when the last of event ev's producers on rank a ended (big if one is unrecorded).
    same_step = [i for i, ev in enumerate(tg.events) if not ev.lag]
    ev_of = torch.tensor([i for i in same_step for _ in tg.events[i].producers], dtype=torch.int64)
    producer = torch.tensor([p for i in same_step for p in tg.events[i].producers], dtype=torch.int64)
    key = (ev_of * tp + rank[producer]).expand(times.shape[0], -1)
    ends = torch.where(recorded[:, producer], times[:, producer, 2], big)
    done = torch.full((times.shape[0], len(tg.events) * tp), -1, dtype=torch.int64).scatter_reduce(1, key, ends, "amax")
    waiting = torch.tensor([t.id for t in tg.tasks if t.wait >= 0 and not tg.events[t.wait].lag], dtype=torch.int64)
    wait_of = torch.tensor([tg.tasks[c].wait for c in waiting.tolist()], dtype=torch.int64)
    start = torch.where(recorded[:, waiting], times[:, waiting, 1], -big)
    least = {}  # (producer rank, consumer rank): the least end-to-start gap seen
    for a in range(tp):
        last = done[:, wait_of * tp + a]
        gap = torch.where((last >= 0) & (last < big) & (start > -big), start - last, big)
        for b in range(tp):
            of_b = rank[waiting] == b
            if b != a and bool(of_b.any()) and int(gap[:, of_b].min()) < big:
                least[a, b] = int(gap[:, of_b].min())
    for r in range(1, tg.tp_size):
        if (0, r) in least and (r, 0) in least:
            offset = (least[0, r] - least[r, 0]) // 2
            times[:, rank == r] -= torch.where(recorded[:, rank == r, None], offset, 0)
    return times


def trace_events(tg: TaskGraph, spans: torch.Tensor, first_step: int = 0) -> list[dict]:
    """Trace events (microseconds from the first wait) for every recorded task instance, every
    rank's on rank 0's timer."""
    times = align_rank_clocks(tg, spans)
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


def summarize_trace(tg: TaskGraph, spans: torch.Tensor, marks: torch.Tensor | None = None) -> dict:
    """Where the SMs' time goes, per op kind, from a traced run (steps after the first).

    Per step and SM the time splits into running tasks, waiting for events, and the rest (the
    runtime between tasks: fetching the descriptor, signalling, issuing prefetches). `run_gbps`
    is a kind's bytes over its tasks' running time, times the SM count: the bandwidth the whole
    GPU would see if every SM ran that kind's tasks back to back. With `marks` (`RunResult.marks`)
    a kind whose template marks its tasks also gets the median split of a task's time: staging its
    inputs, warp 0's share of the work after that, the other warps' lag behind warp 0, and the rest
    until the task's end.
    """
    times = align_rank_clocks(tg, spans)[1:]  # step 0 includes the launch
    if times.shape[0] == 0 or not bool((times[..., 2] > 0).all()):
        raise ValueError("summarize_trace needs at least two fully recorded steps")
    steps = times.shape[0]
    wait, start, end = times[..., 0], times[..., 1], times[..., 2]
    run_ns = (end - start).double()
    wait_ns = (start - wait).double()
    step_ns = (end.max(1).values - wait.min(1).values).double()  # wall time of each step
    sm_ns = float(step_ns.sum()) * tg.num_queues
    # Per task over the steps, then per op kind (one bincount each instead of a loop over tasks).
    names = sorted({op.kind for op in tg.ops})
    kind_of = torch.tensor([names.index(tg.ops[t.op].kind) for t in tg.tasks])
    per_kind = {
        "tasks": torch.bincount(kind_of, minlength=len(names)).tolist(),
        "run_ns": torch.bincount(kind_of, run_ns.sum(0), minlength=len(names)).tolist(),
        "wait_ns": torch.bincount(kind_of, wait_ns.sum(0), minlength=len(names)).tolist(),
        "bytes": torch.bincount(kind_of, torch.tensor([t.bytes for t in tg.tasks], dtype=torch.float64), minlength=len(names)).tolist(),
    }
    wake = _wake_ns(tg, wait, start, end)
    span = _op_span_ns(tg, start, end)
    by_op = _tasks_by_op(tg)
    tail = _op_tail_ns(tg, end, by_op)
    rows = []
    for i, kind in enumerate(names):
        tasks, run, waited = per_kind["tasks"][i], per_kind["run_ns"][i], per_kind["wait_ns"][i]
        if tasks == 0:
            continue
        woke = wake[:, kind_of == i]
        woke = woke[woke >= 0]
        ops = [o for o, op in enumerate(tg.ops) if op.kind == kind]
        rows.append({
            "kind": kind,
            "tasks_per_step": tasks,
            "run_us_per_task": run / 1e3 / (tasks * steps),
            "run_share": run / sm_ns,
            "wait_share": waited / sm_ns,
            "run_gbps": per_kind["bytes"][i] * steps / (run * 1e-9) * tg.num_queues if run else 0.0,  # bytes/s
            "wake_us": float(woke.double().median()) / 1e3 if woke.numel() else 0.0,
            "op_span_us": float(span[:, ops].double().median()) / 1e3,
            "tail_us": float(tail[:, ops].double().median()) / 1e3,
        })
    if marks is not None:
        for row in rows:
            row.update(task_parts_us(spans[1:], marks[1:], kind_of == names.index(row["kind"])))
    rows.sort(key=lambda r: -r["run_share"])
    run_share = float(run_ns.sum()) / sm_ns
    wait_share = float(wait_ns.sum()) / sm_ns
    summary = {"steps": steps, "step_us": float(step_ns.mean()) / 1e3, "run_share": run_share,
               "wait_share": wait_share, "other_share": 1.0 - run_share - wait_share, "kinds": rows}
    layer = _layer_timeline(tg, start, end, by_op, spans[1:], None if marks is None else marks[1:])
    if layer:
        summary["layer"] = layer
    if tg.tp_size > 1:  # what tensor parallelism costs in waits: tasks whose event another GPU's tasks signal
        cross = _waits_on_peers(tg)
        woke = wake[:, cross]
        woke = woke[woke >= 0]
        summary["peer_wait_share"] = float(wait_ns[:, cross].sum()) / sm_ns
        summary["peer_wake_us"] = float(woke.double().median()) / 1e3 if woke.numel() else 0.0
    return summary


def task_parts_us(spans: torch.Tensor, marks: torch.Tensor, tasks: torch.Tensor) -> dict:
    """The medians, over the marked instances of the tasks selected by the boolean mask `tasks`, of
    start -> inputs staged (`staged_us`), staged -> warp 0 done (`warp0_us`), warp 0 -> the last warp
    done (`spread_us`) and the last warp -> end (`after_us`); empty where none is marked. Differences
    inside one task: one GPU's timer, no rank alignment needed."""
    start, end = spans[..., 1], spans[..., 2]
    staged, warp0, warps = marks[..., 0], marks[..., 1], marks[..., 2]
    sel = (staged > 0) & (warp0 > 0) & (warps > 0) & (end > 0) & tasks[None, :]
    if not bool(sel.any()):
        return {}
    return {"staged_us": _median_us(staged[sel] - start[sel]), "warp0_us": _median_us(warp0[sel] - staged[sel]),
            "spread_us": _median_us(warps[sel] - warp0[sel]), "after_us": _median_us(end[sel] - warps[sel])}


def _tasks_by_op(tg: TaskGraph) -> dict[int, list[int]]:
    """Each op's task ids (ops without tasks left out)."""
    by_op: dict[int, list[int]] = {}
    for t in tg.tasks:
        by_op.setdefault(t.op, []).append(t.id)
    return by_op


def _median_us(ns: torch.Tensor) -> float:
    """The median over the steps, in us."""
    return float(ns.double().median()) / 1e3


def _layer_timeline(tg: TaskGraph, start: torch.Tensor, end: torch.Tensor, by_op: dict[int, list[int]],
                    spans: torch.Tensor, marks: torch.Tensor | None) -> dict | None:
    """The middle layer's ops on rank 0, in order: when each first starts and last ends, in us from
    the layer's first task start, and its median task's running time (medians over the steps): where
    a layer's time goes, phase by phase. With `marks` (and the unaligned `spans` of the same steps),
    each op's `task_parts_us` too: the O and down projections apart, which one op kind holds."""
    layers = sorted({op.layer for op in tg.ops if op.layer is not None})
    if not layers:
        return None
    middle = layers[len(layers) // 2]
    ops = [o for o, op in enumerate(tg.ops) if op.layer == middle and op.rank == 0 and o in by_op]
    t0 = torch.stack([start[:, by_op[o]].min(1).values for o in ops]).min(0).values
    rows = []
    for o in ops:
        ids = by_op[o]
        rows.append({"op": tg.ops[o].name, "kind": tg.ops[o].kind, "tasks": len(ids),
                     "first_start_us": _median_us(start[:, ids].min(1).values - t0),
                     "last_end_us": _median_us(end[:, ids].max(1).values - t0),
                     "task_us": _median_us((end[:, ids] - start[:, ids]).double().median(1).values)})
        if marks is not None:
            rows[-1].update(task_parts_us(spans, marks, torch.isin(torch.arange(len(tg.tasks)), torch.tensor(ids))))
    rows.sort(key=lambda r: r["first_start_us"])
    return {"layer": middle, "ops": rows}


def _waits_on_peers(tg: TaskGraph) -> torch.Tensor:
    """[tasks] bool: the task's event has producers on another rank (GPU)."""
    rank = [tg.ops[t.op].rank for t in tg.tasks]
    producer_ranks = [{rank[p] for p in ev.producers} for ev in tg.events]  # once per event, not per consumer
    return torch.tensor([t.wait >= 0 and bool(producer_ranks[t.wait] - {rank[t.id]}) for t in tg.tasks],
                        dtype=torch.bool)


def _wake_ns(tg: TaskGraph, wait: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """[steps, tasks]: from the end of a task's last same-step producer to its start, where the task
    was already waiting then (the signal-to-start latency); -1 elsewhere."""
    steps, n = start.shape
    last_end = torch.full((steps, n), -1, dtype=torch.int64)
    for ev in tg.events:
        if ev.lag or not ev.producers:
            continue
        done = end[:, ev.producers].max(1).values
        last_end[:, ev.first_task:ev.stop_task] = done[:, None]
    wake = start - last_end
    return torch.where((last_end >= 0) & (wait <= last_end) & (wake >= 0), wake, torch.full_like(wake, -1))


def _op_span_ns(tg: TaskGraph, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """[steps, ops]: from an op's first task start to its last task end."""
    op_of = torch.tensor([t.op for t in tg.tasks])
    n_ops = len(tg.ops)
    first = torch.full((start.shape[0], n_ops), 2**62, dtype=torch.int64).scatter_reduce(1, op_of.expand_as(start), start, "amin")
    last = torch.zeros((start.shape[0], n_ops), dtype=torch.int64).scatter_reduce(1, op_of.expand_as(end), end, "amax")
    return last - first


def _op_tail_ns(tg: TaskGraph, end: torch.Tensor, by_op: dict[int, list[int]]) -> torch.Tensor:
    """[steps, ops]: from the median end of an op's tasks to its last task's end: how long the op's
    stragglers hold up its consumers once most of its tasks are done."""
    tail = torch.zeros((end.shape[0], len(tg.ops)), dtype=torch.int64)
    for op, ids in by_op.items():
        ends = end[:, ids]
        tail[:, op] = ends.max(1).values - ends.median(1).values
    return tail


def format_trace_summary(summary: dict) -> str:
    lines = [
        f"traced: {summary['step_us']:.1f} us per step over {summary['steps']} steps; SM time "
        f"{summary['run_share']:.1%} running, {summary['wait_share']:.1%} waiting, "
        f"{summary['other_share']:.1%} between tasks",
        f"  {'op kind':<24} {'tasks':>6} {'us/task':>8} {'running':>8} {'waiting':>8} {'GB/s in task':>13} "
        f"{'wake us':>8} {'op span us':>10} {'tail us':>8}",
    ]
    for r in summary["kinds"]:
        lines.append(f"  {r['kind']:<24} {r['tasks_per_step']:>6} {r['run_us_per_task']:>8.2f} "
                     f"{r['run_share']:>8.1%} {r['wait_share']:>8.1%} {r['run_gbps'] / 1e9:>13.0f} "
                     f"{r.get('wake_us', 0.0):>8.2f} {r.get('op_span_us', 0.0):>10.2f} {r.get('tail_us', 0.0):>8.2f}")
    parts = [r for r in summary["kinds"] if "staged_us" in r]
    if parts:
        lines.append("inside a task, us (medians): start -> inputs staged -> warp 0 done -> last warp done -> end")
        lines.append(f"  {'op kind':<24} {'staging':>8} {'warp 0':>8} {'spread':>8} {'after':>8}")
        for r in parts:
            lines.append(f"  {r['kind']:<24} {r['staged_us']:>8.2f} {r['warp0_us']:>8.2f} {r['spread_us']:>8.2f} "
                         f"{r['after_us']:>8.2f}")
    if "peer_wait_share" in summary:
        lines.append(f"waits on other GPUs' tasks: {summary['peer_wait_share']:.1%} of SM time, wake "
                     f"{summary['peer_wake_us']:.2f} us (median)")
    if "layer" in summary:
        lines.append(f"layer {summary['layer']['layer']}, us from its first task's start (medians over the steps):")
        marked = any("staged_us" in r for r in summary["layer"]["ops"])
        lines.append(f"  {'op':<32} {'tasks':>6} {'first start':>12} {'last end':>9} {'us/task':>8}"
                     + (f" {'staging':>8} {'warp 0':>8} {'spread':>8} {'after':>8}" if marked else ""))
        for r in summary["layer"]["ops"]:
            parts = "".join(f" {r[k]:>8.2f}" for k in ("staged_us", "warp0_us", "spread_us", "after_us") if k in r)
            lines.append(f"  {r['op']:<32} {r['tasks']:>6} {r['first_start_us']:>12.2f} {r['last_end_us']:>9.2f} "
                         f"{r['task_us']:>8.2f}{parts}")
    return "\n".join(lines)
