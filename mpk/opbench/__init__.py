"""`mpk bench-op`: each CUDA task template alone, beside its reference, its check and its benchmark.

For every op variant of a model's decode graph, a one-op graph runs on the megakernel runtime with
its tasks on one SM and over all SMs, and its outputs are checked against the op kind's PyTorch
reference on the same random inputs. Modules: `program` (one-op graphs), `check` (inputs and the
reference check), `measure` (times from traces), `report` (rows and the table), `run` (the GPU side).
"""

# Defaults of `mpk bench-op`, here so the CLI can show them without importing torch.
DEFAULT_MODEL = "qwen3-8b"
DEFAULT_CONTEXT = 4096  # positions already in the KV cache when the timed steps start
DEFAULT_STEPS = 8  # steps per launch; step 0 of each launch is not timed
DEFAULT_REPEATS = 3  # timed launches after a warm-up
