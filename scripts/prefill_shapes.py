"""How many prefill passes and chunk shapes a burst of served prompts makes (no GPU, no model).

    python scripts/prefill_shapes.py [--prompts 180] [--prompt-len 512] [--prefill-rows 2048] [--block-rows 64]

replays the batcher's chunking (`mpk.batching.chunk_rows`, `chunk_granule`) over prompts drawn as
`mpk bench-serve` draws them (lengths within +-50% of the mean), all queued at once, and pads each
chunk as a CUDA graph replay does (`mpk.prefill_replay.replay_rows`). Every distinct (start, rows)
costs an eager pass and a capture the first two times it comes, so fewer shapes mean a cheaper burst.
`--granule` overrides the batcher's granule, to compare.
"""

from __future__ import annotations

import argparse
import random

from mpk.batching import chunk_granule, chunk_rows
from mpk.defaults import KV_BLOCK_ROWS
from mpk.prefill_replay import replay_rows
from mpk.serve.loadgen import length_range


def chunk_shapes(lengths: list[int], prefill_rows: int, granule: int, max_seq_len: int) -> list[tuple[int, int]]:
    """(start, padded rows) of every chunk, window by window, of prompts of `lengths` tokens."""
    left = [[0, n - 1] for n in lengths]  # rows prefilled, rows to go
    shapes = []
    while left:
        budget = prefill_rows
        for prompt in list(left):
            before, rows_left = prompt
            rows = chunk_rows(before, rows_left, budget, granule)
            if rows is None:
                break
            shapes.append((before, replay_rows(before, rows, max_seq_len)))
            prompt[0], prompt[1], budget = before + rows, rows_left - rows, budget - rows
            if prompt[1] == 0:
                left.remove(prompt)
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=180)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--prefill-rows", type=int, default=2048)
    ap.add_argument("--block-rows", type=int, default=KV_BLOCK_ROWS)
    ap.add_argument("--granule", type=int, default=None)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    lengths = [rng.randint(*length_range(args.prompt_len)) for _ in range(args.prompts)]
    granule = args.granule or chunk_granule(args.prefill_rows, args.block_rows)
    shapes = chunk_shapes(lengths, args.prefill_rows, granule, args.max_seq_len)
    print(f"granule {granule}: {len(shapes)} passes, {len(set(shapes))} distinct (start, rows) shapes")


if __name__ == "__main__":
    main()
