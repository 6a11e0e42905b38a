"""Run a TaskGraph as one persistent megakernel per GPU.

`Megakernel` loads the built .so (`mpk.runtime.abi`), keeps a CUDA buffer for every tensor of the
graph on the GPU of the rank that owns it, uploads each rank's device tables
(`mpk.runtime.tables`), and launches one kernel per GPU asynchronously. With tensor parallelism
the kernels read each other's tensors and signal each other's event counters through peer access
(NVLink), all from this one process. While they run, the host polls host-mapped memory:
rank 0's `steps_done` and token ring stream tokens to `on_step`, and every SM's progress words feed
a watchdog (`mpk.runtime.watchdog`) that aborts stalled kernels and says which SM waits on which
event.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mpk.codegen import check_supported, render_source, variants_signature
from mpk.dtypes import torch_dtype
from mpk.errors import MpkError
from mpk.execution import Executor, RunResult, allocate, check_steps, per_sequence_limits
from mpk.paging import KvPages, storage_shape
from mpk.runtime.abi import Abi, Mapped, Params, check, load_library
from mpk.runtime.build import arch_for_capability, build
from mpk.runtime.tables import (KernelTables, build_rank_tables, op_table, prefetch_table, queue_entries,
                                rank_pointer_count)
from mpk.runtime.watchdog import stall_report
from mpk.taskgraph import TaskGraph

NO_STOP = 2**63 - 1
NO_LIMIT = 2**62
# NVLink multicast (NVLS) is never used: mpk moves data with peer loads and stores, and any library
# in the process that could reach for multicast (NCCL, NVSHMEM, torch's symmetric memory) is told not to.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def cuda_device(device=None) -> torch.device:
    """The CUDA device to run on; a clear error when there is none or it is too old."""
    if not torch.cuda.is_available():
        raise MpkError("no CUDA GPU is available (torch.cuda.is_available() is False); the megakernel needs an "
                       "NVIDIA GPU of compute capability 8.0 or newer")
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        raise MpkError(f"the megakernel runs on a CUDA device, not {dev}")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise MpkError(f"there is no GPU cuda:{index}; this machine has {torch.cuda.device_count()}")
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        raise MpkError(f"{torch.cuda.get_device_name(index)} has compute capability {major}.{minor}; the megakernel "
                       "needs 8.0 or newer (Ampere, Hopper, Blackwell)")
    return torch.device("cuda", index)


def rank_devices(tp_size: int, device=None, devices=None) -> list[torch.device]:
    """One CUDA device per tensor-parallel rank: `devices`, or `device` for one rank, or the
    first `tp_size` GPUs."""
    if devices is None:
        if tp_size == 1:
            devices = [device]
        elif device is not None:
            raise MpkError(f"a graph of {tp_size} tensor-parallel ranks runs on {tp_size} GPUs; pass devices=[...], "
                           "not one device")
        else:
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if have < tp_size:
                raise MpkError(f"tensor parallelism {tp_size} needs {tp_size} GPUs and this machine has {have}; "
                               f"use --tp {max(1, have)} or fewer")
            devices = list(range(tp_size))
    found = [cuda_device(d) for d in devices]
    if len(found) != tp_size or len(set(found)) != tp_size:
        raise MpkError(f"a graph of {tp_size} tensor-parallel ranks needs {tp_size} different GPUs, got "
                       f"{', '.join(map(str, found))}")
    return found


@dataclass
class RankState:
    """One GPU's kernel: its tables and run state on its device, its host-mapped words."""

    rank: int
    device: torch.device
    tables: KernelTables
    dev: dict[str, torch.Tensor] = field(default_factory=dict)  # device arrays by MpkParams field
    mapped: dict[str, Mapped] = field(default_factory=dict)  # out_tokens, steps_done, progress, host_flags
    trace: torch.Tensor | None = None
    done: torch.cuda.Event | None = None  # the launch in flight

    def address(self, name: str) -> int:
        return self.dev[name].data_ptr()


class Megakernel(Executor):
    """One TaskGraph's megakernels, one per tensor-parallel rank and GPU, with its tensors; a
    context manager.

    `so_path` None builds (or reuses from the cache) the kernel for these devices. Weights and meta
    are dicts of CPU tensors as `mpk.inputs.program_inputs` returns them; or pass `buffers`, a dict
    of CUDA tensors for every tensor of the graph (each on its rank's GPU), to share memory with the
    caller. `device` picks the GPU of a one-rank graph; `devices` one GPU per rank (default: the
    first `tp_size` GPUs). `task_marks` builds the kernel with the marks a traced run records inside
    each task (a profile's kernel; the timed and served ones carry none).
    """

    poll_seconds = 2e-4

    def __init__(self, tg: TaskGraph, so_path: str | Path | None = None, device=None, *,
                 devices=None, weights: dict | None = None, meta: dict | None = None, buffers: dict | None = None,
                 arch: str | None = None, debug: bool | None = None, kv_pages: KvPages | None = None,
                 task_marks: bool = False):
        check_supported(tg)
        self.tg, self.kv_pages, self.task_marks = tg, kv_pages, task_marks
        if tg.tp_size > 1:
            os.environ.update(NO_MULTICAST)
        self.devices = rank_devices(tg.tp_size, device, devices)
        self.device = self.devices[0]
        self.ranks: list[RankState] = []
        self._ops = None
        self._broken = ""  # why this kernel may not launch again (a fault, a launch that would not stop)
        self._tag_base = 0  # the next launch's first step writes mailbox words tagged _tag_base + 1
        self.buffers: dict[str, torch.Tensor] = {}
        props = [torch.cuda.get_device_properties(d) for d in self.devices]
        for d, pr in zip(self.devices, props):
            if tg.num_sms > pr.multi_processor_count:
                raise MpkError(f"the graph was compiled for {tg.num_sms} SMs but {pr.name} ({d}) has "
                               f"{pr.multi_processor_count}; compile with --num-sms {pr.multi_processor_count}")
        if len({(pr.major, pr.minor) for pr in props}) > 1:
            raise MpkError("the GPUs of one tensor-parallel run must be of one compute capability: "
                           + ", ".join(f"{d} {pr.major}.{pr.minor}" for d, pr in zip(self.devices, props)))
        tables = build_rank_tables(tg)
        if so_path is None:
            so_path = build(render_source(tables[0].variants, task_marks), arch or arch_for_capability(props[0].major, props[0].minor),
                            debug)
        self.so_path = Path(so_path)
        self.lib = load_library(self.so_path)
        self.abi = Abi(self.lib)
        if self.lib.mpk_variants().decode() != variants_signature(tables[0].variants):
            raise MpkError(f"{self.so_path} was built for other op variants than this graph's; rebuild it from "
                           "mpk.codegen.generate_source(tg)")
        self._enable_peer_access()
        for d, pr in zip(self.devices, props):
            check(self.lib, self.lib.mpk_set_device(d.index), "selecting the GPU")
            blocks = ctypes.c_int(0)
            check(self.lib, self.lib.mpk_blocks_per_sm(ctypes.byref(blocks)), "querying the kernel's occupancy")
            if blocks.value < 1:
                raise MpkError(f"the megakernel needs {self.lib.mpk_smem_bytes()} bytes of shared memory per SM, more "
                               f"than {pr.name} offers; use a smaller batch")
        self.tables = tables[0]  # rank 0's; every rank has the same variants and sample tasks per step
        try:
            self.ranks = [RankState(r, d, t) for r, (d, t) in enumerate(zip(self.devices, tables))]
            for rs in self.ranks:
                self._upload_tables(rs)
            self._link_ranks()
            if buffers is not None:
                self.set_buffers(buffers)
            elif weights is not None or meta is not None:
                self.load(weights or {}, meta or {})
        except BaseException:
            self.close()
            raise

    def _enable_peer_access(self) -> None:
        """Every rank's GPU reads and signals every other's memory."""
        for a in self.devices:
            for b in self.devices:
                if a == b:
                    continue
                rc = self.lib.mpk_enable_peer_access(a.index, b.index)
                if rc == -1:
                    raise MpkError(f"{a} cannot access the memory of {b} (no peer access between them); tensor "
                                   "parallelism needs GPUs joined by NVLink or peer-capable PCIe")
                check(self.lib, rc, f"enabling peer access from {a} to {b}")

    def _upload_tables(self, rs: RankState) -> None:
        dev, t, abi, tg = rs.device, rs.tables, self.abi, self.tg
        as_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        rs.dev.update(signals=as_dev(t.signals), signal_rank=as_dev(t.signal_rank), queue_off=as_dev(t.queue_off),
                      queue_tasks=as_dev(t.queue_tasks))
        rs.dev["counters"] = torch.zeros(len(t.ev_target), dtype=torch.int64, device=dev)  # read as u64 on the GPU
        rs.dev["ctl"] = torch.zeros(abi.kCtlWords, dtype=torch.int64, device=dev)
        rs.dev["seq_done"] = torch.zeros(tg.batch, dtype=torch.int32, device=dev)
        rs.dev["pos_offset"] = torch.zeros(tg.batch, dtype=torch.int64, device=dev)
        check(self.lib, self.lib.mpk_set_device(dev.index), "selecting the GPU")
        rs.mapped.update(out_tokens=Mapped(self.lib, tg.max_seq_len * tg.batch, ctypes.c_int32),
                         steps_done=Mapped(self.lib, 1, ctypes.c_int64),
                         progress=Mapped(self.lib, tg.num_sms * abi.kProgressWords, ctypes.c_int32),
                         host_flags=Mapped(self.lib, abi.kFlagWords, ctypes.c_int32))

    def _link_ranks(self) -> None:
        """Each rank's table of every rank's event counters and control words."""
        for rs in self.ranks:
            for name in ("counters", "ctl"):
                addresses = [other.address(name) for other in self.ranks]
                rs.dev["peer_" + name] = torch.tensor(addresses, dtype=torch.int64, device=rs.device)

    def _flags(self, index: int, value: int = 1) -> None:
        for rs in self.ranks:
            rs.mapped["host_flags"].array[index] = value

    def stop_state(self) -> str:
        """The words that end a run, as the last run left them: for an error about a run that ended early."""
        abi, words = self.abi, []
        for rs in self.ranks:
            stop = int(rs.dev["ctl"][abi.kCtlStopStep])
            words.append(f"{f'rank {rs.rank}: ' if len(self.ranks) > 1 else ''}"
                         f"stop step {'none' if stop == NO_STOP else stop}, "
                         f"steps done {int(rs.mapped['steps_done'].array[0])}, "
                         f"sequences finished {int(rs.dev['seq_done'].sum())} of {self.tg.batch}, "
                         f"stop request {int(rs.mapped['host_flags'].array[abi.kFlagStopRequest])}")
        return "; ".join(words)

    # --- tensors -------------------------------------------------------------------------------

    def load(self, weights: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]) -> None:
        """Copy weights and meta to the GPUs; allocate (poisoned) activations and state."""
        self.set_buffers(allocate(self.tg, weights, meta, self.devices, self.kv_pages))

    def set_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        for name, spec in self.tg.tensors.items():
            buf = buffers.get(name)
            if buf is None:
                raise MpkError(f"no buffer for tensor {name!r}")
            want, where = torch_dtype(spec.dtype), self.devices[spec.rank]
            shape = storage_shape(spec, self.kv_pages)
            if tuple(buf.shape) != shape or buf.dtype != want or buf.device != where or not buf.is_contiguous():
                raise MpkError(f"buffer {name!r} is {tuple(buf.shape)} {buf.dtype} on {buf.device}; the kernel needs a "
                               f"contiguous {shape} {want} on {where}")
        self.buffers = dict(buffers)
        address = lambda n: self.buffers[n].data_ptr()  # noqa: E731
        heads = prefetch_table(self.tg, address, head_limit=self.lib.mpk_head_bytes())
        counters = [rs.address("counters") for rs in self.ranks]
        for rs in self.ranks:
            lists = torch.zeros(max(1, rank_pointer_count(rs.tables.op_args)), dtype=torch.int64, device=rs.device)
            table, addresses = op_table(rs.tables.op_args, address, lists.data_ptr())
            lists.copy_(torch.from_numpy(addresses.view(np.int64)))
            rs.dev["rank_lists"] = lists
            rs.dev["prefetch"] = torch.from_numpy(heads.view(np.int64)).to(rs.device)
            entries = queue_entries(rs.tables, table, heads, counters, rs.rank)
            rs.dev["entries"] = torch.from_numpy(entries.view(np.uint8)).to(rs.device)
        self._ops = True

    # --- running -------------------------------------------------------------------------------

    def run(self, num_steps, max_new_tokens=None, on_step=None, *, first_step=0, eos_token_ids=None,
            collect_logits=False, position_offsets=None, trace: bool = False,
            watchdog_seconds: float | None = None) -> RunResult:
        """`Executor.run`, plus: `trace` records each task's wait, start and end times (%globaltimer,
        ns, each GPU's own clock) into `RunResult.trace` [steps, tasks, 3], and, in a kernel built with
        `task_marks`, the marks its template sets inside it (inputs staged, warp 0 done, the last warp
        done; 0 where it sets none) into `RunResult.marks` [steps, tasks, 3]; `collect_logits` runs one
        step per launch.

        A later run may continue at `first_step = previous first_step + steps` only after a run that
        was not stopped by on_step: after such a stop the kernel may already have run a step or two
        beyond the last one returned.
        """
        tg, B, abi = self.tg, self.tg.batch, self.abi
        if self._ops is None:
            raise MpkError("load weights and meta (Megakernel.load) before run()")
        self.check_kv_table()
        offsets = check_steps(tg, first_step, num_steps, position_offsets)
        limits = per_sequence_limits(B, max_new_tokens)
        eos = list(tg.model.get("eos_token_ids", ()) if eos_token_ids is None else eos_token_ids)
        self._n_eos = len(eos)
        self._watchdog = float(os.environ.get("MPK_WATCHDOG_SECONDS", "10")) if watchdog_seconds is None else watchdog_seconds
        if first_step == 0 and position_offsets is None and self.tables.n_sample:  # only a sampler feeds tokens back
            self.restart_tokens()
        if trace and collect_logits:
            raise MpkError("trace and collect_logits cannot be combined (collect_logits launches one step at a time)")
        for rs in self.ranks:
            rs.dev["eos"] = torch.tensor(eos or [-1], dtype=torch.int64, device=rs.device)
            rs.dev["max_new"] = torch.tensor([NO_LIMIT if n is None else int(n) for n in limits], dtype=torch.int64,
                                             device=rs.device)
            rs.dev["seq_done"].zero_()
            rs.dev["pos_offset"].copy_(torch.tensor(offsets, dtype=torch.int64))
            rs.dev["ctl"][abi.kCtlStopStep] = NO_STOP
            rs.mapped["steps_done"].array[0] = first_step
            rs.mapped["host_flags"].array[:] = 0
            # The kernel records by position in this rank's queues: [steps, this rank's tasks, kTraceWords].
            rs.trace = torch.zeros((num_steps, len(rs.tables.queue_tasks), abi.kTraceWords), dtype=torch.int64,
                                   device=rs.device) if trace else None

        first = self.ranks[0]
        tokens: list[list[int]] = []
        logits: list[torch.Tensor] = []
        stop_at = [None]  # the step after which on_step asked to stop
        launched_at = [first_step]  # the current launch's first step: the kernel writes tokens by launch step

        def deliver(upto: int) -> None:
            while first_step + len(tokens) < upto and stop_at[0] is None:
                s = first_step + len(tokens)
                rel = s - launched_at[0]
                tokens.append(first.mapped["out_tokens"].array[rel * B:(rel + 1) * B].tolist())
                if on_step is not None and on_step(s, tokens[-1]):
                    stop_at[0] = s
                    self._flags(abi.kFlagStopRequest)

        t0 = time.perf_counter()
        if collect_logits:
            for s in range(first_step, first_step + num_steps):
                launched_at[0] = s
                self._launch(s, 1, deliver)
                logits.append(self.logits())
                if stop_at[0] is not None or int(first.dev["ctl"][abi.kCtlStopStep]) <= s:
                    break
        else:
            self._launch(first_step, num_steps, deliver)
        seconds = time.perf_counter() - t0
        steps = len(tokens)
        spans = marks = None
        if trace:
            # The kernels record by queue position (unique across a rank's SMs); reindex by task id.
            records = torch.zeros((steps, len(tg.tasks), abi.kTraceWords), dtype=torch.int64)
            for rs in self.ranks:
                records[:, torch.from_numpy(rs.tables.queue_tasks).long()] = rs.trace[:steps].cpu()
            spans = records[..., :3].contiguous()
            marks = records[..., 3:].contiguous() if self.task_marks else None
        return RunResult(tokens, steps, seconds, steps < num_steps, logits[:steps], spans, marks)

    def _params(self, rs: RankState, first_step: int, num_steps: int, tag_base: int) -> Params:
        p = Params()
        for name in ("signals", "signal_rank", "queue_off", "queue_tasks", "entries", "counters", "ctl", "seq_done", "eos",
                     "max_new", "pos_offset", "prefetch", "peer_counters", "peer_ctl"):
            setattr(p, name, rs.address(name))
        for name, mapped in rs.mapped.items():
            setattr(p, name, mapped.dev)
        p.trace = rs.trace.data_ptr() if rs.trace is not None else 0
        p.first_step, p.num_steps, p.num_sms = first_step, num_steps, self.tg.num_sms
        p.n_eos, p.n_sample, p.batch = self._n_eos, rs.tables.n_sample, self.tg.batch
        p.rank, p.tp_size, p.tag_base = rs.rank, self.tg.tp_size, tag_base
        if self.kv_pages is not None:
            p.kv_blocks = rs.address("kv_blocks")
            p.kv_block_rows = self.kv_pages.block_rows
            p.kv_blocks_per_seq = self.kv_pages.table_shape(self.tg)[1]
        return p

    def set_kv_table(self, table: torch.Tensor) -> None:
        super().set_kv_table(table)
        for rs in self.ranks:  # every rank's shard of the cache has the same blocks
            rs.dev["kv_blocks"] = self.kv_table.to(rs.device)

    def _launch(self, first_step: int, num_steps: int, deliver) -> None:
        """Launch every rank's kernel, stream tokens while they run, and watch for a stall."""
        if self._broken:
            raise MpkError(f"this megakernel cannot run again: {self._broken}; restart the process")
        abi = self.abi
        if self._tag_base + num_steps >= 1 << 32:  # tags are 32 bits: start over on zeroed mailboxes
            for name, spec in self.tg.tensors.items():
                if spec.kind == "mailbox":
                    self.buffers[name].zero_()
            self._tag_base = 0
        # This launch's tags are never used again, even if it fails, stops or is aborted.
        tag_base, self._tag_base = self._tag_base, self._tag_base + num_steps
        for rs in self.ranks:
            rs.dev["counters"].zero_()
            rs.dev["ctl"][abi.kCtlSampled] = 0
            rs.mapped["progress"].array[:] = 0
        if len(self.ranks) > 1:  # a peer may signal a rank's counters before that rank's stream zeroes them
            for rs in self.ranks:
                torch.cuda.synchronize(rs.device)
        for rs in self.ranks:
            rs.done = None
        for rs in self.ranks:
            stream = torch.cuda.current_stream(rs.device)
            params = self._params(rs, first_step, num_steps, tag_base)
            check(self.lib, self.lib.mpk_set_device(rs.device.index), "selecting the GPU")
            rc = self.lib.mpk_launch(ctypes.byref(params), ctypes.c_void_p(stream.cuda_stream))
            if rc != 0 and rs.rank > 0:  # the ranks already running would wait for this one forever
                self._flags(abi.kFlagAbort)
                self._wait_exit(10.0)
            check(self.lib, rc, f"launching the megakernel on {rs.device}")
            rs.done = torch.cuda.Event()
            rs.done.record(stream)
        try:
            self._watch(deliver, first_step)
        except MpkError:
            raise
        except BaseException:
            # Ctrl-C or an exception from on_step: stop the kernels before anything else may launch.
            self._flags(abi.kFlagStopRequest)
            self._flags(abi.kFlagAbort)
            if not self._wait_exit(10.0):
                self._broken = "its launch did not stop within 10 s of an interrupt and may still be running"
            raise
        if not self.tables.n_sample:
            # Without a sampling task nothing publishes steps_done, and nothing can stop the run early.
            self.ranks[0].mapped["steps_done"].array[0] = first_step + num_steps
        deliver(int(self.ranks[0].mapped["steps_done"].array[0]))

    def _watch(self, deliver, first_step: int) -> None:
        """Stream tokens until every rank's launch has ended; abort them when neither the SMs'
        progress words nor the step counters have moved for the watchdog's time (a stalled event,
        a hang inside a task, or a rank that left while its peers wait for it)."""
        def snapshot():
            return ([rs.mapped["progress"].array.copy() for rs in self.ranks],
                    [int(rs.mapped["steps_done"].array[0]) for rs in self.ranks])

        (seen, seen_steps), last_change = snapshot(), time.monotonic()
        while not self._all_exited():
            deliver(int(self.ranks[0].mapped["steps_done"].array[0]))
            now, (words, steps) = time.monotonic(), snapshot()
            if steps != seen_steps or any(not np.array_equal(a, b) for a, b in zip(words, seen)):
                seen, seen_steps, last_change = words, steps, now
            elif now - last_change > self._watchdog:
                self._abort(seen, first_step)
            time.sleep(self.poll_seconds)

    def _all_exited(self) -> bool:
        """Whether every rank's launch has ended; a device fault becomes one clear error (after the
        other ranks, which would wait for the faulted one, are stopped)."""
        exited = True
        for rs in self.ranks:
            if rs.done is None:  # not launched
                continue
            try:
                exited = rs.done.query() and exited
            except RuntimeError as e:  # an illegal address or a device assert: CUDA errors are sticky
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self._broken = f"it faulted on the GPU ({reason})"
                where = f" on rank {rs.rank} ({rs.device})" if self.tg.tp_size > 1 else ""
                if self.tg.tp_size > 1:
                    self._flags(self.abi.kFlagAbort)
                raise MpkError(f"the megakernel faulted on the GPU{where}: {reason}; this process's CUDA context is "
                               "unusable, so restart it (MPK_DEBUG=1 builds the kernel with device asserts)") from None
        return exited

    def _wait_exit(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not self._all_exited():
            if time.monotonic() > deadline:
                return False
            time.sleep(1e-3)
        return True

    def _abort(self, snapshot: list[np.ndarray], first_step: int) -> None:
        """Tell the kernels to leave their wait loops, then raise with who waited on what."""
        abi = self.abi
        self._flags(abi.kFlagAbort)
        exited = self._wait_exit(10.0)
        counters = [rs.dev["counters"].cpu().tolist() for rs in self.ranks] if exited else None
        # After the abort each stuck SM re-published its wait as aborted; else use the last snapshot.
        if exited:
            words, state = [rs.mapped["progress"].array for rs in self.ranks], abi.kStateAborted
        else:
            words, state = snapshot, abi.kStateWaiting
        what = stall_report(self.tg, abi, words, state, counters, first_step)
        tail = ""
        if not exited:
            self._broken = "its launch did not exit after the watchdog's abort"
            tail = "; the kernel did not exit after the abort, the GPU is unusable in this process"
        raise MpkError(f"the megakernel made no progress for {self._watchdog:g} s: {what}{tail}")

    def close(self) -> None:
        """Free the host-mapped memory and drop the GPU buffers (idempotent)."""
        for rs in self.ranks:
            for mapped in rs.mapped.values():
                mapped.free()
            rs.mapped = {}
            rs.dev = {}
        self.buffers, self._ops = {}, None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA runtime may already be gone
            pass
