"""`mpk bench-op` on the GPU: every op variant of a model's decode graph, alone, timed and checked.

For each variant: a one-op graph (`mpk.opbench.program`) with every task on one SM, the same
tasks spread over all SMs, and its CPU reference. Both run on the megakernel runtime with traces,
`steps` steps per launch from position `context`, `repeats` launches after a warm-up; then the
all-SM graph runs one more step from freshly poisoned outputs, and those outputs are compared
with the reference's (`mpk.opbench.check`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mpk.errors import MpkError
from mpk.graph import DEFAULT_ACTIVATIONS
from mpk.opbench import DEFAULT_CONTEXT, DEFAULT_MODEL, DEFAULT_REPEATS, DEFAULT_STEPS
from mpk.opbench.check import (BOUNDS, bound_for, output_errors, poison, random_buffers, reference_outputs,
                               updated_tensors, written_tensors)
from mpk.opbench.measure import mean_task_us, median_split_us, median_step_us, median_task_us
from mpk.opbench.program import bench_ops, compile_one_op, op_bytes, replicas_for
from mpk.opbench.report import OpRow
from mpk.taskgraph import OpSpec, TaskGraph

WATCHDOG_SECONDS = 120.0  # tasks never wait here, so the SMs report no progress until the launch ends


@dataclass
class Plan:
    """The graphs of one op variant: every task on one SM, over all SMs, and the one-replica reference."""

    op: OpSpec
    replicas: int
    one_sm: TaskGraph
    all_sms: TaskGraph
    reference: TaskGraph


def run_op_bench(model: str = DEFAULT_MODEL, batch: int = 1, kinds: list[str] | None = None,
                 context: int = DEFAULT_CONTEXT, steps: int = DEFAULT_STEPS, repeats: int = DEFAULT_REPEATS,
                 activations: str = DEFAULT_ACTIVATIONS, seed: int = 0, prefill: int = 0) -> dict:
    """`prefill` > 0: the op variants of the prefill graph of a chunk of that many positions per
    sequence (GEMM tiles, causal attention) instead of the decode graph's."""
    from mpk.bench import stream_read_gbps
    from mpk.compiler import compile_model
    from mpk.models import resolve_model
    from mpk.prefill import compile_prefill

    device, gpu_name, num_sms, arch = gpu()
    if steps < 2:
        raise MpkError(f"--steps must be at least 2 (step 0 of a launch is not timed), not {steps}")
    if repeats < 1:
        raise MpkError(f"--repeats must be at least 1, not {repeats}")
    source = resolve_model(model)
    cfg = source.cfg
    if prefill:
        context = 0  # a prefill chunk's ops run at its own positions, whatever the step
    if context < 0 or context + steps > cfg.max_position_embeddings:
        raise MpkError(f"--context {context} with {steps} steps does not fit {source.name}'s "
                       f"{cfg.max_position_embeddings} positions")
    if prefill < 0 or prefill >= cfg.max_position_embeddings:
        raise MpkError(f"--prefill must be between 1 and {cfg.max_position_embeddings - 1} positions, not {prefill}")
    tg = compile_model(cfg, batch=batch, max_seq_len=max(context + steps, prefill + 1), num_sms=num_sms,
                       verify=False, activations=activations)
    if prefill:
        tg = compile_prefill(tg, cfg, prefill, verify=False)
    plans = [plan_op(cfg, tg, op, num_sms, context) for op in bench_ops(tg, kinds)]
    # The one-SM kernels carry the marks inside each task (the staging and warp-0 columns).
    prebuild([(p.all_sms, False) for p in plans] + [(p.one_sm, True) for p in plans], arch)
    ceiling = stream_read_gbps(device, 1 << 30, num_sms)
    # Prefill templates round GEMM and attention inputs to bf16, as PyTorch's fast prefill does.
    bound = BOUNDS["bfloat16"] if prefill else None
    rows = [bench_plan(p, cfg.vocab_size, device, context, steps, repeats, seed + i, bound)
            for i, p in enumerate(plans)]
    return {
        "model": source.name, "gpu": gpu_name, "num_sms": num_sms, "batch": batch, "activations": activations,
        "context": context, "steps": steps, "repeats": repeats, "stream_read_gbps": ceiling, "prefill": prefill,
        "rows": [r.as_dict(ceiling) for r in rows],
    }


def gpu() -> tuple[torch.device, str, int, str]:
    """The GPU to bench on: its device, name, SM count and build target."""
    from mpk.runtime import cuda_device
    from mpk.runtime.build import arch_for_capability

    device = cuda_device()
    props = torch.cuda.get_device_properties(device)
    return device, props.name, props.multi_processor_count, arch_for_capability(props.major, props.minor)


def plan_op(cfg, tg: TaskGraph, op: OpSpec, num_sms: int, context: int) -> Plan:
    replicas = replicas_for(cfg, tg, op, context)
    return Plan(op, replicas, compile_one_op(cfg, tg, op, 1, replicas), compile_one_op(cfg, tg, op, num_sms, replicas),
                compile_one_op(cfg, tg, op, 1))


def prebuild(graphs: list[tuple[TaskGraph, bool]], arch: str) -> None:
    """Build the kernel of every (graph, task_marks) now, in parallel (nvcc is single-threaded); later
    loads hit the cache."""
    from mpk.codegen import generate_source
    from mpk.runtime.build import build

    sources = list(dict.fromkeys(generate_source(g, marks) for g, marks in graphs))
    if not sources:
        return
    with ThreadPoolExecutor(max_workers=min(len(sources), os.cpu_count() or 1)) as pool:
        list(pool.map(lambda src: build(src, arch), sources))


def bench_plan(plan: Plan, vocab: int, device, context: int, steps: int, repeats: int, seed: int,
               bound: float | None = None) -> OpRow:
    from mpk.codegen import lower_op
    from mpk.runtime import Megakernel

    bufs = random_buffers(plan.all_sms, vocab, device, seed)
    want = reference_outputs(plan.reference, bufs, context)
    updated = {name: bufs[name].clone() for name in updated_tensors(plan.all_sms)}  # the timed steps append to them
    with Megakernel(plan.one_sm, device=device, buffers=bufs, task_marks=True) as kernel:
        one_sm_runs = _traced(kernel, context, steps, repeats)
        one_sm = [r.trace for r in one_sm_runs]
    with Megakernel(plan.all_sms, device=device, buffers=bufs) as kernel:
        all_sms = [r.trace for r in _traced(kernel, context, steps, repeats)]
        for name in written_tensors(plan.all_sms):
            if name in updated:
                bufs[name].copy_(updated[name])
            else:
                poison(bufs[name])
        _run(kernel, context, 1)
    errors = output_errors({name: bufs[name] for name in want}, want)
    del bufs
    torch.cuda.empty_cache()
    ref = plan.reference
    split = median_split_us(one_sm_runs)
    return OpRow(
        kind=plan.op.kind, op=plan.op.name, variant=str(lower_op(ref, ref.ops[0])[0]), tasks=len(ref.tasks),
        replicas=plan.replicas, op_bytes=op_bytes(ref, 0, context), op_flops=sum(t.flops for t in ref.tasks),
        task_us_1sm=median_task_us(one_sm), task_us_1sm_mean=mean_task_us(one_sm), task_us_all=median_task_us(all_sms),
        op_us_all=median_step_us(all_sms) / plan.replicas,
        error=max(errors.values()), bound=bound or bound_for(ref),
        staged_us_1sm=split[0] if split else None, warp0_us_1sm=split[1] if split else None,
    )


def _run(kernel, context: int, steps: int, trace: bool = False):
    result = kernel.run(steps, first_step=context, eos_token_ids=[], trace=trace, watchdog_seconds=WATCHDOG_SECONDS)
    if result.steps != steps:
        raise MpkError(f"the one-op kernel ran {result.steps} of {steps} steps")
    return result


def _traced(kernel, context: int, steps: int, repeats: int) -> list:
    """`repeats` traced launches (RunResults) after a warm-up."""
    _run(kernel, context, 2)  # warm-up: module load, first touch of every buffer
    return [_run(kernel, context, steps, trace=True) for _ in range(repeats)]
