"""Shapes of well-known models, filled with random weights, so performance work needs no download.

The numbers are those of each model's published config.json.
"""

from __future__ import annotations

from mpk.errors import MpkError
from mpk.models.config import ModelConfig


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192.0}


def _llama3(name: str, hidden: int, inter: int, layers: int, heads: int, head_dim: int, factor: float, tied: bool):
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=head_dim, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=_llama3_rope(factor), max_position_embeddings=131072,
        tie_word_embeddings=tied, eos_token_ids=(128001, 128008, 128009), name=name,
    )


def _qwen3(name: str, hidden: int, inter: int, layers: int, heads: int, tied: bool):
    return ModelConfig(
        architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=tied, qk_norm=True,
        eos_token_ids=(151645, 151643), name=name,
    )


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=512, hidden_size=128, intermediate_size=344, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=2048, name="tiny",
    ),
    "llama-3.2-1b": _llama3("llama-3.2-1b", 2048, 8192, 16, 32, 64, 32.0, tied=True),
    "llama-3.2-3b": _llama3("llama-3.2-3b", 3072, 8192, 28, 24, 128, 32.0, tied=True),
    "llama-3.1-8b": _llama3("llama-3.1-8b", 4096, 14336, 32, 32, 128, 8.0, tied=False),
    "qwen3-0.6b": _qwen3("qwen3-0.6b", 1024, 3072, 28, 16, tied=True),
    "qwen3-1.7b": _qwen3("qwen3-1.7b", 2048, 6144, 28, 16, tied=True),
    "qwen3-4b": _qwen3("qwen3-4b", 2560, 9728, 36, 32, tied=True),
    "qwen3-8b": _qwen3("qwen3-8b", 4096, 12288, 36, 32, tied=False),
    # Several GPUs: 65 GB and 141 GB of bf16 weights (llama-3.1-70b fits two 141 GB H200s at TP=2).
    "qwen3-32b": _qwen3("qwen3-32b", 5120, 25600, 64, 64, tied=False),
    "llama-3.1-70b": _llama3("llama-3.1-70b", 8192, 28672, 80, 64, 128, 8.0, tied=False),
    "qwen2.5-7b": ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, qkv_bias=True, eos_token_ids=(151645, 151643), name="qwen2.5-7b",
    ),
    "mistral-7b": ModelConfig(
        architecture="MistralForCausalLM", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0,
        max_position_embeddings=32768, sliding_window=None, eos_token_ids=(2,), name="mistral-7b",
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise MpkError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


def random_weights(cfg: ModelConfig, seed: int = 0, dtype=None, device="cpu", progress=None):
    """Random weights for `cfg` in Hugging Face naming: N(0, 0.02) matrices, unit norms, small biases.

    Each tensor is allocated once in `dtype` and filled in place, so peak memory is the model itself.
    `progress(nbytes)` is called after each tensor.
    """
    import torch

    from mpk.models.checkpoint import expected_shapes

    dtype = dtype or torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if "norm" in name:
            t.fill_(1.0)
        elif name.endswith(".bias"):
            t.normal_(0.0, 0.002, generator=gen)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        out[name] = t
        if progress is not None:
            progress(t.nbytes)
    return out
