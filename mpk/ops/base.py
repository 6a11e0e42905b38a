"""What every op kind provides: its tiling into tasks (with regions and cost) and its reference compute.

`tiles` decides which boxes of which tensors one task reads and writes. `run` is the PyTorch
reference of one task: it receives views of exactly its declared regions (reads, then writes, in
the order `tiles` listed them) and may touch nothing else. Regions that depend on run-time values
(the KV rows up to the current position, the embedding row of the current token) declare their
static upper bound; `run` narrows them with the step index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mpk.taskgraph import OpSpec, Region

DTYPE_BYTES = {"model": 2, "float32": 4, "int64": 8}  # "model" is costed as bf16, the GPU dtype


@dataclass
class TileTask:
    tile: tuple[int, ...]
    reads: list[Region]
    writes: list[Region]
    bytes: int
    flops: int


class OpKind:
    """One fused decode operator."""

    def tiles(self, op: OpSpec, prog) -> list[TileTask]:
        raise NotImplementedError

    def run(self, op: OpSpec, tile: tuple, reads: list[torch.Tensor], writes: list[torch.Tensor], step: int) -> None:
        raise NotImplementedError


def region(tensor: str, *ranges: tuple[int, int]) -> Region:
    return Region(tensor, tuple((int(a), int(b)) for a, b in ranges))


def whole(prog, tensor: str) -> Region:
    return Region(tensor, prog.tensor(tensor).full_box())


def nbytes(prog, r: Region) -> int:
    n = 1
    for a, b in r.box:
        n *= b - a
    return n * DTYPE_BYTES[prog.tensor(r.tensor).dtype]


def spans(n: int, tile: int) -> list[tuple[int, int]]:
    """[start, stop) pieces of length `tile` covering range(n); the last may be shorter."""
    return [(i, min(n, i + tile)) for i in range(0, n, tile)]


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers computes it: normalize in float32, cast back, then scale in the input dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias), with the activation precision the graph chose.

    Activations in the weights' dtype: transformers' semantics, the output rounded to that dtype.
    Float32 activations over bf16 weights: the weights are widened and the product is float32 (the
    input is never rounded: that rounding alone puts a 36-layer model 2e-2 from float32).
    """
    if x.dtype == weight.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x, weight.float(), None if bias is None else bias.float())
