"""Sampling one token from a logits row: temperature, top-k, top-p, and a counter-based RNG.

The random draw is a pure function of (seed, position): two rounds of the splitmix64 finalizer,
53 bits of which make a uniform in [0, 1). Nothing depends on the order tasks run in or on which
other sequences share the batch, and the same integer arithmetic runs on a GPU (uint64 multiply,
xor, shift) to give the same draw there. The token is the inverse CDF of the truncated
distribution at that draw, over the tokens sorted by probability (ties: lower id first).
"""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit integers that scatters every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def uniform(seed: int, position: int) -> float:
    """The draw for the token sampled at `position` of a sequence seeded with `seed`, in [0, 1)."""
    return (mix64(mix64(seed & MASK64) ^ (position & MASK64)) >> 11) * 2.0**-53


def truncated_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution sampled from: (token ids, their probabilities), most likely first, with
    only the tokens top-k and top-p keep. `top_k` <= 0 keeps all; `top_p` 1.0 keeps all."""
    scaled = logits.float() / temperature
    order = torch.sort(scaled, descending=True, stable=True).indices
    if 0 < top_k < len(order):
        order = order[:top_k]
    probs = torch.softmax(scaled[order], dim=0)
    if top_p < 1.0:
        before = torch.cumsum(probs, dim=0) - probs  # mass of the tokens ahead of each one
        keep = max(1, int((before < top_p).sum()))  # the smallest prefix reaching top_p; never empty
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return order, probs


def greedy(logits: torch.Tensor) -> int:
    """argmax, ties to the lowest token id."""
    return int(torch.argmax(logits.float()))


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int, position: int) -> int:
    """The token for this logits row; greedy when `temperature` is 0."""
    if temperature <= 0:
        return greedy(logits)
    ids, probs = truncated_probs(logits, temperature, top_k, top_p)
    cdf = torch.cumsum(probs.double(), dim=0)
    i = int(torch.searchsorted(cdf, uniform(seed, position) * float(cdf[-1]), right=True))
    return int(ids[min(i, len(ids) - 1)])
