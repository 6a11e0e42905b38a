"""One engine thread that runs the server's requests together, in the slots of a continuous batch.

Requests join the batch between windows of decode steps and leave it when they finish
(`mpk.batching`). At most `max_waiting` requests wait for a slot; one more is refused at once (503)
rather than letting waits grow without bound. Each job reports back to its request's event loop,
token by token, through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from mpk.api import LLM, RequestOutput, SamplingParams
from mpk.batching import DEFAULT_PREFILL_ROWS, Batcher, Request


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One generation: token ids in, events out: ("token", None) as each new token is made and ("text",
    delta) as text becomes final, ... then ("done", output) or ("error", exc)."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    token_times: list[float] = field(default_factory=list)  # when each new token arrived (perf_counter)

    def _emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the request's event loop has closed (the server is shutting down)
            pass

    def request(self) -> Request:
        """The batcher's view of this job, reporting back through the event queue."""
        return Request(self.prompt_ids, self.params, on_token=lambda _: self._token(),
                       on_text=lambda delta: self._emit("text", delta), on_done=lambda out: self._emit("done", out),
                       on_error=lambda e: self._emit("error", e), cancel=self.cancel)

    def _token(self) -> None:
        self.token_times.append(time.perf_counter())
        self._emit("token", None)

    async def next_event(self) -> tuple[str, object]:
        return await self.events.get()

    async def result(self) -> RequestOutput:
        """The finished output (text events are skipped); raises what the engine raised."""
        while True:
            kind, value = await self.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value


class EngineWorker:
    """Runs submitted jobs on `llm`, up to `slots` (default: llm.max_batch) at once, on one daemon
    thread; at most `max_waiting` wait for a slot."""

    def __init__(self, llm: LLM, max_waiting: int, slots: int | None = None,
                 prefill_rows: int = DEFAULT_PREFILL_ROWS):
        self.llm = llm
        self.max_waiting = max(1, max_waiting)
        self.batcher = Batcher(llm, slots, prefill_rows=prefill_rows)
        self.batcher.prepare()  # every batch size's kernel before the first request, not during it
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mpk-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self.batcher.waiting

    @property
    def running(self) -> int:
        return self.batcher.running

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when max_waiting wait already, MpkError for one that cannot run."""
        if self.batcher.waiting >= self.max_waiting:
            raise QueueFull
        self.batcher.submit(job.request())
        self._wake.set()

    def stop(self) -> None:
        """End the engine thread after its current window; requests still waiting are dropped."""
        self._stopping = True
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if not self.batcher.run_window():
                self._wake.wait()
