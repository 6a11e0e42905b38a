"""Run a TaskGraph on one GPU as one persistent megakernel.

`Megakernel` loads the built .so through ctypes, keeps a CUDA buffer for every tensor of the graph
(named as in `mpk.sim.allocate`), uploads the task/queue/event tables, and launches the kernel
asynchronously. While it runs, the host polls host-mapped memory: `steps_done` and the token ring
stream tokens to `on_step`, and the per-SM progress words feed a watchdog that aborts a stalled
kernel and says which SM waits on which event.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from mpk.codegen import OP_DTYPE, TASK_DTYPE, build_tables, check_supported, op_table, prefetch_table, render_source
from mpk.errors import MpkError
from mpk.runtime.build import arch_for_capability, build
from mpk.sim import allocate as sim_allocate
from mpk.taskgraph import TaskGraph

# Mirrors of mpk/csrc/mpk_runtime.cuh.
CTL_WORDS, CTL_SAMPLED, CTL_STOP_STEP = 4, 0, 1
FLAG_WORDS, FLAG_ABORT, FLAG_STOP_REQUEST = 4, 0, 1
PROGRESS_WORDS, PR_SEQ, PR_TASK, PR_STEP, PR_EVENT, PR_STATE = 8, 0, 1, 2, 3, 4
STATE_WAITING, STATE_DONE, STATE_STOPPED, STATE_ABORTED = 1, 2, 3, 4
NO_STOP = 2**63 - 1
NO_LIMIT = 2**62

DTYPES = {"model": torch.bfloat16, "float32": torch.float32, "int64": torch.int64}

_PTR_FIELDS = ("tasks", "signals", "queue_off", "queue_tasks", "ev_target", "ev_lag", "ops", "counters", "ctl",
               "seq_done", "eos", "max_new", "out_tokens", "steps_done", "progress", "host_flags", "prefetch",
               "trace")
_INT_FIELDS = ("first_step", "num_steps", "num_sms", "n_eos", "n_sample", "batch")


class _Params(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in _PTR_FIELDS] + [(n, ctypes.c_int64) for n in _INT_FIELDS]


OnStep = Callable[[int, list[int]], bool | None]


@dataclass
class RunResult:
    tokens: list[list[int]]  # per step run, the token each sequence got (prompt tokens included)
    steps: int  # steps run
    seconds: float
    stopped: bool  # ended before num_steps: every sequence finished, or on_step asked to stop
    logits: list[torch.Tensor] = field(default_factory=list)  # per step [batch, vocab] float32, if collected
    trace: torch.Tensor | None = None  # [steps, tasks, 3] int64 ns: wait start, run start, end (if traced)


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


def allocate(tg: TaskGraph, weights: dict[str, torch.Tensor], meta: dict[str, torch.Tensor], device) -> dict:
    """GPU buffers for every tensor, bf16 for the model dtype, poisoned like the CPU executor's."""
    return sim_allocate(tg, weights, meta, torch.bfloat16, device)


class _Mapped:
    """Pinned host memory that the GPU reads and writes directly, viewed as a numpy array."""

    def __init__(self, lib, n: int, ctype):
        self._lib, host, dev = lib, ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib, lib.mpk_host_alloc(ctypes.c_size_t(max(1, n) * ctypes.sizeof(ctype)), ctypes.byref(host),
                                       ctypes.byref(dev)), "allocating host-mapped memory")
        self.host, self.dev = host.value, dev.value
        self.array = np.ctypeslib.as_array(ctypes.cast(self.host, ctypes.POINTER(ctype)), shape=(max(1, n),))

    def free(self) -> None:
        if self.host:
            self.array = None
            self._lib.mpk_host_free(ctypes.c_void_p(self.host))
            self.host = None


def _check(lib, rc: int, what: str) -> None:
    if rc != 0:
        raise MpkError(f"{what} failed: {lib.mpk_error_string(rc).decode()} (CUDA error {rc})")


def _load_library(path: Path):
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise MpkError(f"cannot load the megakernel library {path}: {e}") from None
    for name in ("mpk_params_size", "mpk_task_desc_size", "mpk_op_desc_size", "mpk_num_threads", "mpk_smem_bytes",
                 "mpk_num_variants", "mpk_set_device"):
        getattr(lib, name).restype = ctypes.c_int
    lib.mpk_error_string.restype = ctypes.c_char_p
    lib.mpk_variants.restype = ctypes.c_char_p
    lib.mpk_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.mpk_launch.restype = ctypes.c_int
    lib.mpk_blocks_per_sm.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.mpk_host_alloc.argtypes = [ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
    lib.mpk_host_free.argtypes = [ctypes.c_void_p]
    for fn, want in ((lib.mpk_params_size, ctypes.sizeof(_Params)), (lib.mpk_task_desc_size, TASK_DTYPE.itemsize),
                     (lib.mpk_op_desc_size, OP_DTYPE.itemsize)):
        if fn() != want:
            raise MpkError(f"{path} was built from other headers than this mpk ({fn.__name__} {fn()} != {want}); "
                           "clear MPK_CACHE_DIR and rebuild")
    return lib


class Megakernel:
    """One TaskGraph's megakernel on one GPU, with its tensors.

    `so_path` None builds (or reuses from the cache) the kernel for this device. Weights and meta
    are dicts of CPU tensors as `mpk.engine.program_inputs` returns them; or pass `buffers`, a dict
    of CUDA tensors for every tensor of the graph, to share memory with the caller.
    """

    def __init__(self, tg: TaskGraph, so_path: str | Path | None = None, device=None, *,
                 weights: dict | None = None, meta: dict | None = None, buffers: dict | None = None,
                 arch: str | None = None, debug: bool | None = None):
        check_supported(tg)
        self.device = cuda_device(device)
        self.tg = tg
        self.tables = build_tables(tg)
        props = torch.cuda.get_device_properties(self.device)
        if tg.num_sms > props.multi_processor_count:
            raise MpkError(f"the graph was compiled for {tg.num_sms} SMs but {props.name} has "
                           f"{props.multi_processor_count}; compile with --num-sms {props.multi_processor_count}")
        if so_path is None:
            so_path = build(render_source(self.tables.variants), arch or arch_for_capability(props.major, props.minor),
                            debug)
        self.so_path = Path(so_path)
        self.lib = _load_library(self.so_path)
        built = self.lib.mpk_variants().decode().split(";")
        if built != self.tables.variants:
            raise MpkError(f"{self.so_path} was built for other op variants than this graph's; rebuild it from "
                           "mpk.codegen.generate_source(tg)")
        _check(self.lib, self.lib.mpk_set_device(self.device.index), "selecting the GPU")
        blocks = ctypes.c_int(0)
        _check(self.lib, self.lib.mpk_blocks_per_sm(ctypes.byref(blocks)), "querying the kernel's occupancy")
        if blocks.value < 1:
            raise MpkError(f"the megakernel needs {self.lib.mpk_smem_bytes()} bytes of shared memory per SM, more than "
                           f"{props.name} offers; use a smaller batch")

        dev, t = self.device, self.tables
        as_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        self._tasks = as_dev(t.tasks.view(np.uint8))
        self._signals, self._queue_off, self._queue_tasks = as_dev(t.signals), as_dev(t.queue_off), as_dev(t.queue_tasks)
        self._ev_target, self._ev_lag = as_dev(t.ev_target), as_dev(t.ev_lag)
        self._counters = torch.zeros(len(t.ev_target), dtype=torch.int64, device=dev)  # read as u64 on the GPU
        self._ctl = torch.zeros(CTL_WORDS, dtype=torch.int64, device=dev)
        self._seq_done = torch.zeros(tg.batch, dtype=torch.int32, device=dev)
        self._ops = None
        self._trace = None
        self.buffers: dict[str, torch.Tensor] = {}

        self._out_tokens = _Mapped(self.lib, tg.max_seq_len * tg.batch, ctypes.c_int32)
        self._steps_done = _Mapped(self.lib, 1, ctypes.c_int64)
        self._progress = _Mapped(self.lib, tg.num_sms * PROGRESS_WORDS, ctypes.c_int32)
        self._flags = _Mapped(self.lib, FLAG_WORDS, ctypes.c_int32)
        self.poll_seconds = 2e-4
        if buffers is not None:
            self.set_buffers(buffers)
        elif weights is not None or meta is not None:
            self.load(weights or {}, meta or {})

    # --- tensors -------------------------------------------------------------------------------

    def load(self, weights: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]) -> None:
        """Copy weights and meta to the GPU; allocate (poisoned) activations and state."""
        self.set_buffers(allocate(self.tg, weights, meta, self.device))

    def set_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        for name, spec in self.tg.tensors.items():
            buf = buffers.get(name)
            if buf is None:
                raise MpkError(f"no buffer for tensor {name!r}")
            want = DTYPES[spec.dtype]
            if tuple(buf.shape) != spec.shape or buf.dtype != want or buf.device != self.device or not buf.is_contiguous():
                raise MpkError(f"buffer {name!r} is {tuple(buf.shape)} {buf.dtype} on {buf.device}; the kernel needs a "
                               f"contiguous {spec.shape} {want} on {self.device}")
        self.buffers = dict(buffers)
        table = op_table(self.tables.op_args, lambda n: self.buffers[n].data_ptr())
        self._ops = torch.from_numpy(table.view(np.uint8)).to(self.device)
        self._prefetch = torch.from_numpy(prefetch_table(self.tg, lambda n: self.buffers[n].data_ptr())
                                          .view(np.int64)).to(self.device)

    def set_meta(self, meta: dict[str, torch.Tensor]) -> None:
        """New prompts: overwrite the meta tensors (tokens, prompt, prompt_len) in place."""
        for name, value in meta.items():
            if name not in self.buffers or self.tg.tensors[name].kind != "meta":
                raise MpkError(f"{name!r} is not a meta tensor of this graph")
            self.buffers[name].copy_(value.to(self.buffers[name].dtype))

    # --- running -------------------------------------------------------------------------------

    def run(self, num_steps: int, max_new_tokens: int | Sequence[int] | None = None, on_step: OnStep | None = None, *,
            first_step: int = 0, eos_token_ids: Sequence[int] | None = None, collect_logits: bool = False,
            trace: bool = False,
            watchdog_seconds: float | None = None) -> RunResult:
        """Run decode steps [first_step, first_step + num_steps) and return their tokens.

        `on_step(step, tokens)` gets each step's tokens (one per sequence) while the kernel runs;
        returning True stops the run after that step. A sequence is finished at EOS
        (`eos_token_ids`, default the model's) or after `max_new_tokens` new tokens (an int or one
        per sequence); the kernel stops by itself once all are. `collect_logits` runs one step per
        launch and copies each step's logits (slower; for tests). `trace` records each task's
        wait, start and end times (%globaltimer, ns) into `RunResult.trace` [steps, tasks, 3].

        A later run may continue at `first_step = previous first_step + steps` only after a run that
        was not stopped by on_step: after such a stop the kernel may already have run a step or two
        beyond the last one returned.
        """
        tg, B = self.tg, self.tg.batch
        if self._ops is None:
            raise MpkError("load weights and meta (Megakernel.load) before run()")
        if num_steps < 1 or first_step < 0 or first_step + num_steps > tg.max_seq_len:
            raise MpkError(f"steps {first_step}..{first_step + num_steps - 1} do not fit the graph's context of "
                           f"{tg.max_seq_len} positions")
        limits = [max_new_tokens] * B if max_new_tokens is None or isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != B:
            raise MpkError(f"max_new_tokens has {len(limits)} entries for a batch of {B}")
        eos = list(tg.model.get("eos_token_ids", ()) if eos_token_ids is None else eos_token_ids)
        self._eos = torch.tensor(eos or [-1], dtype=torch.int64, device=self.device)
        self._max_new = torch.tensor([NO_LIMIT if n is None else int(n) for n in limits], dtype=torch.int64,
                                     device=self.device)
        self._n_eos = len(eos)
        self._watchdog = float(os.environ.get("MPK_WATCHDOG_SECONDS", "10")) if watchdog_seconds is None else watchdog_seconds
        if first_step == 0:  # step 0 embeds the prompts' first tokens; a previous run left its last ones
            self.buffers["tokens"].copy_(self.buffers["prompt"][:, 0])
        self._seq_done.zero_()
        self._ctl[CTL_STOP_STEP] = NO_STOP
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
                    self._flags.array[FLAG_STOP_REQUEST] = 1

        t0 = time.perf_counter()
        if collect_logits:
            for s in range(first_step, first_step + num_steps):
                self._launch(s, 1, deliver)
                logits.append(self.buffers["logits"].float().cpu())
                if stop_at[0] is not None or int(self._ctl[CTL_STOP_STEP]) <= s:
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

    def _params(self, first_step: int, num_steps: int) -> _Params:
        p = _Params()
        for name, tensor in (("tasks", self._tasks), ("signals", self._signals), ("queue_off", self._queue_off),
                             ("queue_tasks", self._queue_tasks), ("ev_target", self._ev_target),
                             ("ev_lag", self._ev_lag), ("ops", self._ops), ("counters", self._counters),
                             ("ctl", self._ctl), ("seq_done", self._seq_done), ("eos", self._eos),
                             ("max_new", self._max_new)):
            setattr(p, name, tensor.data_ptr())
        p.out_tokens, p.steps_done = self._out_tokens.dev, self._steps_done.dev
        p.progress, p.host_flags = self._progress.dev, self._flags.dev
        p.prefetch = self._prefetch.data_ptr()
        p.trace = self._trace.data_ptr() if self._trace is not None else 0
        p.first_step, p.num_steps, p.num_sms = first_step, num_steps, self.tg.num_sms
        p.n_eos, p.n_sample, p.batch = self._n_eos, self.tables.n_sample, self.tg.batch
        return p

    def _launch(self, first_step: int, num_steps: int, deliver) -> None:
        """Launch, stream tokens while it runs, and watch for a stall."""
        stream = torch.cuda.current_stream(self.device)
        self._counters.zero_()
        self._ctl[CTL_SAMPLED] = 0
        self._progress.array[:] = 0
        params = self._params(first_step, num_steps)
        _check(self.lib, self.lib.mpk_set_device(self.device.index), "selecting the GPU")
        _check(self.lib, self.lib.mpk_launch(ctypes.byref(params), ctypes.c_void_p(stream.cuda_stream)),
               "launching the megakernel")
        done = torch.cuda.Event()
        done.record(stream)
        progress = self._progress.array
        seen, last_change = progress.copy(), time.monotonic()
        try:
            while not done.query():
                deliver(int(self._steps_done.array[0]))
                now = time.monotonic()
                if not np.array_equal(progress, seen):
                    seen[:], last_change = progress, now
                elif now - last_change > self._watchdog:
                    self._abort(done, seen, first_step)
                time.sleep(self.poll_seconds)
        except BaseException:
            # Ctrl-C or an exception from on_step: don't leave the kernel running for the remaining steps.
            self._flags.array[FLAG_STOP_REQUEST] = self._flags.array[FLAG_ABORT] = 1
            deadline = time.monotonic() + 5.0
            while not done.query() and time.monotonic() < deadline:
                time.sleep(1e-3)
            raise
        try:
            stream.synchronize()
        except RuntimeError as e:
            raise MpkError(f"the megakernel failed on the GPU: {e}; rebuild with MPK_DEBUG=1 for device asserts") from None
        deliver(int(self._steps_done.array[0]))

    def _abort(self, done: torch.cuda.Event, snapshot: np.ndarray, first_step: int) -> None:
        """Tell the kernel to leave its wait loops, then raise with who waited on what."""
        self._flags.array[FLAG_ABORT] = 1
        deadline = time.monotonic() + 10.0
        while not done.query() and time.monotonic() < deadline:
            time.sleep(1e-3)
        exited = done.query()
        counters = self._counters.cpu().tolist() if exited else None
        # After the abort each stuck SM re-published its wait as aborted; else use the last snapshot.
        words = (self._progress.array if exited else snapshot).reshape(self.tg.num_sms, PROGRESS_WORDS)
        state = STATE_ABORTED if exited else STATE_WAITING
        # Task ids are a topological order: the earliest stuck wait is the cause, the rest follow from it.
        waiting = sorted((sm for sm in range(self.tg.num_sms) if words[sm, PR_STATE] == state),
                         key=lambda sm: (int(words[sm, PR_STEP]), int(words[sm, PR_TASK])))
        parts = []
        for sm in waiting[:4]:
            task, step, ev = (int(words[sm, k]) for k in (PR_TASK, PR_STEP, PR_EVENT))
            e = self.tg.events[ev]
            need = e.target * (step - first_step + 1 - e.lag)
            have = f"{counters[ev]}/{need}" if counters is not None else f"?/{need}"
            parts.append(f"SM {sm} waits in step {step} with {self.tg.describe_task(task)} on event {ev} ({have})")
        more = f" and {len(waiting) - 4} more SMs" if len(waiting) > 4 else ""
        tail = "" if exited else "; the kernel did not exit after the abort, the GPU is unusable in this process"
        what = "; ".join(parts) + more if parts else "no SM reported a wait"
        raise MpkError(f"the megakernel made no progress for {self._watchdog:g} s: {what}{tail}")

    def close(self) -> None:
        for m in ("_out_tokens", "_steps_done", "_progress", "_flags"):
            mapped = getattr(self, m, None)
            if mapped is not None:
                mapped.free()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA runtime may already be gone
            pass
