"""Will a run fit? The memory a generation needs, estimated before any weight is loaded.

The estimate follows what generation holds at its peak (`mpk.engine.generate`):
- the checkpoint's weights in the run's dtype, kept for the whole run;
- the fused copies made from them: QKV (per KV group) and gate/up (interleaved) are new tensors,
  and with tensor parallelism the column slices of o and down are too (embed, lm_head and the
  norms are used in place);
- the KV cache and the activations, in the activation dtype;
- on the GPU, the op-by-op prefill's activations at their widest (the MLP of a chunk of up to
  `defaults.PREFILL_CHUNK_ROWS` rows);
- a fixed allowance for the process (Python, torch, the executor's bookkeeping).
On the CPU executor this is within 1% of the measured peak RSS of qwen3-0.6b, llama-3.2-1b and
qwen3-1.7b: about 1.5-1.6x the weights. The GPU backend holds the same tensors in GPU memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mpk import defaults
from mpk.errors import MpkError
from mpk.graph import GEMV_MAX_BATCH, MAX_K_SPLITS
from mpk.models.config import ModelConfig

GIB = 1 << 30
PROCESS_ALLOWANCE = {"CPU RAM": 256 << 20, "GPU memory": 512 << 20}  # RSS of python + torch; allocator slack
SKIP_ENV = "MPK_NO_MEMORY_CHECK"  # set to 1 to run even when the estimate says it will not fit
ATTN_SPLIT_ROWS = 32  # mpk.graph.MIN_ATTN_CHUNK: an attention split covers at least this many KV rows


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes one device must hold for a run, by what they are for."""

    device: str  # "CPU RAM" or "GPU memory"
    weights: int
    fused: int  # copies made when fusing and sharding the weights
    kv_cache: int
    workspace: int  # activations, logits, RoPE tables, the process allowance

    @property
    def total(self) -> int:
        return self.weights + self.fused + self.kv_cache + self.workspace

    def per_rank(self, tp_size: int) -> "MemoryNeed":
        """One GPU's share with tensor parallelism: its slice of the weights (loaded on the host and
        sliced there, so no fused copies on the GPU) and of the KV heads, and a whole workspace."""
        return MemoryNeed(self.device, self.weights // tp_size, 0, self.kv_cache // tp_size, self.workspace)

    def describe(self) -> str:
        parts = [(self.weights, "weights"), (self.fused, "fused weight copies"), (self.kv_cache, "KV cache"),
                 (self.workspace, "workspace")]
        return " + ".join(f"{gib(n)} {what}" for n, what in parts if n)


def estimate(cfg: ModelConfig, *, batch: int, max_seq_len: int, tp_size: int = 1, weight_bytes: int = 2,
             activation_bytes: int = 4, kv_bytes: int = 2, device: str = "CPU RAM") -> MemoryNeed:
    """What generating `batch` sequences of up to `max_seq_len` tokens holds on `device`."""
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qkv_rows = q_dim + 2 * kv_dim
    copied = qkv_rows * H + 2 * I * H
    if tp_size > 1:
        copied += H * q_dim + H * I
    kv_cache = 2 * L * batch * max_seq_len * kv_dim * kv_bytes
    per_layer = batch * (qkv_rows + 2 * q_dim + I + 2 * H) * activation_bytes
    splits = -(-max_seq_len // ATTN_SPLIT_ROWS)
    per_layer += batch * cfg.num_heads * splits * (cfg.head_dim + 1) * 4  # float32 attention partials and LSEs
    if tp_size > 1 and batch <= GEMV_MAX_BATCH:
        per_layer += 2 * batch * H * 8 * tp_size  # o's and down's inboxes (8-byte words)
    elif tp_size > 1:
        per_layer += 2 * batch * H * 4 * tp_size  # float32 partial sums of o and down, every rank
    elif batch > GEMV_MAX_BATCH:
        per_layer += 2 * batch * H * 4 * MAX_K_SPLITS  # at most: the K slices of o and down (graph.k_splits)
    workspace = (L * per_layer + batch * V * 4 + max_seq_len * cfg.head_dim * 4 + PROCESS_ALLOWANCE[device])
    if device == "GPU memory":
        rows = min(batch * max_seq_len, defaults.PREFILL_CHUNK_ROWS)
        workspace += rows * (5 * I + 4 * H) * 4  # at the MLP: gate/up, h, their bf16 copies; x, residual
    return MemoryNeed(device, cfg.num_params() * weight_bytes, L * copied * weight_bytes, kv_cache, workspace)


def kv_block_bytes(cfg: ModelConfig, block_rows: int, kv_bytes: int = 2) -> int:
    """Bytes of one block of a paged KV cache (`mpk.paging`): K and V of every layer, all GPUs together."""
    return 2 * cfg.num_layers * block_rows * cfg.num_kv_heads * cfg.head_dim * kv_bytes


def kv_blocks_within(need: MemoryNeed, capacity: int, utilization: float, block_bytes: int) -> int:
    """Blocks a paged KV cache gets from `utilization` of a device's `capacity` bytes, once the
    weights and the workspace of `need` have their share (vLLM's --gpu-memory-utilization)."""
    if not 0 < utilization <= 1:
        raise MpkError(f"--gpu-memory-utilization must be in (0, 1], not {utilization}")
    return max(0, int(utilization * capacity) - (need.total - need.kv_cache)) // block_bytes


TOO_BIG = "use a smaller model or a bigger machine"


def check_fits(need: MemoryNeed, available: int, what: str, advice: str = TOO_BIG) -> None:
    """Raise a one-line MpkError when `need` exceeds `available` bytes (unless MPK_NO_MEMORY_CHECK=1)."""
    if need.total <= available or os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    raise MpkError(
        f"{what} needs about {gib(need.total)} of {need.device} ({need.describe()}) but {gib(available)} is "
        f"available; {advice} ({SKIP_ENV}=1 runs anyway)"
    )


def available_cpu_bytes() -> int:
    """Memory this process may still take: MemAvailable, capped by a cgroup limit (containers)."""
    available = _meminfo_available()
    limit = _cgroup_headroom()
    return min(available, limit) if limit is not None else available


def available_gpu_bytes(device) -> int:
    import torch

    return int(torch.cuda.mem_get_info(device)[0])


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def _cgroup_headroom() -> int | None:
    """limit - usage of this process's memory cgroup (v2, then v1), page cache not counted as used."""
    for limit_file, usage_file, stat_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
         "/sys/fs/cgroup/memory/memory.stat"),
    ):
        try:
            limit_text = Path(limit_file).read_text().strip()
            if limit_text == "max":
                return None
            limit, usage = int(limit_text), int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # cgroup v1 spells "no limit" as a huge number
            return None
        return max(0, limit - usage + _reclaimable(Path(stat_file)))
    return None


def _reclaimable(stat_file: Path) -> int:
    try:
        for line in stat_file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
