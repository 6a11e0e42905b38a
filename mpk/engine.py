"""Generation: prompts in, new tokens out, through a compiled decode TaskGraph.

Every step feeds one token per sequence. Prompts go through the same decode step one token at a
time (the sampling task forwards the prompt's next token until the prompt is used up), so all
sequences sit at the same position and prompts may differ in length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch

from mpk.compiler import compile_model
from mpk.errors import MpkError
from mpk.graph import DEFAULT_ACTIVATIONS, tensor_name
from mpk.models.config import ModelConfig, rope_tables
from mpk.taskgraph import TaskGraph

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SIM_NUM_SMS = 16  # SMs the CPU executor schedules for unless told otherwise


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


def program_inputs(cfg: ModelConfig, tg: TaskGraph, fused: dict[str, torch.Tensor], prompts: list[list[int]]):
    """Weights (fused, plus RoPE tables) and meta tensors for every rank of the graph."""
    cos, sin = rope_tables(cfg, tg.max_seq_len)
    prompt = torch.zeros(len(prompts), tg.max_seq_len, dtype=torch.int64)
    for b, p in enumerate(prompts):
        prompt[b, : len(p)] = torch.tensor(p)
    weights, meta = dict(fused), {}
    for r in range(tg.tp_size):
        n = partial(tensor_name, r, tg.tp_size)
        weights[n("rope_cos")], weights[n("rope_sin")] = cos, sin
        meta[n("tokens")] = prompt[:, 0].clone()
        meta[n("prompt")] = prompt
        meta[n("prompt_len")] = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    return weights, meta


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


def generate(cfg: ModelConfig, hf_weights: dict[str, torch.Tensor], prompts: list[list[int]], max_new_tokens: int,
             *, backend: str = "sim", dtype: str = "float32", num_sms: int | None = None, tp_size: int = 1,
             seed: int = 0, stop_at_eos: bool = True, collect_logits: bool = False, on_tokens=None,
             activations: str = DEFAULT_ACTIVATIONS) -> Generation:
    """Greedy generation on the CPU executor (`sim`) or the GPU megakernel (`cuda`).

    `activations` is the graph's activation precision (see `mpk.graph.build_decode_program`).
    `on_tokens(seq, token)` is called for each new token as soon as its step is done.
    """
    from mpk.models.fuse import fuse_weights

    if backend not in ("sim", "cuda"):
        raise MpkError(f"unknown backend {backend!r}; choose sim or cuda")
    if dtype not in DTYPES:
        raise MpkError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
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
                       num_sms=SIM_NUM_SMS if num_sms is None else num_sms, activations=activations)
    fused = fuse_weights(cfg, hf_weights, tp_size, DTYPES[dtype])
    weights, meta = program_inputs(cfg, tg, fused, prompts)
    eos = set(cfg.eos_token_ids) if stop_at_eos else set()
    collector = _Collector(prompts, max_new_tokens, eos, on_tokens)

    t0 = time.perf_counter()
    if backend == "sim":
        steps, logits = _run_sim(tg, weights, meta, DTYPES[dtype], seq_len, collector, collect_logits, seed)
    else:
        from mpk.runtime import Megakernel

        kernel = Megakernel(tg, device=device, weights=weights, meta=meta)
        result = kernel.run(seq_len, max_new_tokens=max_new_tokens,
                            on_step=collector.step, eos_token_ids=sorted(eos), collect_logits=collect_logits)
        kernel.close()
        steps, logits = result.steps, result.logits
    return Generation(collector.new_tokens, steps, time.perf_counter() - t0, logits, tg)


def _run_sim(tg, weights, meta, dtype, seq_len, collector: _Collector, collect_logits: bool, seed: int):
    from mpk import sim

    bufs = sim.allocate(tg, weights, meta, dtype)
    token_buf = tensor_name(0, tg.tp_size, "tokens")
    logit_bufs = [tensor_name(r, tg.tp_size, "logits") for r in range(tg.tp_size)]
    logits: list[torch.Tensor] = []

    def on_step(step: int, b: dict[str, torch.Tensor]) -> bool:
        if collect_logits:
            logits.append(torch.cat([b[n] for n in logit_bufs], dim=1).clone())
        return collector.step(step, b[token_buf].tolist())

    steps = sim.run(tg, bufs, num_steps=seq_len, on_step=on_step, seed=seed)
    return steps, logits
