"""Run a TaskGraph on one GPU as one persistent megakernel.

`Megakernel` loads the built .so (`mpk.runtime.abi`), keeps a CUDA buffer for every tensor of the
graph, uploads the device tables (`mpk.runtime.tables`), and launches the kernel asynchronously.
While it runs, the host polls host-mapped memory: `steps_done` and the token ring stream tokens to
`on_step`, and the per-SM progress words feed a watchdog (`mpk.runtime.watchdog`) that aborts a
stalled kernel and says which SM waits on which event.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np
import torch

from mpk.codegen import check_supported, render_source, variants_signature
from mpk.dtypes import torch_dtype
from mpk.errors import MpkError
from mpk.execution import Executor, RunResult, allocate, check_steps, per_sequence_limits
from mpk.runtime.abi import Abi, Mapped, Params, check, load_library
from mpk.runtime.build import arch_for_capability, build
from mpk.runtime.tables import build_tables, op_table, prefetch_table
from mpk.runtime.watchdog import stall_report
from mpk.taskgraph import TaskGraph

NO_STOP = 2**63 - 1
NO_LIMIT = 2**62


def cuda_device(device=None) -> torch.device:
    """The CUDA device to run on; a clear error when there is none or it is too old."""
    if not torch.cuda.is_available():
        raise MpkError("no CUDA GPU is available (torch.cuda.is_available() is False); the megakernel needs an "
                       "NVIDIA GPU of compute capability 8.0 or newer")
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        raise MpkError(f"the megakernel runs on a CUDA device, not {dev}")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        raise MpkError(f"{torch.cuda.get_device_name(index)} has compute capability {major}.{minor}; the megakernel "
                       "needs 8.0 or newer (Ampere, Hopper, Blackwell)")
    return torch.device("cuda", index)


class Megakernel(Executor):
    """One TaskGraph's megakernel on one GPU, with its tensors; a context manager.

    `so_path` None builds (or reuses from the cache) the kernel for this device. Weights and meta
    are dicts of CPU tensors as `mpk.inputs.program_inputs` returns them; or pass `buffers`, a dict
    of CUDA tensors for every tensor of the graph, to share memory with the caller.
    """

    poll_seconds = 2e-4

    def __init__(self, tg: TaskGraph, so_path: str | Path | None = None, device=None, *,
                 weights: dict | None = None, meta: dict | None = None, buffers: dict | None = None,
                 arch: str | None = None, debug: bool | None = None):
        check_supported(tg)
        self.device = cuda_device(device)
        self.tg = tg
        self.tables = build_tables(tg)
        self._mapped: list[Mapped] = []
        self._ops = self._trace = None
        self._broken = ""  # why this kernel may not launch again (a fault, a launch that would not stop)
        self.buffers: dict[str, torch.Tensor] = {}
        props = torch.cuda.get_device_properties(self.device)
        if tg.num_sms > props.multi_processor_count:
            raise MpkError(f"the graph was compiled for {tg.num_sms} SMs but {props.name} has "
                           f"{props.multi_processor_count}; compile with --num-sms {props.multi_processor_count}")
        if so_path is None:
            so_path = build(render_source(self.tables.variants), arch or arch_for_capability(props.major, props.minor),
                            debug)
        self.so_path = Path(so_path)
        self.lib = load_library(self.so_path)
        self.abi = Abi(self.lib)
        if self.lib.mpk_variants().decode() != variants_signature(self.tables.variants):
            raise MpkError(f"{self.so_path} was built for other op variants than this graph's; rebuild it from "
                           "mpk.codegen.generate_source(tg)")
        check(self.lib, self.lib.mpk_set_device(self.device.index), "selecting the GPU")
        blocks = ctypes.c_int(0)
        check(self.lib, self.lib.mpk_blocks_per_sm(ctypes.byref(blocks)), "querying the kernel's occupancy")
        if blocks.value < 1:
            raise MpkError(f"the megakernel needs {self.lib.mpk_smem_bytes()} bytes of shared memory per SM, more than "
                           f"{props.name} offers; use a smaller batch")
        try:
            self._upload_tables()
            if buffers is not None:
                self.set_buffers(buffers)
            elif weights is not None or meta is not None:
                self.load(weights or {}, meta or {})
        except BaseException:
            self.close()
            raise

    def _upload_tables(self) -> None:
        dev, t, abi, tg = self.device, self.tables, self.abi, self.tg
        as_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        self._tasks = as_dev(t.tasks.view(np.uint8))
        self._signals, self._queue_off, self._queue_tasks = as_dev(t.signals), as_dev(t.queue_off), as_dev(t.queue_tasks)
        self._ev_target, self._ev_lag = as_dev(t.ev_target), as_dev(t.ev_lag)
        self._counters = torch.zeros(len(t.ev_target), dtype=torch.int64, device=dev)  # read as u64 on the GPU
        self._ctl = torch.zeros(abi.kCtlWords, dtype=torch.int64, device=dev)
        self._seq_done = torch.zeros(tg.batch, dtype=torch.int32, device=dev)
        self._out_tokens = self._map(tg.max_seq_len * tg.batch, ctypes.c_int32)
        self._steps_done = self._map(1, ctypes.c_int64)
        self._progress = self._map(tg.num_sms * abi.kProgressWords, ctypes.c_int32)
        self._flags = self._map(abi.kFlagWords, ctypes.c_int32)

    def _map(self, n: int, ctype) -> Mapped:
        m = Mapped(self.lib, n, ctype)
        self._mapped.append(m)
        return m

    # --- tensors -------------------------------------------------------------------------------

    def load(self, weights: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]) -> None:
        """Copy weights and meta to the GPU; allocate (poisoned) activations and state."""
        self.set_buffers(allocate(self.tg, weights, meta, self.device))

    def set_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        for name, spec in self.tg.tensors.items():
            buf = buffers.get(name)
            if buf is None:
                raise MpkError(f"no buffer for tensor {name!r}")
            want = torch_dtype(spec.dtype)
            if tuple(buf.shape) != spec.shape or buf.dtype != want or buf.device != self.device or not buf.is_contiguous():
                raise MpkError(f"buffer {name!r} is {tuple(buf.shape)} {buf.dtype} on {buf.device}; the kernel needs a "
                               f"contiguous {spec.shape} {want} on {self.device}")
        self.buffers = dict(buffers)
        address = lambda n: self.buffers[n].data_ptr()  # noqa: E731
        self._ops = torch.from_numpy(op_table(self.tables.op_args, address).view(np.uint8)).to(self.device)
        heads = prefetch_table(self.tg, address, head_limit=self.lib.mpk_head_bytes())
        self._prefetch = torch.from_numpy(heads.view(np.int64)).to(self.device)

    # --- running -------------------------------------------------------------------------------

    def run(self, num_steps, max_new_tokens=None, on_step=None, *, first_step=0, eos_token_ids=None,
            collect_logits=False, trace: bool = False, watchdog_seconds: float | None = None) -> RunResult:
        """`Executor.run`, plus: `trace` records each task's wait, start and end times (%globaltimer,
        ns) into `RunResult.trace` [steps, tasks, 3]; `collect_logits` runs one step per launch.

        A later run may continue at `first_step = previous first_step + steps` only after a run that
        was not stopped by on_step: after such a stop the kernel may already have run a step or two
        beyond the last one returned.
        """
        tg, B, abi = self.tg, self.tg.batch, self.abi
        if self._ops is None:
            raise MpkError("load weights and meta (Megakernel.load) before run()")
        check_steps(tg, first_step, num_steps)
        limits = per_sequence_limits(B, max_new_tokens)
        eos = list(tg.model.get("eos_token_ids", ()) if eos_token_ids is None else eos_token_ids)
        self._eos = torch.tensor(eos or [-1], dtype=torch.int64, device=self.device)
        self._max_new = torch.tensor([NO_LIMIT if n is None else int(n) for n in limits], dtype=torch.int64,
                                     device=self.device)
        self._n_eos = len(eos)
        self._watchdog = float(os.environ.get("MPK_WATCHDOG_SECONDS", "10")) if watchdog_seconds is None else watchdog_seconds
        if first_step == 0 and self.tables.n_sample:  # only a sampler feeds tokens back (one-op graphs have none)
            self.restart_tokens()
        self._seq_done.zero_()
        self._ctl[abi.kCtlStopStep] = NO_STOP
        self._steps_done.array[0] = first_step
        self._flags.array[:] = 0
        if trace and collect_logits:
            raise MpkError("trace and collect_logits cannot be combined (collect_logits launches one step at a time)")
        self._trace = torch.zeros((num_steps, len(tg.tasks), 3), dtype=torch.int64, device=self.device) if trace else None

        tokens: list[list[int]] = []
        logits: list[torch.Tensor] = []
        stop_at = [None]  # the step after which on_step asked to stop

        def deliver(upto: int) -> None:
            while first_step + len(tokens) < upto and stop_at[0] is None:
                s = first_step + len(tokens)
                tokens.append(self._out_tokens.array[s * B:(s + 1) * B].tolist())
                if on_step is not None and on_step(s, tokens[-1]):
                    stop_at[0] = s
                    self._flags.array[abi.kFlagStopRequest] = 1

        t0 = time.perf_counter()
        if collect_logits:
            for s in range(first_step, first_step + num_steps):
                self._launch(s, 1, deliver)
                logits.append(self.logits())
                if stop_at[0] is not None or int(self._ctl[abi.kCtlStopStep]) <= s:
                    break
        else:
            self._launch(first_step, num_steps, deliver)
        seconds = time.perf_counter() - t0
        steps = len(tokens)
        spans = None
        if self._trace is not None:
            # The kernel records by queue position (unique across SMs); reindex by task id.
            by_position = self._trace[:steps].cpu()
            spans = torch.empty_like(by_position)
            spans[:, torch.from_numpy(self.tables.queue_tasks).long()] = by_position
        return RunResult(tokens, steps, seconds, steps < num_steps, logits[:steps], spans)

    def _params(self, first_step: int, num_steps: int) -> Params:
        p = Params()
        for name, tensor in (("tasks", self._tasks), ("signals", self._signals), ("queue_off", self._queue_off),
                             ("queue_tasks", self._queue_tasks), ("ev_target", self._ev_target),
                             ("ev_lag", self._ev_lag), ("ops", self._ops), ("counters", self._counters),
                             ("ctl", self._ctl), ("seq_done", self._seq_done), ("eos", self._eos),
                             ("max_new", self._max_new), ("prefetch", self._prefetch)):
            setattr(p, name, tensor.data_ptr())
        p.out_tokens, p.steps_done = self._out_tokens.dev, self._steps_done.dev
        p.progress, p.host_flags = self._progress.dev, self._flags.dev
        p.trace = self._trace.data_ptr() if self._trace is not None else 0
        p.first_step, p.num_steps, p.num_sms = first_step, num_steps, self.tg.num_sms
        p.n_eos, p.n_sample, p.batch = self._n_eos, self.tables.n_sample, self.tg.batch
        return p

    def _launch(self, first_step: int, num_steps: int, deliver) -> None:
        """Launch, stream tokens while it runs, and watch for a stall."""
        if self._broken:
            raise MpkError(f"this megakernel cannot run again: {self._broken}; restart the process")
        abi = self.abi
        stream = torch.cuda.current_stream(self.device)
        self._counters.zero_()
        self._ctl[abi.kCtlSampled] = 0
        self._progress.array[:] = 0
        params = self._params(first_step, num_steps)
        check(self.lib, self.lib.mpk_set_device(self.device.index), "selecting the GPU")
        check(self.lib, self.lib.mpk_launch(ctypes.byref(params), ctypes.c_void_p(stream.cuda_stream)),
              "launching the megakernel")
        done = torch.cuda.Event()
        done.record(stream)
        try:
            self._watch(done, deliver, first_step)
        except MpkError:
            raise
        except BaseException:
            # Ctrl-C or an exception from on_step: stop the kernel before anything else may launch.
            self._flags.array[abi.kFlagStopRequest] = self._flags.array[abi.kFlagAbort] = 1
            if not self._wait_exit(done, 10.0):
                self._broken = "its launch did not stop within 10 s of an interrupt and may still be running"
            raise
        self._exited(done)
        if not self.tables.n_sample:
            # Without a sampling task nothing publishes steps_done, and nothing can stop the run early.
            self._steps_done.array[0] = first_step + num_steps
        deliver(int(self._steps_done.array[0]))

    def _watch(self, done: torch.cuda.Event, deliver, first_step: int) -> None:
        """Stream tokens until the launch ends; abort it when neither the SMs' progress words nor the
        step counter have moved for the watchdog's time (a stalled event, or a hang inside a task)."""
        progress, steps_done = self._progress.array, self._steps_done.array
        seen, seen_steps, last_change = progress.copy(), int(steps_done[0]), time.monotonic()
        while not self._exited(done):
            deliver(int(steps_done[0]))
            now = time.monotonic()
            if not np.array_equal(progress, seen) or int(steps_done[0]) != seen_steps:
                seen[:], seen_steps, last_change = progress, int(steps_done[0]), now
            elif now - last_change > self._watchdog:
                self._abort(done, seen, first_step)
            time.sleep(self.poll_seconds)

    def _exited(self, done: torch.cuda.Event) -> bool:
        """Whether the launch has ended; a device fault becomes one clear error."""
        try:
            return done.query()
        except RuntimeError as e:  # an illegal address or a device assert: CUDA errors are sticky
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self._broken = f"it faulted on the GPU ({reason})"
            raise MpkError(f"the megakernel faulted on the GPU: {reason}; this process's CUDA context is unusable, "
                           "so restart it (MPK_DEBUG=1 builds the kernel with device asserts)") from None

    def _wait_exit(self, done: torch.cuda.Event, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not self._exited(done):
            if time.monotonic() > deadline:
                return False
            time.sleep(1e-3)
        return True

    def _abort(self, done: torch.cuda.Event, snapshot: np.ndarray, first_step: int) -> None:
        """Tell the kernel to leave its wait loops, then raise with who waited on what."""
        abi = self.abi
        self._flags.array[abi.kFlagAbort] = 1
        exited = self._wait_exit(done, 10.0)
        counters = self._counters.cpu().tolist() if exited else None
        # After the abort each stuck SM re-published its wait as aborted; else use the last snapshot.
        words, state = (self._progress.array, abi.kStateAborted) if exited else (snapshot, abi.kStateWaiting)
        what = stall_report(self.tg, abi, words, state, counters, first_step)
        tail = ""
        if not exited:
            self._broken = "its launch did not exit after the watchdog's abort"
            tail = "; the kernel did not exit after the abort, the GPU is unusable in this process"
        raise MpkError(f"the megakernel made no progress for {self._watchdog:g} s: {what}{tail}")

    def close(self) -> None:
        """Free the host-mapped memory and drop the GPU buffers (idempotent)."""
        for mapped in self._mapped:
            mapped.free()
        self._mapped = []
        self.buffers, self._ops = {}, None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA runtime may already be gone
            pass
