"""What a decode program reads besides its activations: fused, TP-sharded weights and meta tensors.

`fuse_weights` turns Hugging Face weights into the weight tensors the program declares;
`program_inputs` adds the RoPE tables and the prompts' meta tensors for every rank (`program_meta`
makes the meta tensors alone, for new prompts on an open executor).

Layout contract (the ops depend on it), for rank r, q = query heads per KV head, hd = head_dim:
- qkv: per local KV group, its q query heads, then its K head, then its V head (a group's rows
  are contiguous, so one tile's rows feed one attention group); qkv_bias likewise.
- o / down: the rank's column slice (row-parallel linears, summed by an allreduce).
- gate_up: gate and up rows interleaved (row 2i gate, 2i+1 up), so any even tile holds
  matching pairs and SiLU(gate) * up is computed inside one task.
- lm_head: the rank's vocabulary slice (embed_tokens when tied).
"""

from __future__ import annotations

from functools import partial

import torch

from mpk.dtypes import torch_dtype
from mpk.graph import EMBED, PROMPT, PROMPT_LEN, ROPE, SAMPLE_FLOATS, SAMPLE_INTS, TOKENS, shard_of, tensor_name
from mpk.models.checkpoint import validate_shapes
from mpk.models.config import ModelConfig, rope_tables
from mpk.taskgraph import TaskGraph


def fuse_weights(
    cfg: ModelConfig, hf: dict[str, torch.Tensor], tp_size: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every checkpoint weight of the decode program for `tp_size` ranks (not the RoPE tables)."""
    validate_shapes(cfg, {n: tuple(t.shape) for n, t in hf.items()}, "the weights")
    out: dict[str, torch.Tensor] = {}
    for r in range(tp_size):
        for name, t in _rank_weights(cfg, hf, r, tp_size):
            out[tensor_name(r, tp_size, name)] = t.to(dtype).contiguous()
    return out


def _rank_weights(cfg: ModelConfig, hf: dict[str, torch.Tensor], r: int, tp_size: int):
    sh = shard_of(cfg, r, tp_size)
    hd, q = cfg.head_dim, cfg.q_per_kv
    embed = hf["model.embed_tokens.weight"]
    yield EMBED, embed
    for layer in range(cfg.num_layers):
        p, a = f"layers.{layer}.", f"model.layers.{layer}."
        attn = a + "self_attn."
        yield p + "attn_norm", hf[a + "input_layernorm.weight"]
        groups = range(r * sh.kv_groups, (r + 1) * sh.kv_groups)
        yield p + "qkv", _group_rows(hf, attn, "weight", groups, q, hd)
        if cfg.qkv_bias:
            yield p + "qkv_bias", _group_rows(hf, attn, "bias", groups, q, hd)
        if cfg.qk_norm:
            yield p + "q_norm", hf[attn + "q_norm.weight"]
            yield p + "k_norm", hf[attn + "k_norm.weight"]
        cols = sh.q_heads * hd
        yield p + "o", hf[attn + "o_proj.weight"][:, r * cols:(r + 1) * cols]
        yield p + "mlp_norm", hf[a + "post_attention_layernorm.weight"]
        i0, i1 = r * sh.intermediate, (r + 1) * sh.intermediate
        gate, up = hf[a + "mlp.gate_proj.weight"][i0:i1], hf[a + "mlp.up_proj.weight"][i0:i1]
        yield p + "gate_up", torch.stack([gate, up], dim=1).reshape(2 * sh.intermediate, -1)
        yield p + "down", hf[a + "mlp.down_proj.weight"][:, i0:i1]
    yield "final_norm", hf["model.norm.weight"]
    head = embed if cfg.tie_word_embeddings else hf["lm_head.weight"]
    yield "lm_head", head[sh.vocab_start:sh.vocab_stop]


def _group_rows(hf: dict[str, torch.Tensor], attn: str, kind: str, groups: range, q: int, hd: int) -> torch.Tensor:
    """Rows (or bias entries) of q/k/v for the KV groups `groups`, group by group."""
    wq, wk, wv = (hf[f"{attn}{x}_proj.{kind}"] for x in "qkv")
    parts = []
    for g in groups:
        parts += [wq[g * q * hd:(g + 1) * q * hd], wk[g * hd:(g + 1) * hd], wv[g * hd:(g + 1) * hd]]
    return torch.cat(parts)


def random_fused_weights(tg: TaskGraph, devices, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights made directly in the graph's fused, sharded layout, each on its rank's device
    (`devices[rank]`): what a preset's random checkpoint would fuse to in distribution (N(0, 0.02)
    matrices, unit norms, small biases), without ever holding the whole model on one device. For
    timing models larger than one GPU; the values are not those of `random_weights`."""
    out = {}
    for r in range(tg.tp_size):
        gen = torch.Generator(device=devices[r]).manual_seed(seed + r)
        for name, spec in tg.tensors.items():
            base = name.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
            if spec.kind != "weight" or spec.rank != r or base == ROPE:
                continue
            t = torch.empty(spec.shape, dtype=torch_dtype(spec.dtype), device=devices[r])
            if base.endswith("norm"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.002 if base.endswith("bias") else 0.02, generator=gen)
            out[name] = t
    return out


def program_inputs(cfg: ModelConfig, tg: TaskGraph, fused: dict[str, torch.Tensor], prompts: list[list[int]],
                   sampling: list[tuple[float, int, float, int]] | None = None):
    """Weights (fused, plus RoPE tables) and meta tensors for every rank of the graph.

    `sampling` holds each sequence's (temperature, top_k, top_p, seed); None is greedy for all."""
    rope = torch.cat(rope_tables(cfg, tg.max_seq_len), dim=-1)  # [S, head_dim]: cos, then sin
    weights = dict(fused)
    for r in range(tg.tp_size):
        weights[tensor_name(r, tg.tp_size, ROPE)] = rope
    return weights, program_meta(tg, prompts, sampling)


def program_meta(tg: TaskGraph, prompts: list[list[int]], sampling: list[tuple[float, int, float, int]] | None = None):
    """The meta tensors alone (prompts, tokens, sampling parameters) for every rank of the graph."""
    prompt = torch.zeros(len(prompts), tg.max_seq_len, dtype=torch.int64)
    for b, p in enumerate(prompts):
        prompt[b, : len(p)] = torch.tensor(p)
    meta = {}
    params = sampling_meta(sampling or [(0.0, 0, 1.0, 0)] * len(prompts))
    for r in range(tg.tp_size):
        n = partial(tensor_name, r, tg.tp_size)
        meta[n(TOKENS)] = prompt[:, 0].clone()
        meta[n(PROMPT)] = prompt
        meta[n(PROMPT_LEN)] = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        meta.update({n(name): value for name, value in params.items()})
    return meta


def sampling_meta(sampling: list[tuple[float, int, float, int]]) -> dict[str, torch.Tensor]:
    """The sample op's per-sequence meta tensors from (temperature, top_k, top_p, seed) per sequence."""
    temperature, top_k, top_p, seed = zip(*sampling)
    # The seed tensor is int64: a 64-bit seed is stored as its two's-complement bits.
    seeds = [s - (1 << 64) if s >= 1 << 63 else s for s in (int(x) % (1 << 64) for x in seed)]
    return {SAMPLE_FLOATS: torch.tensor(list(zip(temperature, top_p)), dtype=torch.float32),
            SAMPLE_INTS: torch.tensor(list(zip(top_k, seeds)), dtype=torch.int64)}
