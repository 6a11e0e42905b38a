"""Shared test helpers: tiny random Hugging Face checkpoints of every supported family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=1024,
    initializer_range=0.1,  # large enough that logits are not a sea of near-ties
)


def pytest_configure(config):
    """Under pytest-xdist, each worker takes its share of the CPU's threads: N workers each running
    torch with a thread per core spin against each other, and small CPU ops slow down many times."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


WORDS = ("the a an of to in and is was it that he she they we you I on for with as at by this be not "
         "cat dog bird fish tree sun moon star sky rain snow wind fire water stone light dark red blue "
         "green one two three four five big small old new good bad hot cold fast slow up down").split()


def family_classes(family: str):
    """(config class, model class) of a family name."""
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(classes)}")
    return classes[family]


def save_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over a small English vocabulary that fits in vocab_size ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = [w for w in WORDS if w not in specials][: vocab_size - len(specials)]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))


def write_checkpoint(path: Path, family: str = "llama", *, tokenizer: bool = False, max_shard_size=None,
                     seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a tiny random model of `family` (config overrides as keyword arguments) into `path`.

    Norm weights and biases are randomized too, so tests notice a norm or bias that is misplaced.
    """
    config_cls, model_cls = family_classes(family)
    cfg = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    if tokenizer:
        save_tiny_tokenizer(path, cfg.vocab_size)
    return path


def hf_model_from(path: Path):
    """The transformers model of a checkpoint, float32, eager attention (the exact reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """Factory: make_checkpoint(family="llama", path=None, tokenizer=False, max_shard_size=None, **overrides) -> Path.

    Without `path`, each call writes into a fresh temporary directory.
    """

    def make(family: str = "llama", path=None, **kwargs) -> Path:
        path = Path(path) if path is not None else tmp_path_factory.mktemp(f"ckpt-{family}")
        return write_checkpoint(path, family, **kwargs)

    return make


@pytest.fixture(scope="session")
def load_hf_model():
    """Function fixture: load_hf_model(path) -> the transformers model (float32, eager attention)."""
    return hf_model_from


def have_nvcc() -> bool:
    from mpk.errors import MpkError
    from mpk.runtime.build import find_nvcc

    try:
        find_nvcc()
        return True
    except MpkError:
        return False


needs_nvcc = pytest.mark.skipif(not have_nvcc(), reason="nvcc not installed")
