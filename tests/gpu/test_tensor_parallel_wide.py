"""Tensor parallelism on 4 and 8 GPUs: the same checks as on two (test_tensor_parallel), at the rank
counts a 4- or 8-GPU machine allows.

- Greedy tokens at TP=4 and TP=8 equal TP=1's bar near-ties of the float32 reference, on tiny
  checkpoints whose 8 KV heads split over every rank (with and without q/k-norm), at batch 1 and 4.
- The qwen3-8b preset: TP=N's greedy tokens are TP=1's bar near-ties, its logits in the bound.
- A hang on the last rank is named by rank and stops every rank; every GPU runs again.
Skipped without four CUDA GPUs; the TP=8 cases need eight.
"""

from __future__ import annotations

import gc

import pytest
import torch

from mpk.errors import MpkError

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
if GPUS < 4:
    pytest.skip("needs four CUDA GPUs", allow_module_level=True)

from test_megakernel import checkpoint, f32_tie_of, greedy_mismatches, kv_dtype, l2_rel_err, report  # noqa: E402,F401
from test_presets import weights  # noqa: E402,F401
from test_tensor_parallel import diverging_at_ties, kernel, new_tokens  # noqa: E402

from mpk.compiler import compile_model  # noqa: E402
from mpk.engine import check_prompts  # noqa: E402
from mpk.inputs import fuse_weights, program_inputs  # noqa: E402
from mpk.models.reference import ReferenceModel  # noqa: E402
from mpk.runtime import Megakernel  # noqa: E402

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
    family, overrides = CASES[case]
    cfg, hf = checkpoint(case, family, overrides)
    g = torch.Generator().manual_seed(200 + batch)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 3, 9, 1)[:batch]]
    max_new = 12
    seq_len = check_prompts(cfg, prompts, max_new)
    wide = kernel(cfg, hf, prompts, seq_len + 6, sms(), tp)
    res_n = wide.run(seq_len + 6, max_new_tokens=max_new, eos_token_ids=[])
    res_1 = kernel(cfg, hf, prompts, seq_len + 6, sms(), 1).run(seq_len + 6, max_new_tokens=max_new, eos_token_ids=[])
    assert res_n.steps == seq_len and res_n.stopped  # every rank stopped by itself at the token limit
    new_n, new_1 = new_tokens(res_n, prompts, max_new), new_tokens(res_1, prompts, max_new)
    bad, ties, off32 = greedy_mismatches(cfg, hf, prompts, new_n, kv=kv_dtype(wide.tg), f32_tie=f32_tie_of(wide.tg))
    split = diverging_at_ties(cfg, hf, prompts, new_1, new_n, kv_dtype(wide.tg), f32_tie_of(wide.tg))
    report(check=f"tp{tp}-greedy", case=case, batch=batch, tokens=batch * max_new, mismatches=len(bad),
           near_ties=ties, differs_from_tp1=sum(a != b for a, b in zip(new_1, new_n)))
    assert not bad, f"tokens differ from the reference (seq, index, got, want, gap): {bad[:5]}"
    assert not off32, f"tokens are not the float32 reference's argmax: {off32[:5]}"
    assert not split, f"TP={tp} tokens leave TP=1's away from a near-tie (seq, index, tp1, tp{tp}): {split}"


@pytest.mark.parametrize("tp", SIZES)
def test_qwen3_8b_at_tp4_and_tp8(weights, tp):
    cfg, hf = weights("qwen3-8b")
    seqs = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    forced = kernel(cfg, hf, seqs.tolist(), 8, sms(), tp).run(8, collect_logits=True, eos_token_ids=[])
    ours = torch.stack(forced.logits, 1)
    prompts, max_new = [seqs[0, :3].tolist()], 16
    res_n = kernel(cfg, hf, prompts, 3 + max_new, sms(), tp).run(3 + max_new, max_new_tokens=max_new, eos_token_ids=[])
    gc.collect()
    torch.cuda.empty_cache()
    res_1 = kernel(cfg, hf, prompts, 3 + max_new, sms(), 1).run(3 + max_new, max_new_tokens=max_new, eos_token_ids=[])
    gc.collect()
    torch.cuda.empty_cache()
    new_n, new_1 = new_tokens(res_n, prompts, max_new), new_tokens(res_1, prompts, max_new)
    ref = ReferenceModel(cfg, hf, torch.float32, "cuda")
    ref.reset(1, 8)
    want = ref.forward(seqs.cuda(), 0).cpu()
    del ref
    gc.collect()
    torch.cuda.empty_cache()
    errs = [l2_rel_err(ours[:, s], want[:, s]) for s in range(8)]
    split = diverging_at_ties(cfg, hf, prompts, new_1, new_n, torch.bfloat16)
    report(check=f"tp{tp}-preset", case="qwen3-8b", batch=1, vs_fp32=max(errs), tokens=max_new,
           differs_from_tp1=int(new_1 != new_n))
    assert max(errs) < 2e-2, f"{max(errs):.3g} from float32"
    assert not split, f"TP={tp} tokens leave TP=1's away from a near-tie (seq, index, tp1, tp{tp}): {split}"


def test_a_hang_on_the_last_rank_stops_every_rank(checkpoint, monkeypatch):
    tp = SIZES[-1]
    cfg, hf = checkpoint("llama-kv8", *CASES["llama-kv8"])
    tg = compile_model(cfg, batch=1, max_seq_len=8, tp_size=tp, num_sms=8)
    last = tg.num_sms * (tp - 1)  # the first queue of the last rank
    stuck = next(t.id for t in tg.tasks if tg.ops[t.op].kind == "linear" and t.queue >= last)
    monkeypatch.setenv("MPK_INJECT", f"hang:{stuck}")
    inputs, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, tp, torch.bfloat16), [[1, 2]])
    mk = Megakernel(tg, weights=inputs, meta=meta)
    with pytest.raises(MpkError, match=rf"no progress for 1\.5 s: rank {tp - 1} SM \d+ was stuck inside task {stuck} \("):
        mk.run(4, watchdog_seconds=1.5)
    for d in mk.devices:  # every kernel left: every GPU is usable
        torch.cuda.synchronize(d)
    monkeypatch.delenv("MPK_INJECT")
    assert Megakernel(tg, weights=inputs, meta=meta).run(4, eos_token_ids=[]).steps == 4
    report(check=f"tp{tp}-hang", case="llama-kv8", batch=1, task=stuck)
