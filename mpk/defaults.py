"""Defaults that more than one module needs, each in one place."""

NUM_SMS = 132  # SMs of an H100 / H200: what `mpk inspect` and `compile_model` schedule for unless told
SIM_NUM_SMS = 16  # SMs the CPU executor schedules for unless told otherwise
ARCH = "sm_90a"  # the build target when no GPU says otherwise (`mpk build`)
MAX_SEQ_LEN = 4096  # KV cache length of `mpk inspect` and `compile_model`
PREFILL_CHUNK_ROWS = 8192  # rows (sequences x positions) of one op-by-op prefill chunk on the GPU (mpk.prefill)
KV_BLOCK_ROWS = 64  # rows of a paged KV cache's block unless told (mpk.paging)
SERVE_MAX_BATCH = 64  # requests `mpk serve` generates together on a GPU
SERVE_MAX_BATCH_SIM = 8  # ... and on the CPU executor, whose cache is not sized from a device's memory
SERVE_GPU_MEMORY_UTILIZATION = 0.9  # share of a GPU's memory `mpk serve` sizes its paged KV cache to fill
