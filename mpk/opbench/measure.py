"""Times of a one-op graph from traced launches.

A trace (`RunResult.trace`) holds, per step and task, the %globaltimer nanoseconds at which the
task's SM began waiting, started it and finished it. Step 0 of a launch pays for the launch and
cold caches, so it is left out. Tasks never wait here, so the SMs drift apart across steps; the
time per step is therefore taken between the ends of steps, over many steps.
"""

from __future__ import annotations

import statistics

import torch

from mpk.errors import MpkError
from mpk.profile import task_parts_us


def _checked(spans: torch.Tensor) -> torch.Tensor:
    times = spans.to(torch.int64)
    if times.ndim != 3 or times.shape[0] < 2 or times.shape[2] != 3:
        raise MpkError(f"a one-op timing needs a trace of at least 2 steps, not one of shape {tuple(times.shape)}")
    if not bool((times[..., 2] > 0).all()):
        raise MpkError("the kernel's trace misses tasks: some task did not run")
    return times


def task_ns(spans: torch.Tensor) -> torch.Tensor:
    """Run time (start to end) of every task instance after step 0, flat."""
    times = _checked(spans)[1:]
    return (times[..., 2] - times[..., 1]).flatten()


def step_ns(spans: torch.Tensor) -> float:
    """Steady-state time per step: from the end of step 0 to the end of the last step, per step."""
    ends = _checked(spans)[..., 2].max(dim=1).values
    return float(ends[-1] - ends[0]) / (len(ends) - 1)


def median_task_us(traces: list[torch.Tensor]) -> float:
    """Median task run time over every traced launch, in microseconds."""
    return float(torch.cat([task_ns(t) for t in traces]).double().median()) / 1e3


def mean_task_us(traces: list[torch.Tensor]) -> float:
    """Mean task run time over every traced launch, in microseconds: unbiased even where the timer
    ticks coarsely against short tasks (the median then snaps to a tick)."""
    return float(torch.cat([task_ns(t) for t in traces]).double().mean()) / 1e3


def median_split_us(results: list) -> tuple[float, float] | None:
    """Medians over every traced launch (`RunResult`s, steps after 0) of a task's start -> inputs staged
    and staged -> warp 0 done, in microseconds (`mpk.profile.task_parts_us`); None when the template
    sets no marks."""
    if not results or any(r.marks is None for r in results):
        return None
    spans = torch.cat([r.trace[1:] for r in results])
    parts = task_parts_us(spans, torch.cat([r.marks[1:] for r in results]),
                          torch.ones(spans.shape[1], dtype=torch.bool))
    return (parts["staged_us"], parts["warp0_us"]) if parts else None


def median_step_us(traces: list[torch.Tensor]) -> float:
    """Median over launches of the steady-state time per step, in microseconds."""
    return statistics.median(step_ns(t) for t in traces) / 1e3
