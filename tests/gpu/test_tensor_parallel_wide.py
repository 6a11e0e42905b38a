"""Tensor parallelism on 4 and 8 GPUs: the same checks as on two (test_tensor_parallel), at the rank
counts a 4- or 8-GPU machine allows.

- Greedy tokens at TP=4 and TP=8 equal TP=1's bar near-ties of the float32 reference, on tiny
  checkpoints whose 8 KV heads split over every rank (with and without q/k-norm), at batch 1 and 4.
- The qwen3-8b preset: TP=N's greedy tokens are TP=1's bar near-ties, its logits in the bound.
- A hang on the last rank is named by rank and stops every rank; every GPU runs again.
Skipped without four CUDA GPUs; the TP=8 cases need eight.
"""

from __future__ import annotations

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
if GPUS < 4:
    pytest.skip("needs four CUDA GPUs", allow_module_level=True)

from test_megakernel import checkpoint, report  # noqa: E402,F401
from test_presets import weights  # noqa: E402,F401
from test_tensor_parallel import greedy_against_tp1, hang_on_the_last_rank, preset_against_tp1  # noqa: E402

SIZES = [tp for tp in (4, 8) if tp <= GPUS]
WIDE = {"num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 512, "intermediate_size": 1024,
        "head_dim": 32}
CASES = {"llama-kv8": ("llama", WIDE), "qwen3-kv8": ("qwen3", WIDE)}  # q/k-norm in the second


def sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.parametrize("tp", SIZES)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_at_tp4_and_tp8_equal_tp1(checkpoint, case, batch, tp):
    cfg, hf = checkpoint(case, *CASES[case])
    g = torch.Generator().manual_seed(200 + batch)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 3, 9, 1)[:batch]]
    res, seq_len, bad, ties, off32, split, differ = greedy_against_tp1(cfg, hf, prompts, sms(), tp)
    assert res.steps == seq_len and res.stopped  # every rank stopped by itself at the token limit
    report(check=f"tp{tp}-greedy", case=case, batch=batch, tokens=batch * 12, mismatches=len(bad),
           near_ties=ties, differs_from_tp1=differ)
    assert not bad, f"tokens differ from the reference (seq, index, got, want, gap): {bad[:5]}"
    assert not off32, f"tokens are not the float32 reference's argmax: {off32[:5]}"
    assert not split, f"TP={tp} tokens leave TP=1's away from a near-tie (seq, index, tp1, tp{tp}): {split}"


@pytest.mark.parametrize("tp", SIZES)
def test_qwen3_8b_at_tp4_and_tp8(weights, tp):
    cfg, hf = weights("qwen3-8b")
    err, split, differ = preset_against_tp1(cfg, hf, tp)
    report(check=f"tp{tp}-preset", case="qwen3-8b", batch=1, vs_fp32=err, tokens=16, differs_from_tp1=differ)
    assert err < 2e-2, f"{err:.3g} from float32"
    assert not split, f"TP={tp} tokens leave TP=1's away from a near-tie (seq, index, tp1, tp{tp}): {split}"


def test_a_hang_on_the_last_rank_stops_every_rank(checkpoint, monkeypatch):
    tp = SIZES[-1]
    cfg, hf = checkpoint("llama-kv8", *CASES["llama-kv8"])
    report(check=f"tp{tp}-hang", case="llama-kv8", batch=1, task=hang_on_the_last_rank(cfg, hf, tp, monkeypatch))
