"""nvcc build of a generated kernel into a shared library, cached by content hash.

The cache key covers everything that decides the binary: the generated source, the headers it
includes, the nvcc version and the flags. Concurrent builds of one key (two processes, or two
tests) serialise on a lock file; the library appears by atomic rename, so a reader never sees a
half-written file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

from mpk import defaults
from mpk.errors import MpkError
from mpk.progress import phase

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC_FALLBACK = "/usr/local/cuda/bin/nvcc"


def cache_dir() -> Path:
    return Path(os.environ.get("MPK_CACHE_DIR") or Path.home() / ".cache" / "mpk")


def writable_cache(cache: Path | None = None) -> Path:
    """The build cache directory, created if need be; an MpkError when it cannot hold a build."""
    cache = Path(cache) if cache is not None else cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise _cache_error(cache, "it is a file, not a directory") from None
    except OSError as e:
        raise _cache_error(cache, e.strerror or type(e).__name__) from None
    if not os.access(cache, os.W_OK | os.X_OK):
        raise _cache_error(cache, "it is read-only")
    return cache


def _cache_error(cache: Path, why: str) -> MpkError:
    return MpkError(f"cannot use the kernel build cache {cache} ({why}); "
                    "set MPK_CACHE_DIR to a writable directory")


def find_nvcc() -> str:
    """The nvcc to use: $CUDACXX, nvcc on PATH, then the usual install location."""
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), NVCC_FALLBACK):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise MpkError("nvcc not found: install the CUDA toolkit or set CUDACXX")


@lru_cache(maxsize=None)
def nvcc_version(nvcc: str) -> str:
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise MpkError(f"{nvcc} --version failed ({e}); is the CUDA toolkit installed correctly?") from None


def arch_for_capability(major: int, minor: int) -> str:
    """The build target of a device: Hopper and Blackwell datacenter parts get their 'a' targets."""
    return f"sm_{major}{minor}" + ("a" if (major, minor) in ((9, 0), (10, 0)) else "")


def gencode(arch: str) -> str:
    m = re.fullmatch(r"sm_(\d+)(a?)", arch)
    if not m:
        raise MpkError(f"unknown GPU architecture {arch!r}; expected a name like sm_90a or sm_80")
    num, suffix = m.groups()
    if int(num) < 80:
        raise MpkError(f"{arch} is too old: the megakernel needs sm_80 or newer (Ampere, Hopper, Blackwell)")
    return f"-gencode=arch=compute_{num}{suffix},code=sm_{num}{suffix}"


# Largest dynamic shared memory one CTA may use, in KB, by compute capability (CUDA programming
# guide, "Technical Specifications"); the rest of the Ampere-and-newer parts have 99 KB.
_SMEM_PER_CTA_KB = {80: 163, 87: 163, 90: 227, 100: 227, 103: 227}


def bulk_copy(arch: str) -> bool:
    """Whether `arch` has bulk asynchronous copies into shared memory (Hopper and newer)."""
    return int(re.fullmatch(r"sm_(\d+)a?", arch).group(1)) >= 90


def smem_cap(arch: str) -> int:
    """Bytes of dynamic shared memory one CTA may use on `arch` (the kernel's kSmemCap)."""
    num = int(re.fullmatch(r"sm_(\d+)a?", arch).group(1))
    return _SMEM_PER_CTA_KB.get(num, 99) * 1024


def _env_choice(name: str, choices: tuple[str, ...], unit: str = "") -> str:
    """A build knob that takes one of `choices` (the first when unset)."""
    value = os.environ.get(name, choices[0])
    if value not in choices:
        raise MpkError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}{unit}, not {value!r}")
    return value


def nvcc_flags(arch: str, debug: bool) -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo", gencode(arch), f"-I{CSRC}",
             f"-DMPK_SMEM_CAP={smem_cap(arch)}", f"-DMPK_BULK_COPY={int(bulk_copy(arch))}"]
    if debug:
        flags.append("-DMPK_DEBUG")  # device asserts: bounds, tile coordinates, event lags
    if _env_choice("MPK_GEMV", ("auto", "simt")) == "simt":
        flags.append("-DMPK_GEMV_SIMT")  # every GEMV on CUDA cores, for A/B comparisons
    l2_fetch = _env_choice("MPK_L2_FETCH", ("auto", "0", "64", "128", "256"), " bytes")
    if l2_fetch != "auto":  # one L2 prefetch size for the tensor-core GEMV's weight loads, for A/B
        flags.append(f"-DMPK_L2_FETCH={l2_fetch}")
    x_batch = _env_choice("MPK_X_BATCH", ("auto", "1", "2", "4", "8", "16"))
    if x_batch != "auto":  # x vectors per thread and round in the GEMV prologue (gemv_base.cuh), for A/B
        flags.append(f"-DMPK_X_BATCH={x_batch}")
    # For A/B: the bounds of the batch 2-4 GEMVs kept on CUDA cores (gemv.cuh), the vectors a thread holds
    # for the one-pass prologue (gemv_base.cuh), the size above which a normed x goes through shared
    # memory (gemv_mma.cuh), the attention splits' K/V ring (attention.cuh), and bytes of code that never
    # runs ahead of the persistent loop (mpk_runtime.cuh), to measure where code lands apart from a change.
    for knob in ("MPK_SIMT_ROWS", "MPK_SIMT_WORK_KB", "MPK_X_REGS", "MPK_RAW_STAGE_KB", "MPK_ATTN_RING", "MPK_CODE_PAD"):
        value = os.environ.get(knob, "")
        if value:
            if not value.isdigit():
                raise MpkError(f"{knob} must be a whole number, not {value!r}")
            flags.append(f"-D{knob}={int(value)}")
    head_kb = os.environ.get("MPK_HEAD_KB", "")
    if head_kb:
        if not (head_kb.isdigit() or head_kb == "max"):
            raise MpkError(f"MPK_HEAD_KB must be a number of KB or max, not {head_kb!r}")
        # Weight heads in shared memory (off by default), for A/B comparisons.
        flags.append(f"-DMPK_HEAD_KB={-1 if head_kb == 'max' else int(head_kb)}")
    inject = os.environ.get("MPK_INJECT", "")
    if inject:  # test hooks: one task hangs inside itself, or faults
        what, _, task = inject.partition(":")
        if what not in ("hang", "fault") or not task.isdigit():
            raise MpkError(f"MPK_INJECT must be hang:TASK or fault:TASK (a task id), not {inject!r}")
        flags.append(f"-DMPK_INJECT_{what.upper()}={int(task)}")
    return flags


def _headers_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(CSRC.glob("*.cuh")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def build(source: str, arch: str = defaults.ARCH, debug: bool | None = None, cache: Path | None = None,
          announce: bool = True) -> Path:
    """Compile `source` (from mpk.codegen) into a .so for `arch`; return its path (cached).

    `debug` None reads MPK_DEBUG from the environment; `announce` False builds without a progress phase.
    """
    if debug is None:
        debug = os.environ.get("MPK_DEBUG", "") not in ("", "0")
    nvcc = find_nvcc()
    flags = nvcc_flags(arch, debug)
    key = hashlib.sha256("\0".join([source, _headers_digest(), nvcc_version(nvcc), *flags]).encode()).hexdigest()[:24]
    cache = writable_cache(cache)
    so = cache / f"mpk-{arch}-{key}.so"
    if so.exists():
        return so
    try:
        with open(cache / f"mpk-{arch}-{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if so.exists():  # another process built it while we waited
                return so
            with phase(f"building the megakernel for {arch} with nvcc (cached for later runs)") if announce \
                    else nullcontext():
                return _compile(nvcc, flags, source, so)
    except OSError as e:  # a full disk, or permissions that os.access did not foresee
        raise _cache_error(cache, e.strerror or type(e).__name__) from None


def build_all(sources: list[str], arch: str = defaults.ARCH, debug: bool | None = None,
              cache: Path | None = None) -> list[Path]:
    """`build` for several kernels at once, one nvcc process each, side by side (a server's kernels of
    1, 2, 4, ... slots); cached ones cost nothing."""
    from concurrent.futures import ThreadPoolExecutor

    if not sources:
        return []
    with phase(f"building {len(sources)} megakernels for {arch} with nvcc (cached for later runs)"):
        with ThreadPoolExecutor(max_workers=min(len(sources), os.cpu_count() or 1)) as pool:
            return list(pool.map(lambda src: build(src, arch, debug, cache, announce=False), sources))


def _compile(nvcc: str, flags: list[str], source: str, so: Path) -> Path:
    log = so.with_suffix(".log")
    with tempfile.TemporaryDirectory(dir=so.parent, prefix=".build-") as tmp:
        cu = Path(tmp) / "kernel.cu"
        cu.write_text(source)
        out = Path(tmp) / "kernel.so"
        try:
            proc = subprocess.run([nvcc, *flags, str(cu), "-o", str(out)], capture_output=True, text=True)
        except OSError as e:
            raise MpkError(f"cannot run {nvcc} ({e.strerror or e}); is the CUDA toolkit installed correctly?") from None
        log.write_text(f"$ {nvcc} {' '.join(flags)} kernel.cu\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            kept = so.with_suffix(".cu")
            kept.write_text(source)
            raise MpkError(f"nvcc failed to build the megakernel: {_first_error(proc.stdout + proc.stderr)} "
                           f"(full log: {log}, source: {kept})")
        os.replace(out, so)
    return so


def _first_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower():
            return ln
    return lines[0] if lines else "no compiler output"
