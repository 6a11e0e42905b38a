"""Continuous batching: requests join and leave the sequence slots of one batch between windows of steps.

The KV cache has `slots` sequence slots; a slot holds one request or none. Before each window of
decode steps the batcher hands back the requests that finished (or whose callers cancelled them),
moves the rest to the lowest slots, and fills free slots from its queue, prefilling each new
prompt into its own slot's rows of the KV cache (`mpk.prefill.prefill_slot`). The window then runs
the smallest executor of 1, 2, 4, ... slots that holds the requests (all share the weights and the
KV cache: `LLM._slots_executor`), so one request decodes at batch-1 speed. Every slot decodes at
its own position (`Executor.run`'s position_offsets): a request that joins at kernel step s with p
positions prefilled has offset s - p. A window ends after `window` steps, when every sequence has
finished, or as soon as every request in it is finished or cancelled; a slot whose request
finished earlier idles until then. Idle slots in the window's batch decode a one-token dummy
prompt from position 0.

Windows end only where no running request continues past them (their natural end, or every
request done), so the tokens the host has are all the kernel made, and a request's next window
picks up from its last token. Results match `LLM.generate` for the same prompt and seed.

With a paged KV cache (`mpk.paging`) a new prompt is prefilled in chunks instead, at most
`prefill_rows` prompt rows per window across the slots still prefilling (in the order they were
admitted), so a long prompt does not stall the running requests' decode for its whole prefill:
each window first runs its chunks, then the decode steps of the slots whose prompts are in. Slots
still prefilling are moved after those, so the window's batch holds only the decoding ones; one
that falls inside it (the batch rounds up to a power of two) is an idle slot whose block-table row
is the scratch block, so the dummy steps never touch its rows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from mpk.errors import MpkError

DEFAULT_WINDOW = 16  # steps per window: how long a new request may wait for a slot to free up
DEFAULT_PREFILL_ROWS = 2048  # prompt rows prefilled per window with a paged cache (docs/decisions.md, chunked prefill)


@dataclass
class Request:
    """One generation. The batcher calls `on_token(token)` for each new token, `on_text(delta)` for
    text that became final, then exactly one of `on_done(RequestOutput)` or `on_error(exception)`,
    all on its own thread."""

    prompt_ids: list[int]
    params: object  # mpk.api.SamplingParams
    on_token: Callable[[int], None] | None = None
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[object], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class EngineTime:
    """Where the batcher's windows spent their time (seconds, summed), and the decode steps they ran:
    `window` - `prefill` - `decode` is the host's own work between and around them."""

    window: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    prefill_rows: int = 0  # prompt rows prefilled
    steps: int = 0  # decode steps
    slot_steps: int = 0  # decode steps x the batch each ran (idle slots included)
    busy_slot_steps: int = 0  # decode steps x the requests their windows held


@dataclass
class _Slot:
    request: Request
    seq: object  # mpk.api._Sequence
    seed: int
    offset: int  # the slot's position is step - offset (once its prompt is prefilled)
    next_token: int  # what the slot feeds the next step
    prefilled: int = 0  # prompt rows in the KV cache
    ready: bool = True  # the prompt is prefilled: the slot decodes
    admitted: int = 0  # the order requests took slots in: prompts prefill in this order

    def finished(self) -> bool:
        return self.seq.finish_reason is not None or self.request.cancel.is_set()


def chunk_granule(prefill_rows: int, block_rows: int) -> int:
    """The rows a served prompt's chunk that stops short of its end stops on a multiple of: a quarter
    of a window's budget, in whole KV blocks. No pass of a few rows (each costs about as much as a full
    one), and few chunk shapes (each new one costs a CUDA graph capture: mpk.prefill_replay)."""
    return min(max(block_rows, prefill_rows // 4 // block_rows * block_rows), prefill_rows)


def chunk_rows(before: int, left: int, budget: int, granule: int) -> int | None:
    """Rows of a prompt's next chunk, `before` rows prefilled and `left` to go, within a window's
    remaining `budget`: all that are left when they fit, else up to the last multiple of `granule`
    inside the budget; None when that is none (the prompt waits for the next window)."""
    if left <= budget:
        return left
    rows = (before + budget) // granule * granule - before
    return rows if rows > 0 else None


class Batcher:
    """Runs the requests given to `submit` in the slots of one executor of `llm`, window by window
    (`run_window`), on the caller's thread."""

    def __init__(self, llm, slots: int | None = None, window: int = DEFAULT_WINDOW,
                 prefill_rows: int = DEFAULT_PREFILL_ROWS):
        if window < 1:
            raise MpkError(f"a batching window needs at least one step, not {window}")
        if prefill_rows < 1:
            raise MpkError(f"a window prefills at least one prompt row, not {prefill_rows}")
        self.llm, self.window, self.prefill_rows = llm, window, prefill_rows
        self.tg, self.executor = llm._executor(slots or llm.max_batch)  # the home of the weights and the KV cache
        self.pool = llm._block_pool(self.tg.batch)  # a paged cache's blocks, or None
        self.slots: list[_Slot | None] = [None] * self.tg.batch
        self.sizes = sorted({min(self.tg.batch, 1 << i) for i in range(self.tg.batch.bit_length() + 1)})
        self.last_batch = 0  # the batch size the last window ran
        self.time = EngineTime()
        self.step = 0  # the kernel's next step; positions are relative to it
        self._queue: deque[Request] = deque()
        self._lock = threading.Lock()
        self._admitted = 0  # slots handed out so far
        self._prefills: dict = {}
        from mpk.prefill_replay import PrefillReplays

        self.replays = PrefillReplays()  # a paged GPU cache's prefill chunks as CUDA graphs; chunk counts

    def prepare(self) -> None:
        """Build and open the executor of every batch size now, not when a window first needs it; on
        the GPU also run a short prefill and one of a window's `prefill_rows`, so the first request does
        not pay for the prefill path's first use (cuBLAS and attention kernels loading, workspaces)."""
        from mpk.prefill import prefill_slot

        self.llm._build_kernels(self.tg.batch, self.sizes)
        for batch in self.sizes:
            self.llm._slots_executor(self.tg.batch, batch)
        if self.llm.backend == "cuda" and self.llm.prefill and self.tg.max_seq_len > 2:
            if self.pool is not None:  # no slot holds blocks yet: every row goes to the scratch block
                self.executor.set_kv_table(self.pool.table())
            for rows in sorted({2, min(self.prefill_rows, self.tg.max_seq_len - 1)}):  # slot 0 holds no request
                prefill_slot(self.executor, self.llm.cfg, [0] * (rows + 1), 0, {}, fast=True)

    # --- the queue (any thread) ----------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request; raises MpkError at once for one that cannot run."""
        llm = self.llm
        _, ids = llm._encode([request.prompt_ids])
        request.prompt_ids = ids[0]
        llm._check_fits(ids, [request.params])
        if self.pool is not None:
            need = self.pool.blocks_for(min(_rows(request), self.pool.max_seq_len))
            if need > self.pool.num_blocks - 1:
                raise MpkError(f"the request needs {need} KV blocks of {self.pool.block_rows} rows and the cache has "
                               f"{self.pool.num_blocks - 1}; ask for fewer tokens, or give the cache more blocks")
        if request.params.stop and llm.tokenizer is None:
            raise MpkError(f"stop strings need a tokenizer, and {llm.source.name} has none")
        with self._lock:
            self._queue.append(request)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def kv_rows_in_use(self) -> int:
        """KV cache rows the running requests hold: with a paged cache, in their blocks; else the rows
        they have written (each slot owning max_seq_len rows)."""
        if self.pool is not None:
            return self.pool.in_use * self.pool.block_rows
        return sum(self.step - s.offset for s in self.slots if s is not None)

    def kv_blocks_in_use(self) -> int | None:
        """Blocks of a paged KV cache the running requests hold (None: the cache is not paged)."""
        return None if self.pool is None else self.pool.in_use

    # --- windows (one thread) ------------------------------------------------------------------

    def run_window(self) -> bool:
        """Admit what fits, run one window, hand back what finished; False when there was nothing to run."""
        t0 = time.perf_counter()
        self._admit()
        if not any(self.slots):
            return False
        try:
            self._run()
        except BaseException as e:  # every request of the window gets the error; the batcher carries on
            for b, slot in enumerate(self.slots):
                if slot is not None:
                    self._fail(b, slot.request, e)
            if not isinstance(e, Exception):
                raise
            return True
        finally:
            self.time.window += time.perf_counter() - t0
        self._retire()
        return True

    def _prefill(self, *args, **kwargs) -> int:
        """`mpk.prefill.prefill_slot` on this batcher's executor, timed."""
        from mpk.prefill import prefill_slot

        t0 = time.perf_counter()
        try:
            done = prefill_slot(self.executor, self.llm.cfg, *args, programs=self._prefills,
                                fast=self.llm.backend == "cuda", replays=self.replays, **kwargs)
        finally:
            self.time.prefill += time.perf_counter() - t0
        self.time.prefill_rows += done - kwargs.get("cached", 0)
        return done

    def _admit(self) -> None:
        from mpk.api import _Sequence

        llm = self.llm
        for b in range(len(self.slots)):
            if self.slots[b] is not None:
                continue
            request = self._next_request()
            if request is None:
                return
            ids, sp = request.prompt_ids, request.params
            cached = 0  # prompt rows a paged cache holds already (a shared prefix)
            if self.pool is not None:
                cached = self.pool.share(b, ids) if llm.prefill else 0
                if not self.pool.reserve(b, _rows(request)):  # it waits for blocks to come back
                    self.pool.release(b)
                    with self._lock:
                        self._queue.appendleft(request)
                    return
                self.pool.grow(b, len(ids))
            seq = _Sequence(ids, sp, llm._decode, llm._eos(sp))
            slot = _Slot(request, seq, sp.run_seed(), self.step, ids[0], prefilled=cached, ready=False,
                         admitted=self._admitted)
            self._admitted += 1
            if self.pool is None or not llm.prefill:  # the whole prompt now (or none of it: decode steps)
                try:
                    done = self._prefill(ids, b) if llm.prefill else 0
                except Exception as e:
                    self._fail(b, request, e)
                    continue
                slot.prefilled = done
                self._ready(slot)
            self.slots[b] = slot

    def _ready(self, slot: _Slot) -> None:
        """The slot's prompt rows are in: it decodes from its prompt's next position in the next window."""
        slot.ready, slot.offset = True, self.step - slot.prefilled
        slot.next_token = slot.request.prompt_ids[slot.prefilled]

    def _prefill_chunks(self) -> None:
        """Up to `prefill_rows` rows of the prompts still prefilling, in the order they were admitted
        (paged cache)."""
        budget = self.prefill_rows
        granule = chunk_granule(self.prefill_rows, self.pool.block_rows)
        waiting = self._prefilling()
        if waiting:  # their blocks are taken: one table
            self.executor.set_kv_table(self.pool.table())
        for b in waiting:
            slot = self.slots[b]
            ids = slot.request.prompt_ids
            before = slot.prefilled
            rows = chunk_rows(before, len(ids) - 1 - before, budget, granule)
            if rows is None:
                break
            try:
                slot.prefilled = self._prefill(ids, b, cached=before, limit=rows)
            except Exception as e:
                self._fail(b, slot.request, e)
                continue
            budget -= slot.prefilled - before
            self.pool.publish(b, ids, slot.prefilled)
            if slot.prefilled >= len(ids) - 1:
                self._ready(slot)

    def _next_request(self) -> Request | None:
        while True:
            with self._lock:
                if not self._queue:
                    return None
                request = self._queue.popleft()
            if not request.cancel.is_set():
                return request
            _finish(request, [], "", None)  # its caller left while it waited

    def _prefilling(self) -> list[int]:
        """The slots whose prompts are still prefilling (a paged cache's), in admission order."""
        return sorted((b for b, s in enumerate(self.slots) if s is not None and not s.ready),
                      key=lambda b: self.slots[b].admitted)

    def _compact(self) -> None:
        """Move requests into the lowest slots, each with its KV rows, so the smallest batch holds the
        ones that decode: those first, then prompts still prefilling (a paged cache's, in admission
        order), which the window's batch need not cover. A paged cache's blocks change hands; a
        contiguous cache's rows are copied (its slots all decode, so they only move down)."""
        order = [b for b, s in enumerate(self.slots) if s is not None and s.ready] + self._prefilling()
        if order == list(range(len(order))):
            return
        if self.pool is not None:
            self.pool.arrange(order)
        else:
            for free, b in enumerate(order):
                if b == free:
                    continue
                rows = self.step - self.slots[b].offset  # the rows it has written
                for name, spec in self.tg.tensors.items():
                    if spec.kind == "state":
                        buf = self.executor.buffers[name]
                        buf[free, :rows].copy_(buf[b, :rows])
        self.slots = [self.slots[b] for b in order] + [None] * (len(self.slots) - len(order))

    def _release(self, b: int) -> None:
        if self.pool is not None:
            self.pool.release(b)

    def _fail(self, b: int, request: Request, e: BaseException) -> None:
        """Slot b's request ends with error `e`; the slot and its blocks are free again."""
        self.slots[b] = None
        self._release(b)
        if request.on_error is not None:
            request.on_error(e)

    def _run(self) -> None:
        from mpk.inputs import program_meta

        if self.pool is not None:
            self._prefill_chunks()
        self._compact()
        llm, S, first = self.llm, self.tg.max_seq_len, self.step
        active = [s for s in self.slots if s is not None and s.ready]  # slots [0, len(active))
        if not active:  # every prompt here is still prefilling: this window was its chunks
            return
        batch = next(k for k in self.sizes if k >= len(active))
        tg, executor = llm._slots_executor(self.tg.batch, batch)
        self.last_batch = batch
        prefilling = [s is not None and not s.ready for s in self.slots[:batch]]
        slots = [None if busy else s for s, busy in zip(self.slots[:batch], prefilling)]
        # Idle slots (and slots still prefilling) start a dummy sequence at position 0 and are done
        # after one token.
        offsets = [s.offset if s is not None else first for s in slots]
        steps = min([self.window, S] + [S - (first - s.offset) for s in active])
        prompts = [s.request.prompt_ids if s is not None else [0] for s in slots]
        sampling = [s.request.params.sample_row(s.seed) if s is not None else (0.0, 0, 1.0, 0) for s in slots]
        limits = [s.request.params.max_tokens if s is not None else 1 for s in slots]
        executor.set_meta(program_meta(tg, prompts, sampling))
        executor.set_tokens([s.next_token if s is not None else 0 for s in slots])
        if self.pool is not None:  # the rows this window writes; idle slots use the scratch block
            for b, slot in enumerate(slots):
                if slot is not None:  # within its reservation; a finished request's later rows go to scratch
                    self.pool.grow(b, min(first - slot.offset + steps, _rows(slot.request)))
            from mpk.paging import SCRATCH_BLOCK

            table = self.pool.table(batch)
            table[prefilling] = SCRATCH_BLOCK  # their dummy steps must not touch the rows prefilled so far
            executor.set_kv_table(table)
        eos = sorted(set.intersection(*(s.seq.eos for s in active)))

        def on_step(step: int, tokens: list[int]) -> bool:
            for b, slot in enumerate(slots):
                if slot is None:
                    continue
                slot.next_token = tokens[b]
                seq, request = slot.seq, slot.request
                if seq.finish_reason is None and step - slot.offset >= len(request.prompt_ids) - 1:
                    seq.take(tokens[b], request.on_token, request.on_text)
            # Stop early only when no request continues past this step (see the module's docstring).
            return all(s.finished() for s in active)

        t0 = time.perf_counter()
        result = executor.run(steps, max_new_tokens=limits, on_step=on_step, first_step=first,
                              eos_token_ids=eos, position_offsets=offsets)
        self.time.decode += time.perf_counter() - t0
        self.time.steps += result.steps
        self.time.slot_steps += result.steps * batch
        self.time.busy_slot_steps += result.steps * len(active)
        self.step = first + result.steps

    def _retire(self) -> None:
        for b, slot in enumerate(self.slots):
            if slot is None or not slot.finished():
                continue
            self.slots[b] = None
            self._release(b)
            _finish(slot.request, slot.seq.token_ids, slot.seq.text, slot.seq.finish_reason)
        if not any(self.slots):
            self.step = 0  # nothing continues: start positions afresh


def _rows(request: Request) -> int:
    """KV rows a request may fill: its prompt and every token it may make."""
    return len(request.prompt_ids) + request.params.max_tokens


def _finish(request: Request, token_ids: list[int], text: str, finish_reason: str | None) -> None:
    from mpk.api import CompletionOutput, RequestOutput

    if request.on_done is not None:
        request.on_done(RequestOutput(None, request.prompt_ids, [CompletionOutput(0, text, token_ids, finish_reason)]))
