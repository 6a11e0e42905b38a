"""Inputs and the reference check of a one-op program.

Every tensor the op reads gets fresh random contents; every tensor it writes starts poisoned (NaN,
or a huge negative integer), so the check also sees a region the kernel failed to write or wrote
without declaring it. The reference is the CPU executor (`mpk.sim`) running the op kind's PyTorch
code on CPU copies of the same inputs, at the same position.
"""

from __future__ import annotations

import math

import torch

from mpk.dtypes import torch_dtype
from mpk.errors import MpkError
from mpk.execution import INT_POISON
from mpk.graph import PROMPT_LEN, SAMPLE_FLOATS, SAMPLE_INTS
from mpk.taskgraph import TaskGraph

# ||gpu - ref|| / ||ref|| allowed per activation precision: summation order in float32; about one
# rounding of the output apart in bfloat16 (a dropped term of a 4096-long dot product is ~1.6e-2).
BOUNDS = {"float32": 1e-3, "bfloat16": 1e-2}


def written_tensors(tg: TaskGraph) -> list[str]:
    """The tensors some task of `tg` writes, in first-write order."""
    return list(dict.fromkeys(r.tensor for t in tg.tasks for r in t.writes))


def updated_tensors(tg: TaskGraph) -> set[str]:
    """Written tensors that some task also reads (a KV cache the one-pass attention reads and appends
    to): they start random, not poisoned, and their rows that are not written must stay."""
    read = {r.tensor for t in tg.tasks for r in t.reads}
    return {name for name in written_tensors(tg) if name in read}


def bound_for(tg: TaskGraph) -> float:
    if tg.precision.activations not in BOUNDS:
        raise MpkError(f"no reference bound for {tg.precision.activations} activations")
    return BOUNDS[tg.precision.activations]


def poison(buf: torch.Tensor) -> None:
    if buf.is_floating_point():
        buf.fill_(float("nan"))
    else:
        buf.fill_(INT_POISON)


def random_buffers(tg: TaskGraph, vocab: int, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A buffer for every tensor of `tg`: outputs poisoned (except `updated_tensors`), the rest random.

    Floats are standard normal (matrices scaled by 1/sqrt(columns), as trained weights roughly
    are, so the GEMV outputs stay O(1)); integers are token ids, except the prompt lengths, which
    are 1 so sampling picks from the candidates instead of replaying a prompt, and the sampling
    parameters, which are zero: greedy, what the GPU's sample template computes.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    outputs = set(written_tensors(tg)) - updated_tensors(tg)
    bufs = {}
    for name, spec in tg.tensors.items():
        want = torch_dtype(spec.dtype)
        if name in outputs:
            buf = torch.empty(spec.shape, dtype=want, device=device)
            poison(buf)
        elif name.split("@")[0] in (SAMPLE_FLOATS, SAMPLE_INTS):
            buf = torch.zeros(spec.shape, dtype=want, device=device)
        elif want.is_floating_point:
            buf = torch.randn(spec.shape, generator=gen, dtype=want, device=device)
            if spec.kind == "weight" and len(spec.shape) == 2:
                buf *= spec.shape[1] ** -0.5
        elif name.split("@")[0] == PROMPT_LEN:
            buf = torch.ones(spec.shape, dtype=want, device=device)
        else:
            buf = torch.randint(0, vocab, spec.shape, generator=gen, dtype=want, device=device)
        bufs[name] = buf
    return bufs


def reference_outputs(ref: TaskGraph, bufs: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """Run `ref` (a one-op graph whose tensors are a subset of `bufs`) for one step at position `step`
    on the CPU executor, from CPU copies of `bufs` with its outputs poisoned; return its outputs."""
    from mpk.sim import run

    outputs = written_tensors(ref)
    cpu = {name: bufs[name].detach().to("cpu", copy=True) for name in ref.tensors}
    for name in set(outputs) - updated_tensors(ref):
        poison(cpu[name])
    run(ref, cpu, 1, first_step=step)
    return {name: cpu[name] for name in outputs}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| over the elements the reference wrote; inf if the two wrote different
    elements or `got` is not finite where `want` is. Integers: the fraction that differ."""
    got = got.detach().cpu()
    if got.shape != want.shape:
        return math.inf
    if not want.is_floating_point():
        written = want != INT_POISON
        if not torch.equal(written, got != INT_POISON):
            return math.inf
        n = int(written.sum())
        return float((got[written] != want[written]).sum()) / n if n else 0.0
    written = ~torch.isnan(want)
    if not torch.equal(written, ~torch.isnan(got)):
        return math.inf
    g, w = got[written].double(), want[written].double()
    same = g == w  # also where both are the same infinity (the log-sum-exp of an empty split)
    if bool((~same & ~(torch.isfinite(g) & torch.isfinite(w))).any()):
        return math.inf
    diff = float(torch.where(same, torch.zeros_like(g), g - w).norm())
    norm = float(w[torch.isfinite(w)].norm())
    if diff == 0.0:
        return 0.0
    return diff / norm if norm > 0 else math.inf


def output_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """`relative_error` of every reference output."""
    return {name: relative_error(got[name], want[name]) for name in want}
