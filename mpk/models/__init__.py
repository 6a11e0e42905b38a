"""Models: where a ModelConfig and its weights come from (a checkpoint directory or a preset).

Heavy imports (torch, safetensors, transformers) happen inside the methods, so `import mpk` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpk.errors import MpkError
from mpk.models.config import ModelConfig
from mpk.models.presets import PRESETS


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: its config, and how to get its weights and tokenizer."""

    cfg: ModelConfig
    name: str
    path: Path | None  # None for a preset (random weights)
    seed: int = 0

    def load_weights(self, dtype=None, device="cpu", progress=None) -> dict:
        """Weights by Hugging Face name: read from the checkpoint, or random for a preset.

        Random weights are generated directly on `device` (a GPU makes an 8B preset in a second).
        `progress(nbytes)` is called as each tensor is ready.
        """
        import torch

        dtype = dtype or torch.bfloat16
        if self.path is None:
            from mpk.models.presets import random_weights

            return random_weights(self.cfg, seed=self.seed, dtype=dtype, device=device, progress=progress)
        from mpk.models.checkpoint import load_checkpoint

        return load_checkpoint(self.path, dtype=dtype, device=device, progress=progress)[1]

    def tokenizer(self):
        """The checkpoint's tokenizer, or None (presets have none)."""
        if self.path is None:
            return None
        from mpk.models.tokenizer import load_tokenizer

        return load_tokenizer(self.path)

    def check(self) -> None:
        """Validate weight presence and shapes from the safetensors headers (a no-op for presets)."""
        if self.path is None:
            return
        from mpk.models.checkpoint import check_checkpoint_header

        check_checkpoint_header(self.path, self.cfg)


def resolve_model(spec: str) -> ModelSource:
    """A checkpoint directory (with config.json) or a preset name."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(ModelConfig.from_dir(path), path.name, path)
    if spec in PRESETS:
        return ModelSource(PRESETS[spec], spec, None)
    raise MpkError(f"no such checkpoint directory or preset {spec!r}; presets: {', '.join(PRESETS)}")


__all__ = ["ModelConfig", "ModelSource", "PRESETS", "resolve_model"]
