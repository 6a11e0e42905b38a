"""Prefill on the GPU: the prefill ops in PyTorch over the megakernel's buffers, or the prefill task
graphs on the persistent runtime, then the megakernel's decode steps from the KV cache they filled,
on tiny random checkpoints.

- Teacher-forced logits: a sequence of `length` + 3 tokens whose first `length` - 1 positions are
  prefilled (in one chunk, or in several that attend to the cached rows under a mask), the rest
  decoded by the megakernel; every decoded step's logits within the accuracy bound of the float32
  reference, max(2e-2, 1.25x the bf16 reference's own error), for prompts of 1 to 2048 tokens.
- `LLM(..., backend="cuda")`: prompts of different lengths in one batch, prefilled together and
  decoded greedily; every new token the bf16 reference's argmax along mpk's own tokens, bar
  near-ties (test_megakernel's rule). With two GPUs, the same at tensor parallelism 2.

Set MPK_GPU_REPORT to a file to get one JSON line per check (scripts/gpu_check.sh prints them).
"""

from __future__ import annotations

import pytest
import torch

from gpu_build import require_gpu_build

require_gpu_build()

from test_megakernel import bound, checkpoint, greedy_mismatches, l2_rel_err, report  # noqa: E402,F401

from mpk import LLM, SamplingParams  # noqa: E402
from mpk.compiler import compile_model  # noqa: E402
from mpk.inputs import fuse_weights, program_inputs  # noqa: E402
from mpk.models.checkpoint import load_checkpoint  # noqa: E402
from mpk.models.reference import ReferenceModel  # noqa: E402
from mpk.prefill import prefill_graphs, prefill_ops  # noqa: E402
from mpk.runtime import Megakernel  # noqa: E402

LENGTHS = [1, 17, 300, 2048]
AFTER = 4  # decode steps checked after the prefill
MAX_SEQ = max(LENGTHS) + AFTER
CASES = {  # name: (family, config overrides)
    "llama": ("llama", {}),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qknorm-tied": ("qwen3", {"tie_word_embeddings": True}),
    "mistral-window": ("mistral", {"sliding_window": 64}),
    "llama-odd": ("llama", {"hidden_size": 60, "intermediate_size": 98, "vocab_size": 131}),  # K % 8 != 0
    "llama-wide": ("llama", {"hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8,
                             "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 1000}),
}


def model(checkpoint, case: str):
    family, overrides = CASES[case]
    return checkpoint(f"{case}-prefill", family, {**overrides, "max_position_embeddings": MAX_SEQ})


@pytest.fixture(scope="module")
def kernels(checkpoint):
    """One megakernel per case for two sequences of up to MAX_SEQ positions, new prompts in its meta."""
    made = {}

    def get(case):
        if case not in made:
            cfg, hf = model(checkpoint, case)
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            tg = compile_model(cfg, batch=2, max_seq_len=MAX_SEQ, num_sms=sms)
            weights, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, 1, torch.bfloat16), [[0]] * 2)
            made[case] = cfg, hf, Megakernel(tg, weights=weights, meta=meta)
        return made[case]

    yield get
    for _, _, mk in made.values():
        mk.close()


@pytest.mark.parametrize("runtime", ["ops", "graph"])
@pytest.mark.parametrize("chunk_rows", [8192, 256])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_after_a_prefill(kernels, case, length, chunk_rows, runtime):
    if chunk_rows < 8192 and length < 300:
        pytest.skip("one chunk either way")  # 256 rows: chunks of 128 positions for two sequences
    cfg, hf, mk = kernels(case)
    T = length + AFTER - 1
    seqs = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(length))
    mk.set_meta(program_inputs(cfg, mk.tg, {}, seqs.tolist())[1])  # the whole sequence: teacher-forced decode
    prompts = seqs[:, :length].tolist()
    if runtime == "ops":
        first = prefill_ops(mk, cfg, prompts, chunk_rows=chunk_rows)
    else:  # the prefill task graphs on the persistent runtime
        graphs: dict = {}
        first = prefill_graphs(mk, cfg, prompts, graphs, chunk_rows=chunk_rows)
        for graph in graphs.values():
            graph.close()
    assert first == length - 1
    res = mk.run(T - first, first_step=first, collect_logits=True, eos_token_ids=[])
    assert res.steps == T - first
    assert res.tokens[:-1] == seqs[:, first + 1:].T.tolist()  # inside the prompt: its next tokens
    assert res.tokens[-1] == res.logits[-1].argmax(-1).tolist()
    ref = ReferenceModel(cfg, hf, torch.float32, "cuda")
    ref.reset(2, T)
    want = ref.forward(seqs.cuda(), 0)[:, first:].cpu()
    del ref
    ref16 = ReferenceModel(cfg, hf, torch.bfloat16, "cuda")
    ref16.reset(2, T)
    ref16_err = max(l2_rel_err(r, w) for r, w in zip(ref16.forward(seqs.cuda(), 0)[:, first:].float().cpu().unbind(1),
                                                    want.unbind(1)))
    del ref16
    errs = [l2_rel_err(res.logits[s], want[:, s]) for s in range(T - first)]
    report(check=f"prefill-{runtime}", case=case, batch=2, length=length, chunk_rows=chunk_rows, vs_fp32=max(errs),
           bf16_ref_vs_fp32=ref16_err)
    assert max(errs) < bound(ref16_err), f"{max(errs):.3g} from float32 (bf16 reference: {ref16_err:.3g})"


def llm_checkpoint(make_checkpoint, case: str):
    """A checkpoint's path, and its config and bf16 weights for the references."""
    family, overrides = CASES[case]
    path = make_checkpoint(family, max_position_embeddings=1024, **overrides)
    cfg, hf = load_checkpoint(path)
    return str(path), cfg, {k: v.to(torch.bfloat16) for k, v in hf.items()}


def generate(llm: LLM, prompts, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("case", ["qwen3-qknorm-tied", "mistral-window"])
def test_llm_prefills_prompts_of_different_lengths_then_decodes(make_checkpoint, case):
    path, cfg, hf = llm_checkpoint(make_checkpoint, case)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (300, 17, 90)]
    max_new = 12
    with LLM(path, backend="cuda", max_batch=4, max_seq_len=512) as llm:
        new = generate(llm, prompts, max_new)
        assert llm.last_run.prefilled == 16 and all(len(t) == max_new for t in new)
    bad, ties, _ = greedy_mismatches(cfg, hf, prompts, new)
    report(check="greedy", case=f"{case}/prefill", batch=len(prompts), tokens=len(prompts) * max_new,
           mismatches=len(bad), near_ties=ties)
    assert not bad, f"tokens differ from the reference (seq, index, got, want, gap): {bad[:5]}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_llm_prefills_at_tensor_parallelism_two(make_checkpoint):
    path, cfg, hf = llm_checkpoint(make_checkpoint, "qwen3-qknorm-tied")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (200, 33)]
    max_new = 12
    with LLM(path, backend="cuda", tp_size=2, max_batch=2, max_seq_len=256) as llm:
        new = generate(llm, prompts, max_new)
        assert llm.last_run.prefilled == 32
    bad, ties, _ = greedy_mismatches(cfg, hf, prompts, new)
    report(check="greedy", case="qwen3/prefill-tp2", batch=len(prompts), tokens=len(prompts) * max_new,
           mismatches=len(bad), near_ties=ties)
    assert not bad, f"tokens differ from the reference (seq, index, got, want, gap): {bad[:5]}"
