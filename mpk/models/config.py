"""ModelConfig: the shape of one decoder-only transformer, read from a Hugging Face config.json.

One dataclass covers the Llama, Qwen2, Qwen3 and Mistral families; they differ only in flags
(QKV bias, q/k-norm, tied embeddings, rope scaling, sliding window).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mpk.errors import MpkError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = ""

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_rows_per_group(self) -> int:
        """Rows of the fused QKV weight per KV group: its query heads, then its K head, then its V head."""
        return (self.q_per_kv + 2) * self.head_dim

    def num_params(self) -> int:
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + self.vocab_size * h + head + h

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "") -> "ModelConfig":
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x layout)."""
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            shown = ", ".join(archs) if archs else f"model_type={d.get('model_type')!r}"
            raise MpkError(
                f"unsupported architecture {shown}; mpk supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            cfg = cls(
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_params(d).get("rope_theta", 10000.0)),
                rope_scaling=_rope_scaling(d),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=_qkv_bias(arch, d),
                qk_norm=arch == "Qwen3ForCausalLM",
                sliding_window=_sliding_window(arch, d),
                eos_token_ids=_eos_ids(d.get("eos_token_id")),
                name=name,
            )
        except KeyError as e:
            raise MpkError(f"config.json lacks the field {e.args[0]!r}; is it a complete {arch} config?") from None
        except (TypeError, ValueError) as e:
            raise MpkError(f"config.json has a malformed value: {e}") from None
        _check_supported(cfg, d)
        return cfg

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not path.is_dir():
            raise MpkError(f"no such checkpoint directory: {path} (give a directory with config.json, or a preset name)")
        if not cfg_file.is_file():
            raise MpkError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
        try:
            d = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MpkError(f"{cfg_file} is not valid JSON ({e}); the checkpoint is corrupt") from None
        if not isinstance(d, dict):
            raise MpkError(f"{cfg_file} does not hold a JSON object; the checkpoint is corrupt")
        cfg = cls.from_hf_dict(d, name=path.name)
        return replace(cfg, eos_token_ids=_generation_eos(path, cfg.eos_token_ids))


def _rope_params(d: dict) -> dict:
    """transformers 5 nests theta and scaling under rope_parameters; 4.x has rope_theta + rope_scaling."""
    params = dict(d.get("rope_parameters") or {})
    if "rope_theta" in d:
        params.setdefault("rope_theta", d["rope_theta"])
    for k, v in (d.get("rope_scaling") or {}).items():
        params.setdefault(k, v)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    return params


def _rope_scaling(d: dict) -> dict | None:
    params = _rope_params(d)
    kind = params.get("rope_type", "default")
    if kind == "default":
        return None
    if kind != "llama3":
        raise MpkError(f"unsupported rope scaling {kind!r}; mpk supports default and llama3 rope")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
        raise MpkError(f"llama3 rope scaling in config.json lacks {', '.join(missing)}")
    return {"rope_type": "llama3", **{k: float(params[k]) for k in keys}}


def _qkv_bias(arch: str, d: dict) -> bool:
    if arch == "Qwen2ForCausalLM":
        return True
    return bool(d.get("attention_bias", False))


def _sliding_window(arch: str, d: dict) -> int | None:
    window = d.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if d.get("use_sliding_window", False):
            # Qwen windows only some layers (max_window_layers / layer_types); one window for all would be wrong.
            raise MpkError("unsupported config: use_sliding_window=true (per-layer sliding windows) for Qwen models")
        return None
    return int(window) if window else None


def read_json_object(file: Path, remedy: str = "re-download it") -> dict | None:
    """The JSON object in `file`, None when there is no such file; one clear error when it is broken."""
    if not file.is_file():
        return None
    try:
        d = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        text = str(e).strip()
        raise MpkError(f"{file} is not readable JSON ({text.splitlines()[0] if text else type(e).__name__}); "
                       f"{remedy}") from None
    if not isinstance(d, dict):
        raise MpkError(f"{file} does not hold a JSON object; {remedy}")
    return d


def _generation_eos(path: Path, eos: tuple[int, ...]) -> tuple[int, ...]:
    """generation_config.json often lists more end-of-sequence ids than config.json (Qwen3, Llama 3)."""
    d = read_json_object(path / "generation_config.json", "re-download it, or delete it to use config.json alone")
    if d is None:
        return eos
    extra = _eos_ids(d.get("eos_token_id"), "generation_config.json")
    return eos + tuple(e for e in extra if e not in eos)


def _eos_ids(eos, where: str = "config.json") -> tuple[int, ...]:
    """eos_token_id as Hugging Face writes it: absent, one id, or a list of ids."""
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
        raise MpkError(f"{where} has eos_token_id {eos!r}; expected a token id or a list of token ids")
    return tuple(dict.fromkeys(ids))


def _check_supported(cfg: ModelConfig, d: dict) -> None:
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise MpkError(f"unsupported activation {act!r}; mpk supports silu MLPs")
    if d.get("mlp_bias"):
        raise MpkError("unsupported config: mlp_bias=true (biases in the MLP projections)")
    if cfg.architecture == "LlamaForCausalLM" and cfg.qkv_bias:
        raise MpkError("unsupported config: attention_bias=true for Llama (bias on o_proj)")
    if cfg.num_heads % cfg.num_kv_heads:
        raise MpkError(
            f"num_attention_heads={cfg.num_heads} is not a multiple of num_key_value_heads={cfg.num_kv_heads}"
        )
    if cfg.head_dim % 2:
        raise MpkError(f"head_dim={cfg.head_dim} is odd; rotary embeddings need an even head_dim")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
        if getattr(cfg, k) <= 0:
            raise MpkError(f"config.json has {k}={getattr(cfg, k)}; it must be positive")


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies of the rotary embedding, [head_dim // 2] float32, as transformers computes them."""
    import torch

    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, low, high, old_ctx = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_tables(cfg: ModelConfig, max_seq_len: int):
    """cos and sin of position * inv_freq, each [max_seq_len, head_dim // 2] float32."""
    import torch

    pos = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(pos, rope_inv_freq(cfg))
    return freqs.cos(), freqs.sin()
