"""Read a Hugging Face checkpoint directory: config.json plus safetensors weights (single or sharded).

Validation reads only the safetensors headers, so a 16 GB checkpoint is checked in milliseconds
before any weight is loaded; every problem becomes a one-line MpkError.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from mpk.errors import MpkError
from mpk.models.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32", "F16", "BF16"}
LM_HEAD = "lm_head.weight"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `cfg` must hold, by Hugging Face name (lm_head only when untied)."""
    H, I, hd, V = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size
    q_dim, kv_dim = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, H)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, H)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, H)
        if cfg.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_dim,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "self_attn.o_proj.weight"] = (H, q_dim)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        shapes[p + "mlp.gate_proj.weight"] = (I, H)
        shapes[p + "mlp.up_proj.weight"] = (I, H)
        shapes[p + "mlp.down_proj.weight"] = (H, I)
    shapes["model.norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (V, H)
    return shapes


def validate_shapes(cfg: ModelConfig, found: dict[str, tuple[int, ...]], where: str) -> list[str]:
    """Check `found` (name -> shape) against config.json; return the names mpk uses, in order.

    Extra tensors (e.g. old rotary inv_freq buffers) are ignored; a tied checkpoint that still
    stores lm_head.weight keeps it, as long as its shape is right.
    """
    want = expected_shapes(cfg)
    if cfg.tie_word_embeddings and LM_HEAD in found:
        want[LM_HEAD] = (cfg.vocab_size, cfg.hidden_size)
    missing = [n for n in want if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MpkError(
            f"{where} lacks the tensor {missing[0]}{more} that config.json ({cfg.architecture}, "
            f"{cfg.num_layers} layers) requires; the checkpoint is incomplete or does not match its config.json"
        )
    for name, shape in want.items():
        if tuple(found[name]) != shape:
            raise MpkError(
                f"{where}: tensor {name} has shape {list(found[name])} but config.json implies {list(shape)}; "
                "the weights and config.json disagree"
            )
    return list(want)


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index names."""
    return _layout(Path(path))[0]


def _layout(path: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """(files, tensor name -> shard file from the index, or None for a single file)."""
    if not path.is_dir():
        raise MpkError(f"no such checkpoint directory: {path}")
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.is_file():
        return [single], None
    if index.is_file():
        index_map = _index_map(index)
        return sorted(set(index_map.values())), index_map
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise MpkError(
            f"{path} holds PyTorch .bin weights only; mpk reads safetensors "
            "(re-save with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise MpkError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}; is the download complete?")


def _index_map(index: Path) -> dict[str, Path]:
    """tensor name -> shard file, from a sharded checkpoint's index; every shard must exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise MpkError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}); re-download it") from None
    if not isinstance(weight_map, dict):
        raise MpkError(f"{index}: weight_map is not a JSON object; re-download the index")
    files = {name: index.parent / str(f) for name, f in weight_map.items()}
    for f in sorted(set(files.values())):
        if not f.is_file():
            raise MpkError(f"{index} names the shard {f.name}, which is missing; is the download complete?")
    return files


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of one file, from its header alone."""
    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except OSError as e:
        raise MpkError(f"cannot read {file} ({_first_line(e)}); check that it exists and is readable") from None
    except Exception as e:  # safetensors raises its own SafetensorError on bad headers and short files
        raise MpkError(
            f"{file} is not a readable safetensors file ({_first_line(e)}); it is truncated or corrupt: re-download it"
        ) from None


def _scan(path: str | Path, cfg: ModelConfig) -> dict[str, tuple[Path, str]]:
    """Validate every header against cfg; return tensor name -> (file, safetensors dtype) for the tensors mpk uses.

    Every shard the index names is read, so a tensor the index forgot to list is still found.
    """
    files, index_map = _layout(Path(path))
    located: dict[str, Path] = {}
    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        for name, info in _read_header(file).items():
            located[name] = file
            headers[name] = info
    for name, file in (index_map or {}).items():
        if located.get(name) != file:
            raise MpkError(f"{Path(path) / INDEX_FILE} places {name} in {file.name}, but that shard does not hold it; "
                           "the index and shards are from different downloads")
    used = validate_shapes(cfg, {n: shape for n, (shape, _) in headers.items()}, str(path))
    for name in used:
        dtype = headers[name][1]
        if dtype not in FLOAT_DTYPES:
            raise MpkError(f"{located[name].name}: tensor {name} has dtype {dtype}; mpk reads F32, F16 or BF16 "
                           "weights (quantized checkpoints are not supported)")
    return {name: (located[name], headers[name][1]) for name in used}


def check_checkpoint_header(path: str | Path, cfg: ModelConfig) -> None:
    """Check presence and shape of every weight from the safetensors headers only (reads no tensor data)."""
    _scan(path, cfg)


def stored_dtypes(path: str | Path, cfg: ModelConfig) -> set[str]:
    """The safetensors dtypes (F32, F16, BF16) of the weights mpk uses, from the headers."""
    return {dtype for _, dtype in _scan(path, cfg).values()}


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, device="cpu",
                    progress=None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """config.json and the weights mpk uses, by Hugging Face name, each cast to `dtype` if given.

    Tensors move to `device` one by one, so the host never holds the whole model for a GPU run.
    `progress(nbytes)` is called after each tensor with its size as loaded.
    Weights that hold NaN or infinity are an MpkError: they would only fail later, inside sampling.
    """
    cfg = ModelConfig.from_dir(path)
    located = _scan(path, cfg)
    by_file: dict[Path, list[str]] = {}
    for name, (file, _) in located.items():
        by_file.setdefault(file, []).append(name)
    weights: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        for name, t in _read_tensors(file, names):
            weights[name] = t = t.to(device=device, dtype=dtype or t.dtype)
            _check_finite(t, name, file)
            if progress is not None:
                progress(t.nbytes)
    return cfg, {name: weights[name] for name in located}


def _read_tensors(file: Path, names: list[str]):
    """(name, tensor as stored) for `names` in `file`; a failed read is an MpkError."""
    try:
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                yield name, f.get_tensor(name)
    except Exception as e:  # safetensors raises its own SafetensorError, and OSError for I/O
        raise MpkError(
            f"reading {file} failed ({_first_line(e)}); the file is corrupt or changed while loading"
        ) from None


def _check_finite(t: torch.Tensor, name: str, file: Path) -> None:
    # A float32 sum is finite when every element is (a sum of finite bf16 values overflowing is all
    # but impossible), and it is twice as fast as isfinite().all(); confirm before blaming the file.
    if torch.isfinite(t.sum(dtype=torch.float32)) or torch.isfinite(t).all():
        return
    bad = "NaN" if torch.isnan(t).any() else "infinite"
    raise MpkError(f"{file.name}: tensor {name} holds {bad} values; the checkpoint is corrupt or was saved "
                   "after training diverged: re-download or re-export it")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
