"""The summary `mpk inspect` prints: tasks and events per op, fusion savings, balance, critical path."""

from __future__ import annotations

import re
from collections import defaultdict

from mpk.taskgraph import TaskGraph


def _op_family(name: str) -> str:
    """'rank1/layers.7.qkv' -> 'qkv': the same op of every layer and rank is one row."""
    return re.sub(r"^(rank\d+/)?(layers\.\d+\.)?", "", name)


def summarize(tg: TaskGraph, seconds: float) -> dict:
    rows: dict[str, dict] = {}
    instances = defaultdict(set)
    for i, op in enumerate(tg.ops):
        fam = _op_family(op.name)
        rows.setdefault(fam, {"op": fam, "kind": op.kind, "instances": 0, "tasks": 0, "events": 0})
        instances[fam].add(i)
    for fam, ops in instances.items():
        rows[fam]["instances"] = len(ops)
    for t in tg.tasks:
        rows[_op_family(tg.ops[t.op].name)]["tasks"] += 1
    for ev in tg.events:
        rows[_op_family(tg.ops[tg.tasks[ev.first_task].op].name)]["events"] += 1
    s = tg.stats
    m = tg.model
    return {
        "model": m.get("name") or m["architecture"],
        "architecture": m["architecture"],
        "layers": m["num_layers"],
        "batch": tg.batch,
        "tp": tg.tp_size,
        "num_sms": tg.num_sms,
        "max_seq_len": tg.max_seq_len,
        "ops": list(rows.values()),
        "tasks": len(tg.tasks),
        "events_unfused": s["events_unfused"],
        "events": len(tg.events),
        "event_savings": 1 - len(tg.events) / max(1, s["events_unfused"]),
        "dependency_edges": s["dependency_edges"],
        "event_edges": s["event_edges"],
        "load_max_us": s["load_max_us"],
        "load_mean_us": s["load_mean_us"],
        "load_balance": s["load_balance"],
        "critical_path_us": s["critical_path_us"],
        "est_step_us": s["est_step_us"],
        "bytes_per_step": s["bytes_per_step"],
        "bandwidth_floor_us": s["bandwidth_floor_us"],
        "verifier": s.get("verify", {"verdict": "not run"}),
        "seconds": seconds,
    }


def format_summary(d: dict) -> str:
    lines = [
        f"{d['model']} ({d['architecture']}, {d['layers']} layers): batch {d['batch']}, tp {d['tp']}, "
        f"{d['num_sms']} SMs per GPU, context {d['max_seq_len']}",
        "",
        f"  {'op':<16} {'kind':<24} {'instances':>9} {'tasks':>8} {'events':>7}",
    ]
    for r in d["ops"]:
        lines.append(f"  {r['op']:<16} {r['kind']:<24} {r['instances']:>9} {r['tasks']:>8} {r['events']:>7}")
    lines += [
        "",
        f"tasks            {d['tasks']:,} per step",
        f"events           {d['events_unfused']:,} unfused -> {d['events']:,} fused ({d['event_savings']:.1%} fewer); "
        f"dependency edges {d['dependency_edges']:,} -> {d['event_edges']:,} signals",
        f"load balance     max/mean {d['load_balance']:.3f} (per-SM cost max {d['load_max_us']:.0f} us, "
        f"mean {d['load_mean_us']:.0f} us)",
        f"critical path    {d['critical_path_us']:.0f} us; estimated step {d['est_step_us']:.0f} us; bandwidth floor "
        f"{d['bandwidth_floor_us']:.0f} us ({d['bytes_per_step'] / 1e9:.2f} GB moved per step)",
    ]
    v = d["verifier"]
    if v.get("verdict") == "pass":
        lines.append(f"verifier         PASS: {v['summary']} ({v['seconds']:.1f} s)")
    else:
        lines.append(f"verifier         {v.get('verdict', 'not run').upper()}")
    lines.append(f"compiled and verified in {d['seconds']:.1f} s")
    return "\n".join(lines)
