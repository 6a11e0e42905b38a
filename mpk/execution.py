"""What both executors share: buffers for a graph's tensors, the shape of a run, and its result.

The CPU executor (`mpk.sim.CpuExecutor`) and the GPU megakernel (`mpk.runtime.Megakernel`) are both
`Executor`s: context managers holding one TaskGraph's buffers, run for a number of decode steps
with the same arguments and the same stop rule, returning a `RunResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from mpk.dtypes import torch_dtype
from mpk.errors import MpkError
from mpk.graph import LOGITS, PROMPT, PROMPT_LEN, TOKENS, tensor_name
from mpk.paging import SCRATCH_BLOCK, KvPages, storage_shape
from mpk.taskgraph import TaskGraph

INT_POISON = -(2**62)

# on_step(step, tokens): the step's token per sequence (prompt tokens included); True stops after it.
OnStep = Callable[[int, list[int]], bool | None]


@dataclass
class RunResult:
    tokens: list[list[int]]  # per step run, the token each sequence got (prompt tokens included)
    steps: int  # steps run
    seconds: float
    stopped: bool  # ended before num_steps: every sequence finished, or on_step asked to stop
    logits: list[torch.Tensor] = field(default_factory=list)  # per step [batch, vocab] float32, if collected
    trace: torch.Tensor | None = None  # [steps, tasks, 3] int64 ns: wait start, run start, end (if traced)
    marks: torch.Tensor | None = None  # [steps, tasks, 3] int64 ns inside the task: inputs staged, warp 0 done, last warp done (0: none)


def allocate(tg: TaskGraph, weights: dict[str, torch.Tensor], meta: dict[str, torch.Tensor],
             device="cpu", kv_pages: KvPages | None = None) -> dict[str, torch.Tensor]:
    """Buffers for every tensor of the graph, in the dtypes it declares: given weights and meta,
    poisoned activations and state (NaN, or a huge negative for integers), so a read of anything the
    graph did not order before it shows. `device` is one device, or a list of one per rank (each
    tensor goes to its owner's). With `kv_pages` the state (the KV cache) is block pools
    (`mpk.paging`)."""
    bufs = {}
    for name, spec in tg.tensors.items():
        device_of_rank = device[spec.rank] if isinstance(device, (list, tuple)) else device
        want = torch_dtype(spec.dtype)
        if spec.kind == "state" and kv_pages is not None:
            bufs[name] = torch.full(storage_shape(spec, kv_pages), float("nan"), dtype=want, device=device_of_rank)
            # The scratch block takes what sequences write past their blocks and gives it back to
            # them: garbage that must at least be finite.
            bufs[name][SCRATCH_BLOCK].zero_()
            continue
        if spec.kind in ("weight", "meta"):
            given = (weights if spec.kind == "weight" else meta).get(name)
            if given is None:
                raise MpkError(f"no value given for {spec.kind} tensor {name!r} of shape {spec.shape}")
            if tuple(given.shape) != spec.shape:
                raise MpkError(f"{spec.kind} tensor {name!r} has shape {tuple(given.shape)}, the graph needs {spec.shape}")
            bufs[name] = given.to(device=device_of_rank, dtype=want).contiguous()
        elif spec.kind == "mailbox":
            bufs[name] = torch.zeros(spec.shape, dtype=want, device=device_of_rank)
        elif want == torch.int64:
            bufs[name] = torch.full(spec.shape, INT_POISON, dtype=want, device=device_of_rank)
        else:
            bufs[name] = torch.full(spec.shape, float("nan"), dtype=want, device=device_of_rank)
    return bufs


def slot_buffers(tg: TaskGraph, home: dict[str, torch.Tensor], kv_pages: KvPages | None = None) -> dict[str, torch.Tensor]:
    """Buffers for `tg` (of `tg.batch` sequences) inside a larger graph's `home` buffers: the same
    weights, the first tg.batch sequences of its state (the KV cache: views, so both see one cache;
    a paged cache's pools whole, the block table saying whose rows are where), and meta (zeros) and
    activations (poisoned) of its own, on the same devices."""
    shared, own, meta = {}, {}, {}
    for name, spec in tg.tensors.items():
        if spec.kind == "weight":
            shared[name] = home[name]
        elif spec.kind == "state":
            shared[name] = home[name] if kv_pages is not None else home[name][: tg.batch]
        else:
            own[name] = spec
            if spec.kind == "meta":
                meta[name] = torch.zeros(spec.shape, dtype=torch_dtype(spec.dtype))
    for name, buf in shared.items():
        want = storage_shape(tg.tensors[name], kv_pages)
        if tuple(buf.shape) != want:
            raise MpkError(f"{name} is {tuple(buf.shape)} in the larger batch's buffers; {want} is needed")
    devices = {spec.rank: home[name].device for name, spec in tg.tensors.items() if name in shared}
    bufs = allocate(replace(tg, tensors=own), {}, meta, [devices[r] for r in range(tg.tp_size)])
    bufs.update(shared)
    return bufs


def per_sequence_limits(batch: int, max_new_tokens: int | Sequence[int | None] | None) -> list[int | None]:
    limits = [max_new_tokens] * batch if max_new_tokens is None or isinstance(max_new_tokens, int) \
        else list(max_new_tokens)
    if len(limits) != batch:
        raise MpkError(f"max_new_tokens has {len(limits)} entries for a batch of {batch}")
    return limits


def check_steps(tg: TaskGraph, first_step: int, num_steps: int, position_offsets=None) -> list[int]:
    """The per-sequence position offsets of a run of steps [first_step, first_step + num_steps),
    after checking that every sequence's positions fit the graph's context."""
    offsets = [0] * tg.batch if position_offsets is None else [int(o) for o in position_offsets]
    if len(offsets) != tg.batch:
        raise MpkError(f"position_offsets has {len(offsets)} entries for a batch of {tg.batch}")
    if num_steps < 1 or num_steps > tg.max_seq_len:
        raise MpkError(f"a run of {num_steps} steps does not fit the graph's context of {tg.max_seq_len} positions")
    if tg.one_step and num_steps != 1:
        raise MpkError(f"this graph runs one step per launch (a prefill chunk), not {num_steps}")
    for b, off in enumerate(offsets):
        lo, hi = first_step - off, first_step + num_steps - 1 - off
        if lo < 0 or hi >= tg.max_seq_len:
            raise MpkError(f"positions {lo}..{hi} of sequence {b} do not fit the graph's context of "
                           f"{tg.max_seq_len} positions")
    return offsets


class Executor:
    """One TaskGraph with its buffers, run step after step. Subclasses implement `run` and `close`."""

    tg: TaskGraph
    buffers: dict[str, torch.Tensor]
    kv_pages: KvPages | None = None  # None: each sequence's KV rows are contiguous
    kv_table: torch.Tensor | None = None  # with kv_pages: the block table [batch, blocks per sequence] int32

    def set_kv_table(self, table: torch.Tensor) -> None:
        """Which pool block holds each block of each sequence's KV rows (`mpk.paging.BlockPool.table`)."""
        if self.kv_pages is None:
            raise MpkError("this executor's KV cache is not paged; it takes no block table")
        want = self.kv_pages.table_shape(self.tg)
        if tuple(table.shape) != want:
            raise MpkError(f"the block table is {tuple(table.shape)}; this graph needs {want}")
        if int(table.min()) < 0 or int(table.max()) >= self.kv_pages.num_blocks:
            raise MpkError(f"the block table names blocks outside the pool's {self.kv_pages.num_blocks}")
        self.kv_table = table.to(torch.int32).cpu().contiguous()

    def check_kv_table(self) -> None:
        if self.kv_pages is not None and self.kv_table is None:
            raise MpkError("the KV cache is paged: set its block table (set_kv_table) before running")

    def run(self, num_steps: int, max_new_tokens: int | Sequence[int | None] | None = None,
            on_step: OnStep | None = None, *, first_step: int = 0, eos_token_ids: Sequence[int] | None = None,
            collect_logits: bool = False, position_offsets: Sequence[int] | None = None) -> RunResult:
        """Run decode steps [first_step, first_step + num_steps) and return their tokens.

        `on_step(step, tokens)` gets each step's tokens (one per sequence) as they are made;
        returning True stops the run after that step. A sequence is finished at EOS
        (`eos_token_ids`, default the model's) or after `max_new_tokens` new tokens (an int or one
        per sequence); the run stops by itself once all are. `collect_logits` keeps each step's
        logits [batch, vocab] (all ranks' vocabulary slices side by side). Sequence b is at
        position `step - position_offsets[b]` (default: every sequence at the step), so sequences
        that joined at different steps run together; with offsets the caller sets the tokens the
        first step feeds (`set_tokens`).
        """
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def set_meta(self, meta: dict[str, torch.Tensor]) -> None:
        """New prompts: overwrite the meta tensors (tokens, prompt, prompt_len) in place."""
        for name, value in meta.items():
            if name not in self.buffers or self.tg.tensors[name].kind != "meta":
                raise MpkError(f"{name!r} is not a meta tensor of this graph")
            self.buffers[name].copy_(value.to(self.buffers[name].dtype))

    def set_tokens(self, tokens: Sequence[int]) -> None:
        """The token each sequence feeds the next step (one per sequence), on every rank."""
        value = torch.tensor(list(tokens), dtype=torch.int64)
        for r in range(self.tg.tp_size):
            buf = self.buffers[tensor_name(r, self.tg.tp_size, TOKENS)]
            buf.copy_(value.to(buf.device))

    def restart_tokens(self) -> None:
        """Step 0 embeds each prompt's first token; a previous run left its last ones in TOKENS."""
        for r in range(self.tg.tp_size):
            n = tensor_name(r, self.tg.tp_size, TOKENS)
            self.buffers[n].copy_(self.buffers[tensor_name(r, self.tg.tp_size, PROMPT)][:, 0])

    def prompt_lengths(self) -> list[int]:
        return self.buffers[tensor_name(0, self.tg.tp_size, PROMPT_LEN)].tolist()

    def logits(self) -> torch.Tensor:
        """This step's logits of every rank, side by side: [batch, vocab] float32 on the CPU."""
        parts = [self.buffers[tensor_name(r, self.tg.tp_size, LOGITS)] for r in range(self.tg.tp_size)]
        return torch.cat([p.float().cpu() for p in parts], dim=1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
