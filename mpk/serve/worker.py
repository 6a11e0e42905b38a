"""One engine thread that runs generations one at a time, fed by a bounded queue.

The engine runs a single sequence at a time in this version, so requests wait their turn here;
a full queue is refused at once (503) rather than letting waits grow without bound. Each job
reports back to its request's event loop, token by token, through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from mpk.api import LLM, RequestOutput, SamplingParams


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
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def run(self, llm: LLM) -> None:
        try:
            out = llm.generate([self.prompt_ids], self.params, on_text=lambda _, d: self._emit("text", d),
                               on_token=lambda _, t: self._token(), cancel=self.cancel)[0]
            self._emit("done", out)
        except Exception as e:  # the request's handler answers it; the engine thread carries on
            self._emit("error", e)

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
    """Runs submitted jobs on `llm`, in order, on one daemon thread; at most `max_waiting` wait."""

    def __init__(self, llm: LLM, max_waiting: int):
        self.llm = llm
        self._jobs: queue.Queue = queue.Queue(maxsize=max(1, max_waiting))
        self.running = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mpk-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def submit(self, job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def stop(self) -> None:
        """End the engine thread once the job running now ends; jobs still waiting are dropped."""
        self._stopping = True
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass  # the loop sees _stopping after its next job

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None and not self._stopping:
            if job.cancel.is_set():  # its client left while it waited
                continue
            self.running = 1
            try:
                job.run(self.llm)
            finally:
                self.running = 0
