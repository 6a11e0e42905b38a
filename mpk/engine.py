"""Generation: prompts in, new tokens out, through a compiled decode TaskGraph.

Every step feeds one token per sequence. Prompts go through the same decode step one token at a
time (the sampling task forwards the prompt's next token until the prompt is used up), so all
sequences sit at the same position and prompts may differ in length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mpk import defaults
from mpk.compiler import compile_model
from mpk.dtypes import torch_dtype
from mpk.errors import MpkError
from mpk.execution import Executor
from mpk.graph import DEFAULT_ACTIVATIONS, DEFAULT_KV_CACHE, DEFAULT_MATMUL_INPUTS
from mpk.inputs import fuse_weights, program_inputs
from mpk.models.config import ModelConfig
from mpk.taskgraph import TaskGraph

SUPPORTED_DTYPES = ("float32", "bfloat16")  # weight dtypes `generate` takes


@dataclass
class Generation:
    token_ids: list[list[int]]  # the new tokens of each sequence
    steps: int
    seconds: float
    logits: list[torch.Tensor] = field(default_factory=list)  # per step, [batch, vocab] float32, if collected
    taskgraph: TaskGraph | None = None


def check_prompts(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int) -> int:
    """Validate; return the context length needed (positions 0 .. longest prompt + new tokens - 1)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MpkError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise MpkError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise MpkError(f"token id {bad[0]} is outside the vocabulary (0..{cfg.vocab_size - 1})")
    need = max(len(p) for p in prompts) + max_new_tokens - 1
    if need > cfg.max_position_embeddings:
        raise MpkError(
            f"the prompt ({max(len(p) for p in prompts)} tokens) plus {max_new_tokens} new tokens exceeds the model's "
            f"context of {cfg.max_position_embeddings}; shorten the prompt or ask for fewer tokens"
        )
    return need


class _Collector:
    """Turns each finished step's tokens into new tokens per sequence, streaming them as they come."""

    def __init__(self, prompts, max_new_tokens: int, eos: set[int], on_tokens):
        self.prompts, self.max_new, self.eos, self.on_tokens = prompts, max_new_tokens, eos, on_tokens
        self.new_tokens: list[list[int]] = [[] for _ in prompts]
        self.finished = [False] * len(prompts)

    def step(self, step: int, tokens: list[int]) -> bool:
        """Record step `step`'s tokens (one per sequence); True once every sequence is finished."""
        for s, p in enumerate(self.prompts):
            if self.finished[s] or step < len(p) - 1:
                continue
            self.new_tokens[s].append(tokens[s])
            if self.on_tokens is not None:
                self.on_tokens(s, tokens[s])
            self.finished[s] = tokens[s] in self.eos or len(self.new_tokens[s]) >= self.max_new
        return all(self.finished)


def open_executor(backend: str, tg: TaskGraph, weights: dict, meta: dict, *, device=None, seed: int = 0,
                  buffers: dict | None = None, kv_pages=None) -> Executor:
    """The CPU executor (`sim`) or the GPU megakernel (`cuda`) holding `tg` with these inputs, or
    over these `buffers` (every tensor of the graph, already in place). `kv_pages`: a paged KV cache
    (`mpk.paging.KvPages`)."""
    if backend == "sim":
        from mpk.sim import CpuExecutor

        return CpuExecutor(tg, weights, meta, seed=seed, buffers=buffers, kv_pages=kv_pages)
    from mpk.runtime import Megakernel

    where = device if tg.tp_size == 1 else None
    if buffers is not None:
        return Megakernel(tg, device=where, buffers=buffers, kv_pages=kv_pages)
    return Megakernel(tg, device=where, weights=weights, meta=meta, kv_pages=kv_pages)


def generate(cfg: ModelConfig, hf_weights: dict[str, torch.Tensor], prompts: list[list[int]], max_new_tokens: int,
             *, backend: str = "sim", dtype: str = "float32", num_sms: int | None = None, tp_size: int = 1,
             seed: int = 0, stop_at_eos: bool = True, collect_logits: bool = False, on_tokens=None,
             activations: str = DEFAULT_ACTIVATIONS, kv_cache: str = DEFAULT_KV_CACHE,
             matmul_inputs: str = DEFAULT_MATMUL_INPUTS) -> Generation:
    """Greedy generation on the CPU executor (`sim`) or the GPU megakernel (`cuda`).

    `dtype` is the weights' dtype, `activations`, `kv_cache` and `matmul_inputs` the graph's precisions (see
    `mpk.graph.precision_of`). `on_tokens(seq, token)` is called for each new token as soon as its
    step is done.
    """
    if backend not in ("sim", "cuda"):
        raise MpkError(f"unknown backend {backend!r}; choose sim or cuda")
    if dtype not in SUPPORTED_DTYPES:
        raise MpkError(f"unsupported dtype {dtype!r}; choose one of {', '.join(SUPPORTED_DTYPES)}")
    if backend == "cuda" and dtype != "bfloat16":
        raise MpkError("the GPU megakernel runs bfloat16; pass --dtype bfloat16 (float32 is for the CPU executor)")
    seq_len = check_prompts(cfg, prompts, max_new_tokens)
    device = None
    if backend == "cuda":
        from mpk.runtime import cuda_device

        device = cuda_device()
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    tg = compile_model(cfg, batch=len(prompts), max_seq_len=seq_len, tp_size=tp_size,
                       num_sms=defaults.SIM_NUM_SMS if num_sms is None else num_sms, activations=activations,
                       weights=dtype, kv_cache=kv_cache, matmul_inputs=matmul_inputs)
    fused = fuse_weights(cfg, hf_weights, tp_size, torch_dtype(dtype))
    weights, meta = program_inputs(cfg, tg, fused, prompts)
    eos = set(cfg.eos_token_ids) if stop_at_eos else set()
    collector = _Collector(prompts, max_new_tokens, eos, on_tokens)

    t0 = time.perf_counter()
    with open_executor(backend, tg, weights, meta, device=device, seed=seed) as executor:
        result = executor.run(seq_len, max_new_tokens=max_new_tokens, on_step=collector.step,
                              eos_token_ids=sorted(eos), collect_logits=collect_logits)
    return Generation(collector.new_tokens, result.steps, time.perf_counter() - t0, result.logits, tg)
