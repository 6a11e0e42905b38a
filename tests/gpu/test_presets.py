"""The megakernel on real model shapes (presets, random bf16 weights) against the PyTorch reference.

- Teacher-forced logits of every step, with the default precisions (float32 activations, bf16 KV
  cache), within SAME_BF16_KV_TOL of a float32 reference on the same weights that keeps a bf16 cache (the
  same computation, up to bf16 rounding flips), and within the issue's 2e-2 of the plain float32 reference, by ||ours - ref|| /
  ||ref|| (a bf16 cache costs 4-7e-3 here; bf16 activations land 4-5e-2 away: docs/decisions.md).
- Greedy tokens (one launch) equal to a bf16 reference teacher-forced along the kernel's own
  tokens, except near-ties as `test_megakernel.judge_token` states them, and to the float32
  reference's (bf16 cache) argmax except gaps below F32_TIE.
- With bf16 matrix-product inputs (the default from batch 2), another computation than float32's:
  logits within the issue's bound (max(2e-2, 1.25 x the bf16 reference's own error)), tokens the
  float32 reference's argmax except gaps below NEAR_TIE. Float32 inputs at batch 4 keep the tight checks.
Run by scripts/gpu_check.sh; skipped without CUDA.
"""

from __future__ import annotations

import gc

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_megakernel import (F32_TIE, NEAR_TIE, SAME_BF16_KV_TOL, bound, forced_rows, greedy_mismatches, kv_dtype,  # noqa: E402
                             l2_rel_err, rel_err, report)

from mpk.compiler import compile_model  # noqa: E402
from mpk.graph import matmul_inputs_for  # noqa: E402
from mpk.inputs import program_inputs  # noqa: E402
from mpk.models import resolve_model  # noqa: E402
from mpk.inputs import fuse_weights  # noqa: E402
from mpk.models.reference import ReferenceModel  # noqa: E402
from mpk.runtime import Megakernel  # noqa: E402

PRESETS = ["qwen3-0.6b", "llama-3.2-1b", "qwen3-8b", "llama-3.1-8b"]
STEPS = 8


@pytest.fixture(scope="module")
def weights():
    """One preset's bf16 weights on the GPU at a time (8B models are 16 GB each)."""
    held: dict = {}

    def get(name):
        if name not in held:
            held.clear()
            gc.collect()
            torch.cuda.empty_cache()
            source = resolve_model(name)
            held[name] = source.cfg, source.load_weights(torch.bfloat16, device="cuda")
        return held[name]

    yield get
    held.clear()


def run_kernel(cfg, hf, prompts, steps, max_new=None, collect_logits=False, matmul_inputs="auto"):
    """(the run's result, the graph's KV cache dtype)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tg = compile_model(cfg, batch=len(prompts), max_seq_len=steps, num_sms=sms, matmul_inputs=matmul_inputs)
    w, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, 1, torch.bfloat16), prompts)
    mk = Megakernel(tg, weights=w, meta=meta)
    res = mk.run(steps, max_new_tokens=max_new, eos_token_ids=[], collect_logits=collect_logits)
    mk.close()
    del mk, w, meta
    torch.cuda.empty_cache()
    return res, kv_dtype(tg)


@pytest.mark.parametrize("name, batch, matmul_inputs", [(n, b, "auto") for n in PRESETS for b in (1, 4)]
                         + [(n, 4, "float32") for n in ("llama-3.2-1b", "qwen3-8b")])
def test_preset_logits_and_tokens(weights, name, batch, matmul_inputs):
    cfg, hf = weights(name)
    g = torch.Generator().manual_seed(batch)
    seqs = torch.randint(0, cfg.vocab_size, (batch, STEPS), generator=g)
    forced, kv = run_kernel(cfg, hf, seqs.tolist(), STEPS, collect_logits=True, matmul_inputs=matmul_inputs)
    ours = torch.stack(forced.logits, 1)  # [B, T, V]
    exact = matmul_inputs_for(matmul_inputs, "float32", batch) == "float32"  # the float32 reference's computation

    prompts = [seqs[b, : 2 + b].tolist() for b in range(batch)]
    max_new = STEPS
    free, _ = run_kernel(cfg, hf, prompts, max(len(p) for p in prompts) + max_new - 1, max_new=max_new,
                         matmul_inputs=matmul_inputs)
    new = [[free.tokens[s][b] for s in range(len(p) - 1, len(p) - 1 + max_new)] for b, p in enumerate(prompts)]

    ref = ReferenceModel(cfg, hf, torch.float32, "cuda")  # one 8B float32 model is 33 GB: build it once
    ref.reset(batch, STEPS)
    want = ref.forward(seqs.cuda(), 0).cpu()
    ref.reset(batch, STEPS, kv)
    want_kv = ref.forward(seqs.cuda(), 0).cpu()  # the float32 computation with the graph's cache
    rows32 = forced_rows(ref, prompts, new, kv)
    del ref
    torch.cuda.empty_cache()
    ref16 = ReferenceModel(cfg, hf, torch.bfloat16, "cuda")
    ref16.reset(batch, STEPS)
    ref16_err = max(l2_rel_err(ref16.forward(seqs.cuda(), 0).float().cpu()[:, s], want[:, s]) for s in range(STEPS))
    del ref16
    torch.cuda.empty_cache()
    errs = [l2_rel_err(ours[:, s], want[:, s]) for s in range(STEPS)]
    kv_errs = [l2_rel_err(ours[:, s], want_kv[:, s]) for s in range(STEPS)]
    worst = max(rel_err(ours[:, s], want[:, s]) for s in range(STEPS))
    bad, ties, off32 = greedy_mismatches(cfg, hf, prompts, new, rows32, f32_tie=F32_TIE if exact else NEAR_TIE)

    report(check="preset", case=f"{name}/{matmul_inputs}", batch=batch, vs_fp32=max(errs), vs_fp32_max=worst,
           tokens=batch * max_new, mismatches=len(bad), near_ties=ties, vs_fp32_same_kv=max(kv_errs),
           bf16_ref_vs_fp32=ref16_err)
    if exact:
        assert max(kv_errs) < SAME_BF16_KV_TOL, \
            f"step {kv_errs.index(max(kv_errs))}: {max(kv_errs):.3g} from float32 ({kv} cache)"
        assert max(errs) < 2e-2, f"step {errs.index(max(errs))}: {max(errs):.3g} from float32"
    assert max(errs) < bound(ref16_err), f"{max(errs):.3g} from float32 (bf16 reference: {ref16_err:.3g})"
    assert not bad, f"tokens differ from the bf16 reference (seq, index, got, want, gap): {bad[:5]}"
    assert not off32, f"tokens are not the float32 reference's argmax (seq, index, got, want, gap): {off32[:5]}"
