"""A plain PyTorch decoder: the correctness reference on GPU and the `torch` baseline in benchmarks.

One class covers every ModelConfig flag (GQA, QKV bias, q/k-norm, llama3 rope, sliding window,
tied embeddings). The KV cache has a fixed length and attention reads all of it under a mask, so
`decode_step` has static shapes and works under torch.compile and CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpk.errors import MpkError
from mpk.models.checkpoint import validate_shapes
from mpk.models.config import ModelConfig, rope_tables
from mpk.models.functional import rms_norm


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (transformers' layout): x [B, T, heads, hd]; cos, sin [B, T, hd/2] float32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Layer(nn.Module):
    """One decoder layer: attention (with its KV cache) and the SiLU MLP, each with a pre-norm residual."""

    def __init__(self, cfg: ModelConfig, hf: dict[str, torch.Tensor], layer: int, dtype, device):
        super().__init__()
        p = f"model.layers.{layer}."
        a = p + "self_attn."

        def w(name: str) -> torch.Tensor:
            return hf[name].to(device=device, dtype=dtype)

        self.cfg = cfg
        # Buffers, so .to() moves them and torch.compile sees them as module state.
        buf = self.register_buffer
        buf("attn_norm", w(p + "input_layernorm.weight"))
        buf("mlp_norm", w(p + "post_attention_layernorm.weight"))
        # One matmul for q, k and v (and one for gate and up): fewer, larger reads, as gpt-fast does.
        buf("wqkv", torch.cat([w(a + f"{x}_proj.weight") for x in "qkv"]))
        buf("bqkv", torch.cat([w(a + f"{x}_proj.bias") for x in "qkv"]) if cfg.qkv_bias else None)
        buf("q_norm", w(a + "q_norm.weight") if cfg.qk_norm else None)
        buf("k_norm", w(a + "k_norm.weight") if cfg.qk_norm else None)
        buf("wo", w(a + "o_proj.weight"))
        buf("w_gate_up", torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]))
        buf("w_down", w(p + "mlp.down_proj.weight"))
        buf("k_cache", None, persistent=False)
        buf("v_cache", None, persistent=False)

    def forward(self, x, cos, sin, batch_idx, positions, mask):
        cfg = self.cfg
        B, T, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        qkv = F.linear(rms_norm(x, self.attn_norm, cfg.rms_norm_eps), self.wqkv, self.bqkv)
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if cfg.qk_norm:
            q, k = rms_norm(q, self.q_norm, cfg.rms_norm_eps), rms_norm(k, self.k_norm, cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Cache layout [B, S, kv_heads, hd], the same as the megakernel's; its dtype may differ from the model's.
        self.k_cache.index_put_((batch_idx, positions), k.to(self.k_cache.dtype))
        self.v_cache.index_put_((batch_idx, positions), v.to(self.v_cache.dtype))
        attn = self._attend(q, mask) if mask is not None else self._attend_causal(q, k, v)
        x = x + F.linear(attn, self.wo)
        gate, up = F.linear(rms_norm(x, self.mlp_norm, cfg.rms_norm_eps), self.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.w_down)

    def _attend_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A prompt from position 0 attending to itself: PyTorch's fused causal attention (flash
        where the GPU has it), as an inference engine's prefill computes it."""
        B, T, nh, hd = q.shape
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             enable_gqa=True)
        return out.transpose(1, 2).reshape(B, T, nh * hd)

    def _attend(self, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, T, nh, hd] over the whole cache; mask [B, T, S] (True = may attend)."""
        cfg = self.cfg
        B, T, nh, hd = q.shape
        g, nkv = cfg.q_per_kv, cfg.num_kv_heads
        # Each KV head serves its g query heads at once: [B, kv, g*T, hd] against [B, kv, S, hd].
        qg = q.view(B, T, nkv, g, hd).permute(0, 2, 3, 1, 4).reshape(B, nkv, g * T, hd)
        k, v = self.k_cache.to(q.dtype).transpose(1, 2), self.v_cache.to(q.dtype).transpose(1, 2)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * hd ** -0.5
        scores = scores.view(B, nkv, g, T, -1).masked_fill(~mask[:, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(B, nkv, g * T, -1)
        out = torch.matmul(probs, v).view(B, nkv, g, T, hd)
        return out.permute(0, 3, 1, 2, 4).reshape(B, T, nh * hd)


class ReferenceModel(nn.Module):
    """Decoder with its own KV cache. Call `reset(batch, max_seq_len)` before a new sequence."""

    def __init__(self, cfg: ModelConfig, hf_state_dict: dict[str, torch.Tensor], dtype=torch.float32, device="cpu"):
        super().__init__()
        validate_shapes(cfg, {n: tuple(t.shape) for n, t in hf_state_dict.items()}, "the weights")
        self.cfg = cfg
        hf = hf_state_dict
        self.register_buffer("embed", hf["model.embed_tokens.weight"].to(device=device, dtype=dtype))
        self.layers = nn.ModuleList(Layer(cfg, hf, i, dtype, device) for i in range(cfg.num_layers))
        self.register_buffer("final_norm", hf["model.norm.weight"].to(device=device, dtype=dtype))
        head = self.embed if cfg.tie_word_embeddings else hf["lm_head.weight"].to(device=device, dtype=dtype)
        self.register_buffer("lm_head", head)
        for name in ("rope_cos", "rope_sin", "key_pos"):
            self.register_buffer(name, None, persistent=False)
        self.batch, self.max_seq_len = 0, 0

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def reset(self, batch: int, max_seq_len: int, kv_dtype: torch.dtype | None = None) -> None:
        """Allocate a zeroed KV cache for `batch` sequences of up to `max_seq_len` tokens, in `kv_dtype`
        (default: the model's dtype; a float32 model with a bf16 cache computes what mpk's default does)."""
        cfg = self.cfg
        shape = (batch, max_seq_len, cfg.num_kv_heads, cfg.head_dim)
        for layer in self.layers:
            layer.k_cache = torch.zeros(shape, dtype=kv_dtype or self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=kv_dtype or self.dtype, device=self.device)
        cos, sin = rope_tables(cfg, max_seq_len)
        self.rope_cos, self.rope_sin = cos.to(self.device), sin.to(self.device)
        self.key_pos = torch.arange(max_seq_len, device=self.device)
        self.batch, self.max_seq_len = batch, max_seq_len

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """tokens [B, T] at positions start_pos.. -> logits [B, T, V] float32 (prefill or teacher forcing)."""
        B, T = tokens.shape
        self._check(B, start_pos + T)
        positions = (start_pos + torch.arange(T, device=self.device)).expand(B, T)
        return self._run(tokens.to(self.device), positions)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] from position 0 in one batched pass with fused causal attention (SDPA), filling
        the cache -> logits [B, V] of the last position. Without a sliding window (the fused kernel
        attends to every earlier position)."""
        B, T = tokens.shape
        if self.cfg.sliding_window and self.cfg.sliding_window < T:
            raise MpkError("the fused-attention prefill has no sliding window; use forward()")
        self._check(B, T)
        positions = torch.arange(T, device=self.device).expand(B, T)
        return self._run(tokens.to(self.device), positions, causal=True)[:, -1]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        """One token per sequence: tokens [B] at pos (an int, or [B] per-sequence positions) -> logits [B, V]."""
        B = tokens.shape[0]
        if not isinstance(pos, torch.Tensor):
            self._check(B, pos + 1)
            pos = torch.full((B,), pos, device=self.device)
        return self._run(tokens.to(self.device)[:, None], pos.to(self.device)[:, None])[:, 0]

    def _check(self, batch: int, end: int) -> None:
        if batch != self.batch or end > self.max_seq_len:
            raise MpkError(
                f"reference model cache holds batch {self.batch} x {self.max_seq_len} tokens; "
                f"call reset() for batch {batch} and at least {end} tokens"
            )

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """tokens, positions [B, T] -> logits [B, T, V] float32. `causal`: positions are 0..T-1 and
        attention is over the new rows only, fused (no mask over the cache)."""
        B, T = tokens.shape
        x = F.embedding(tokens, self.embed)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = None
        if not causal:
            q_pos, k_pos = positions[:, :, None], self.key_pos[None, None, :]
            mask = k_pos <= q_pos  # [B, T, S]; stale cache rows beyond the query are masked too
            if self.cfg.sliding_window:
                mask = mask & (k_pos > q_pos - self.cfg.sliding_window)
        batch_idx = torch.arange(B, device=self.device)[:, None].expand(B, T)
        for layer in self.layers:
            x = layer(x, cos, sin, batch_idx, positions, mask)
        x = rms_norm(x, self.final_norm, self.cfg.rms_norm_eps)
        return F.linear(x, self.lm_head).float()

    @torch.no_grad()
    def greedy_generate(self, prompt_ids, max_new_tokens: int) -> torch.Tensor:
        """Argmax decoding of max_new_tokens tokens (no early stop at EOS).

        prompt_ids: a list of ints or a [T] tensor (returns [N]), or a [B, T] tensor (returns [B, N]).
        """
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        single = ids.dim() == 1
        ids = ids[None] if single else ids
        B, T = ids.shape
        self.reset(B, T + max_new_tokens)
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=self.device)
        if max_new_tokens:
            out[:, 0] = self.forward(ids, 0)[:, -1].argmax(-1)
        for i in range(1, max_new_tokens):
            out[:, i] = self.decode_step(out[:, i - 1], T + i - 1).argmax(-1)
        return out[0] if single else out
