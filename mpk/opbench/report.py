"""Rows of `mpk bench-op` and their table.

Per op variant: the median time of one task running alone on one SM (what one SM's memory
pipeline does with one tile, and where the template marks its tasks, how long staging its inputs
and then warp 0's share took), and the time of the whole op with its tasks spread over all SMs
(what the template reaches when nothing waits), each as bytes moved per second; the aggregate as a
share of the streaming-read ceiling measured in the same process; and the error of the op's
outputs against its PyTorch reference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class OpRow:
    kind: str
    op: str  # the decode graph's op this one copies (the first of its variant)
    variant: str  # the C++ template instantiation
    tasks: int  # tasks of one instance of the op
    replicas: int  # instances per step (so a step streams from HBM, not L2)
    op_bytes: int  # bytes one instance moves per step
    op_flops: int  # floating-point operations of one instance (the op kind's cost model)
    task_us_1sm: float  # median task time, every task on one SM
    task_us_1sm_mean: float
    task_us_all: float  # median task time, tasks over all SMs
    op_us_all: float  # time per instance, tasks over all SMs
    error: float  # max over outputs of ||gpu - ref|| / ||ref||
    bound: float
    staged_us_1sm: float | None = None  # on one SM, median task start -> inputs staged (the template's marks)
    warp0_us_1sm: float | None = None  # and inputs staged -> warp 0 done; None: the template sets no marks

    @property
    def bytes_per_task(self) -> float:
        return self.op_bytes / self.tasks

    @property
    def gbps_per_sm(self) -> float:
        return self.bytes_per_task / self.task_us_1sm / 1e3 if self.task_us_1sm > 0 else math.inf

    @property
    def gbps_all(self) -> float:
        return self.op_bytes / self.op_us_all / 1e3 if self.op_us_all > 0 else math.inf

    @property
    def tflops_all(self) -> float:
        return self.op_flops / self.op_us_all / 1e6 if self.op_us_all > 0 else math.inf

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def as_dict(self, ceiling_gbps: float | None) -> dict:
        pct = 100.0 * self.gbps_all / ceiling_gbps if ceiling_gbps else None
        return {**asdict(self), "bytes_per_task": self.bytes_per_task, "gbps_per_sm": self.gbps_per_sm,
                "gbps_all": self.gbps_all, "tflops_all": self.tflops_all, "pct_of_ceiling": pct, "ok": self.ok}


def failures(result: dict) -> list[dict]:
    """The rows whose error is above their bound."""
    return [r for r in result["rows"] if not r["ok"]]


def format_op_bench(result: dict) -> str:
    ceiling = result.get("stream_read_gbps")
    graph = f"prefill of {result['prefill']} positions" if result.get("prefill") else f"context {result['context']}"
    lines = [
        f"{result['model']} batch {result['batch']} on {result['gpu']} ({result['num_sms']} SMs), "
        f"{result['activations']} activations, {graph}, {result['steps']} steps x "
        f"{result['repeats']} launch{'es' if result['repeats'] != 1 else ''}; streaming ceiling "
        + (f"{ceiling:.0f} GB/s" if ceiling else "not measured"),
        f"  {'kind':<22} {'variant':<40} {'tasks':>5} {'KB/task':>8} {'us/task':>8} {'GB/s/SM':>8} "
        f"{'us/op':>8} {'GB/s':>6} {'% ceil':>7} {'TFLOP/s':>8} {'error':>8} {'staging':>8} {'warp 0':>8}",
        f"  {'':<22} {'':<40} {'':>5} {'':>8} {'(1 SM)':>8} {'(1 SM)':>8} {'(all)':>8} {'(all)':>6} {'':>7} "
        f"{'(all)':>8} {'':>8} {'(1 SM)':>8} {'(1 SM)':>8}",
    ]
    for r in result["rows"]:
        pct = f"{r['pct_of_ceiling']:.1f}%" if r["pct_of_ceiling"] is not None else "-"
        err = f"{r['error']:.1e}" + ("" if r["ok"] else " FAIL")
        staged, warp0 = (f"{r[k]:.2f}" if r.get(k) is not None else "-" for k in ("staged_us_1sm", "warp0_us_1sm"))
        lines.append(f"  {r['kind']:<22} {r['variant']:<40} {r['tasks']:>5} {r['bytes_per_task'] / 1e3:>8.1f} "
                     f"{r['task_us_1sm']:>8.2f} {r['gbps_per_sm']:>8.1f} {r['op_us_all']:>8.2f} "
                     f"{r['gbps_all']:>6.0f} {pct:>7} {r.get('tflops_all', 0.0):>8.1f} {err:>8} {staged:>8} {warp0:>8}")
    return "\n".join(lines)
