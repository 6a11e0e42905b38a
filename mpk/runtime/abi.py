"""The C ABI of a built megakernel: table layouts, the launch parameters, exported constants.

The structs of mpk/csrc/mpk_runtime.cuh are mirrored here (numpy dtypes for the tables, ctypes for
MpkParams) and their sizes checked against the library's own `sizeof`s when it loads. Enumerations
(control words, flags, progress words, SM states) are not copied: the library exports them by name
(`mpk_abi_constant`), and `Abi` reads them once.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from mpk.errors import MpkError

TASK_DTYPE = np.dtype([("variant", "<i4"), ("op", "<i4"), ("tile", "<i4", (3,)), ("wait", "<i4"),
                       ("sig_off", "<i4"), ("sig_cnt", "<i4")])
OP_DTYPE = np.dtype([("ptr", "<u8", (8,)), ("i", "<i8", (8,)), ("f", "<f4", (4,))])
ENTRY_SIGNALS = 4  # kEntrySignals
ENTRY_DTYPE = np.dtype([("task", TASK_DTYPE), ("op", OP_DTYPE), ("id", "<i4"), ("ev_target", "<i4"), ("ev_lag", "<i4"),
                        ("ev_sys", "<i4"), ("next_l2", "<u8", (2,)), ("sig", "<u8", (ENTRY_SIGNALS,)), ("sig_sys", "<i4"),
                        ("ev_polled", "<i4"), ("pad", "<i4", (2,))])

_PTR_FIELDS = ("signals", "signal_rank", "queue_off", "queue_tasks", "entries", "counters", "ctl", "seq_done", "eos",
               "max_new", "pos_offset", "out_tokens", "steps_done", "progress", "host_flags", "prefetch", "trace",
               "peer_counters", "peer_ctl", "kv_blocks")
_INT_FIELDS = ("first_step", "num_steps", "num_sms", "n_eos", "n_sample", "batch", "rank", "tp_size", "kv_block_rows",
               "kv_blocks_per_seq", "tag_base")


class Params(ctypes.Structure):
    """MpkParams: every field is 8 bytes, so the mirror has no padding questions."""

    _fields_ = [(n, ctypes.c_void_p) for n in _PTR_FIELDS] + [(n, ctypes.c_int64) for n in _INT_FIELDS]


class Abi:
    """The constants a library exports, as attributes: `abi.kCtlStopStep`, `abi.kStateWaiting`, ..."""

    def __init__(self, lib):
        self._values = {}
        for i in range(lib.mpk_abi_count()):
            self._values[lib.mpk_abi_name(i).decode()] = lib.mpk_abi_value(i)

    def __getattr__(self, name: str) -> int:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"the megakernel library exports no constant {name!r}") from None


def check(lib, rc: int, what: str) -> None:
    if rc != 0:
        raise MpkError(f"{what} failed: {lib.mpk_error_string(rc).decode()} (CUDA error {rc})")


def load_library(path: Path):
    """ctypes handle of a built megakernel, with argument types set and the struct sizes checked."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise MpkError(f"cannot load the megakernel library {path}: {e}") from None
    for name in ("mpk_params_size", "mpk_task_desc_size", "mpk_op_desc_size", "mpk_queue_entry_size", "mpk_num_threads",
                 "mpk_smem_bytes", "mpk_num_variants", "mpk_set_device", "mpk_abi_count", "mpk_head_bytes"):
        getattr(lib, name).restype = ctypes.c_int
    lib.mpk_error_string.restype = ctypes.c_char_p
    lib.mpk_variants.restype = ctypes.c_char_p
    lib.mpk_abi_name.restype = ctypes.c_char_p
    lib.mpk_abi_name.argtypes = [ctypes.c_int]
    lib.mpk_abi_value.restype = ctypes.c_longlong
    lib.mpk_abi_value.argtypes = [ctypes.c_int]
    lib.mpk_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.mpk_launch.restype = ctypes.c_int
    lib.mpk_blocks_per_sm.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.mpk_enable_peer_access.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.mpk_enable_peer_access.restype = ctypes.c_int
    lib.mpk_host_alloc.argtypes = [ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
    lib.mpk_host_free.argtypes = [ctypes.c_void_p]
    for fn, want in ((lib.mpk_params_size, ctypes.sizeof(Params)), (lib.mpk_task_desc_size, TASK_DTYPE.itemsize),
                     (lib.mpk_op_desc_size, OP_DTYPE.itemsize), (lib.mpk_queue_entry_size, ENTRY_DTYPE.itemsize)):
        if fn() != want:
            raise MpkError(f"{path} was built from other headers than this mpk ({fn.__name__} {fn()} != {want}); "
                           "clear MPK_CACHE_DIR and rebuild")
    return lib


class Mapped:
    """Pinned host memory that the GPU reads and writes directly, viewed as a numpy array."""

    def __init__(self, lib, n: int, ctype):
        self._lib, host, dev = lib, ctypes.c_void_p(), ctypes.c_void_p()
        self.host = None
        check(lib, lib.mpk_host_alloc(ctypes.c_size_t(max(1, n) * ctypes.sizeof(ctype)), ctypes.byref(host),
                                      ctypes.byref(dev)), "allocating host-mapped memory")
        self.host, self.dev = host.value, dev.value
        self.array = np.ctypeslib.as_array(ctypes.cast(self.host, ctypes.POINTER(ctype)), shape=(max(1, n),))

    def free(self) -> None:
        if self.host:
            self.array = None
            self._lib.mpk_host_free(ctypes.c_void_p(self.host))
            self.host = None
