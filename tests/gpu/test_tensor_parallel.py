"""Tensor parallelism on two GPUs: one megakernel per GPU, the allreduces and the sampler reading the
peer's memory, against one GPU and the PyTorch reference.

- Teacher-forced logits at TP=2 within the same tolerances as at TP=1 (test_megakernel), and close
  to TP=1's own (only the order of the float32 sums differs).
- Greedy tokens at TP=2 equal TP=1's and the float32 reference's argmax, on tiny checkpoints of
  every family (those whose KV heads and MLP split over two ranks) and on 8B presets.
- A paged KV cache at TP=2 gives the contiguous cache's logits bit for bit.
- Run control across ranks: a stop at EOS or on request ends both kernels at the same step, a hang on
  one rank is named by rank and SM and stops both, an interrupt leaves both GPUs usable.
Skipped without two CUDA GPUs.
"""

from __future__ import annotations

import gc

import pytest
import torch

from mpk.errors import MpkError

if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)

from test_megakernel import (BF16_INPUTS_TOL, CASES, F32_TIE, SAME_BF16_KV_TOL, bound, checkpoint,  # noqa: E402,F401
                             f32_tie_of, greedy_mismatches, kv_dtype, l2_rel_err, report)

from test_presets import weights  # noqa: E402,F401  (8B bf16 weights on GPU 0, one preset at a time)

from mpk.compiler import compile_model  # noqa: E402
from mpk.engine import check_prompts  # noqa: E402
from mpk.inputs import fuse_weights, program_inputs  # noqa: E402
from mpk.models.reference import ReferenceModel  # noqa: E402
from mpk.runtime import Megakernel  # noqa: E402

TP = 2
# Every family and flag of test_megakernel's cases whose KV heads split over two ranks.
TP_CASES = [c for c, (_, o, _) in CASES.items() if o.get("num_key_value_heads", 2) % TP == 0]
PRESETS = ["qwen3-8b", "llama-3.1-8b"]


def sms(case: str) -> int:
    return CASES[case][2] or torch.cuda.get_device_properties(0).multi_processor_count


def kernel(cfg, hf, prompts, max_seq_len, num_sms, tp):
    tg = compile_model(cfg, batch=len(prompts), max_seq_len=max_seq_len, tp_size=tp, num_sms=num_sms)
    inputs, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, tp, torch.bfloat16), prompts)
    return Megakernel(tg, weights=inputs, meta=meta)


def new_tokens(res, prompts, max_new):
    return [[res.tokens[s][b] for s in range(len(p) - 1, len(p) - 1 + max_new)] for b, p in enumerate(prompts)]


def diverging_at_ties(cfg, hf, prompts, one, two, kv, tie: float = F32_TIE) -> list:
    """Where TP=2's tokens leave TP=1's, the first differing token of each sequence unless the float32
    reference (teacher-forced along TP=1's tokens) has the two within `tie`: a near-tie."""
    ref = ReferenceModel(cfg, hf, torch.float32, "cuda")
    bad = []
    for b, (p, a, c) in enumerate(zip(prompts, one, two)):
        i = next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), None)
        if i is None:
            continue
        ref.reset(1, len(p) + len(a), kv)
        row = ref.forward(torch.tensor([p + a]).cuda(), 0)[0, len(p) - 1 + i].float().cpu()
        if (row[a[i]] - row[c[i]]).abs().item() > tie * row.abs().max().item():
            bad.append((b, i, a[i], c[i]))
    del ref
    torch.cuda.empty_cache()
    return bad


def greedy_against_tp1(cfg, hf, prompts, num_sms, tp, max_new: int = 12):
    """Greedy tokens of `prompts` at TP=tp and at TP=1, each run to `max_new` new tokens, judged as
    the GPU tests judge them. Returns (the TP=tp run, its positions, the bf16 mismatches, near-ties,
    tokens off the float32 argmax, tokens leaving TP=1's away from a near-tie, how many sequences
    differ from TP=1)."""
    seq_len = check_prompts(cfg, prompts, max_new)
    wide = kernel(cfg, hf, prompts, seq_len + 6, num_sms, tp)
    res = wide.run(seq_len + 6, max_new_tokens=max_new, eos_token_ids=[])
    res1 = kernel(cfg, hf, prompts, seq_len + 6, num_sms, 1).run(seq_len + 6, max_new_tokens=max_new, eos_token_ids=[])
    new, new1 = new_tokens(res, prompts, max_new), new_tokens(res1, prompts, max_new)
    kv, tie = kv_dtype(wide.tg), f32_tie_of(wide.tg)
    bad, ties, off32 = greedy_mismatches(cfg, hf, prompts, new, kv=kv, f32_tie=tie)
    split = diverging_at_ties(cfg, hf, prompts, new1, new, kv, tie)
    return res, seq_len, bad, ties, off32, split, sum(a != b for a, b in zip(new1, new))


def preset_against_tp1(cfg, hf, tp, max_new: int = 16):
    """A preset at TP=tp: (the largest error of 8 teacher-forced steps' logits from float32, tokens
    leaving TP=1's greedy ones away from a near-tie, whether the `max_new` tokens differ from TP=1's)."""
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    seqs = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    forced = kernel(cfg, hf, seqs.tolist(), 8, sm, tp).run(8, collect_logits=True, eos_token_ids=[])
    ours = torch.stack(forced.logits, 1)
    prompts = [seqs[0, :3].tolist()]
    res = kernel(cfg, hf, prompts, 3 + max_new, sm, tp).run(3 + max_new, max_new_tokens=max_new, eos_token_ids=[])
    gc.collect()
    torch.cuda.empty_cache()
    res1 = kernel(cfg, hf, prompts, 3 + max_new, sm, 1).run(3 + max_new, max_new_tokens=max_new, eos_token_ids=[])
    gc.collect()
    torch.cuda.empty_cache()
    new, new1 = new_tokens(res, prompts, max_new), new_tokens(res1, prompts, max_new)
    ref = ReferenceModel(cfg, hf, torch.float32, "cuda")
    ref.reset(1, 8)
    want = ref.forward(seqs.cuda(), 0).cpu()
    del ref
    gc.collect()
    torch.cuda.empty_cache()
    err = max(l2_rel_err(ours[:, s], want[:, s]) for s in range(8))
    return err, diverging_at_ties(cfg, hf, prompts, new1, new, torch.bfloat16), int(new1 != new)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("case", TP_CASES)
def test_teacher_forced_logits_at_tp2(checkpoint, case, batch):
    cfg, hf = checkpoint(case)
    T = 20
    seqs = torch.randint(0, cfg.vocab_size, (batch, T), generator=torch.Generator().manual_seed(batch))
    two = kernel(cfg, hf, seqs.tolist(), T, sms(case), TP)
    res = two.run(T, collect_logits=True, eos_token_ids=[])
    one = kernel(cfg, hf, seqs.tolist(), T, sms(case), 1).run(T, collect_logits=True, eos_token_ids=[])
    assert res.steps == T and res.logits[0].shape == (batch, cfg.vocab_size)
    ref = ReferenceModel(cfg, hf, torch.float32, "cuda")
    ref.reset(batch, T)
    want = ref.forward(seqs.cuda(), 0).cpu()
    ref.reset(batch, T, kv_dtype(two.tg))
    want_kv = ref.forward(seqs.cuda(), 0).cpu()
    ref16 = ReferenceModel(cfg, hf, torch.bfloat16, "cuda")
    ref16.reset(batch, T)
    ref16_err = max(l2_rel_err(ref16.forward(seqs.cuda(), 0).float().cpu()[:, s], want[:, s]) for s in range(T))
    ref_errs = [l2_rel_err(res.logits[s], want[:, s]) for s in range(T)]
    kv_errs = [l2_rel_err(res.logits[s], want_kv[:, s]) for s in range(T)]
    tp1_errs = [l2_rel_err(res.logits[s], one.logits[s]) for s in range(T)]
    report(check="tp2-logits", case=case, batch=batch, vs_fp32=max(ref_errs), vs_fp32_same_kv=max(kv_errs),
           vs_tp1=max(tp1_errs), bf16_ref_vs_fp32=ref16_err)
    if two.tg.precision.matmul_inputs == "float32":  # float32 products: the float32 reference's computation
        assert max(kv_errs) < SAME_BF16_KV_TOL, f"{max(kv_errs):.3g} from the float32 reference with the same cache"
    assert max(ref_errs) < bound(ref16_err), f"{max(ref_errs):.3g} from float32 (bf16 reference: {ref16_err:.3g})"
    tp1_tol = SAME_BF16_KV_TOL if two.tg.precision.matmul_inputs == "float32" else BF16_INPUTS_TOL
    assert max(tp1_errs) < tp1_tol, f"{max(tp1_errs):.3g} from one GPU's logits"
    for s in range(T - 1):  # inside the prompt both ranks forward the prompt's next token
        assert res.tokens[s] == seqs[:, s + 1].tolist()


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("case", TP_CASES)
def test_greedy_tokens_at_tp2_equal_tp1(checkpoint, case, batch):
    cfg, hf = checkpoint(case)
    g = torch.Generator().manual_seed(100 + batch)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 3, 9, 1)[:batch]]
    res2, seq_len, bad, ties, off32, split, differ = greedy_against_tp1(cfg, hf, prompts, sms(case), TP)
    assert res2.steps == seq_len and res2.stopped  # both ranks stopped by themselves at the token limit
    report(check="tp2-greedy", case=case, batch=batch, tokens=batch * 12, mismatches=len(bad), near_ties=ties,
           differs_from_tp1=differ)
    assert not bad, f"tokens differ from the reference (seq, index, got, want, gap): {bad[:5]}"
    assert not off32, f"tokens are not the float32 reference's argmax: {off32[:5]}"
    assert not split, f"TP=2 tokens leave TP=1's away from a near-tie (seq, index, tp1, tp2): {split}"


@pytest.mark.parametrize("name", PRESETS)
def test_presets_at_tp2(weights, name):
    """8B shapes on both GPUs: TP=2's greedy tokens are TP=1's bar near-ties, its logits in the bound."""
    cfg, hf = weights(name)
    err, split, differ = preset_against_tp1(cfg, hf, TP)
    report(check="tp2-preset", case=name, batch=1, vs_fp32=err, tokens=16, differs_from_tp1=differ)
    assert err < 2e-2, f"{err:.3g} from float32"
    assert not split, f"TP=2 tokens leave TP=1's away from a near-tie (seq, index, tp1, tp2): {split}"


def test_both_ranks_stop_together_at_eos_and_on_request(checkpoint):
    cfg, hf = checkpoint("llama")
    prompts = [[3, 1, 4, 1, 5]]
    mk = kernel(cfg, hf, prompts, 24, 16, TP)
    free = mk.run(24, eos_token_ids=[])
    assert free.steps == 24 and not free.stopped
    new = [t[0] for t in free.tokens[4:]]
    eos = new[3]
    first = new.index(eos)
    mk.set_meta(program_inputs(cfg, mk.tg, {}, prompts)[1])
    at_eos = mk.run(24, eos_token_ids=[eos])
    assert at_eos.stopped and at_eos.steps == 4 + first + 1 and at_eos.tokens == free.tokens[: at_eos.steps]
    asked = mk.run(24, eos_token_ids=[], on_step=lambda s, toks: s == 6)
    assert asked.stopped and asked.steps == 7
    for d in mk.devices:  # neither kernel is left waiting for the other
        torch.cuda.synchronize(d)
    again = mk.run(24, eos_token_ids=[])
    assert again.tokens == free.tokens


def hang_on_the_last_rank(cfg, hf, tp, monkeypatch) -> int:
    """Hang a task of the last rank inside itself: the watchdog names that rank and task, every
    kernel leaves, and every GPU runs again. Returns the task."""
    tg = compile_model(cfg, batch=1, max_seq_len=8, tp_size=tp, num_sms=8)
    last = tg.num_sms * (tp - 1)  # the first queue of the last rank
    stuck = next(t.id for t in tg.tasks if tg.ops[t.op].kind in ("linear", "linear_tagged") and t.queue >= last)
    monkeypatch.setenv("MPK_INJECT", f"hang:{stuck}")
    inputs, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, tp, torch.bfloat16), [[1, 2]])
    mk = Megakernel(tg, weights=inputs, meta=meta)
    with pytest.raises(MpkError, match=rf"no progress for 1\.5 s: rank {tp - 1} SM \d+ was stuck inside task {stuck} \("):
        mk.run(4, watchdog_seconds=1.5)
    for d in mk.devices:  # every kernel left: every GPU is usable
        torch.cuda.synchronize(d)
    monkeypatch.delenv("MPK_INJECT")
    assert Megakernel(tg, weights=inputs, meta=meta).run(4, eos_token_ids=[]).steps == 4
    return stuck


def test_a_hang_on_one_rank_stops_both_and_names_the_rank(checkpoint, monkeypatch):
    cfg, hf = checkpoint("llama")
    report(check="tp2-hang", case="llama", batch=1, task=hang_on_the_last_rank(cfg, hf, TP, monkeypatch))


def test_an_interrupt_stops_both_ranks(checkpoint):
    cfg, hf = checkpoint("llama")
    mk = kernel(cfg, hf, [[1, 2, 3]], 64, 16, TP)

    def interrupt(step, tokens):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mk.run(64, on_step=interrupt, eos_token_ids=[])
    assert all(torch.cuda.current_stream(d).query() for d in mk.devices)
    again = mk.run(8, eos_token_ids=[])
    assert again.steps == 8 and again.tokens[:2] == [[2], [3]]


def test_generate_and_bench_with_tp2_from_the_command_line(make_checkpoint, capsys):
    import json

    from mpk.cli import main

    path = make_checkpoint("qwen3", tokenizer=True)
    capsys.readouterr()
    args = ["generate", str(path), "--token-ids", "5,6,7", "--max-new-tokens", "6", "--ignore-eos", "--json"]
    assert main(args + ["--tp", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    one = json.loads(capsys.readouterr().out)
    assert two["backend"] == "cuda" and len(two["token_ids"]) == 6 and two["token_ids"] == one["token_ids"]
    assert main(["bench", "tiny", "--tp", "2", "--steps", "8", "--backends", "mpk", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {"mpk", "mpk-tp2"} and rows["mpk-tp2"]["bytes_per_step"] < rows["mpk"]["bytes_per_step"]


def test_trace_at_tp2_records_every_task_of_both_ranks(checkpoint):
    """Each GPU records its own tasks' spans; together they cover the graph, and the profile summary
    counts the allreduce."""
    from mpk.profile import summarize_trace

    cfg, hf = checkpoint("llama")
    mk = kernel(cfg, hf, [[1, 2, 3]], 6, 16, TP)
    spans = mk.run(6, eos_token_ids=[], trace=True).trace
    assert spans.shape == (6, len(mk.tg.tasks), 3) and bool((spans[..., 2] >= spans[..., 1]).all())
    assert bool((spans[..., 1] > 0).all())
    kinds = {row["kind"]: row for row in summarize_trace(mk.tg, spans)["kinds"]}
    assert kinds["allreduce_tagged"]["tasks_per_step"] == sum(
        1 for t in mk.tg.tasks if mk.tg.ops[t.op].kind == "allreduce_tagged")


def test_a_later_launch_reads_only_its_own_tagged_words(checkpoint):
    """The partials travel as words tagged with their step, and the mailboxes keep the last launch's:
    a launch over the same steps with another prompt, and one whose tags wrap (the mailboxes are
    zeroed and the tags start over), must each compute what a fresh kernel does."""
    cfg, hf = checkpoint("llama")
    first, second = [[1, 2, 3]], [[9, 4, 7]]
    mk = kernel(cfg, hf, first, 16, 16, TP)
    assert any(op.kind == "allreduce_tagged" for op in mk.tg.ops)
    want = kernel(cfg, hf, second, 16, 16, TP).run(12, eos_token_ids=[]).tokens
    mk.run(12, eos_token_ids=[])  # the first prompt's words now sit in every mailbox
    _, meta = program_inputs(cfg, mk.tg, fuse_weights(cfg, hf, TP, torch.bfloat16), second)
    mk.set_meta(meta)
    mk.restart_tokens()
    assert mk.run(12, eos_token_ids=[]).tokens == want
    mk.restart_tokens()
    mk._tag_base = (1 << 32) - 5  # the next launch's tags would pass 2^32
    assert mk.run(12, eos_token_ids=[]).tokens == want


def test_a_paged_cache_at_tp2_computes_what_a_contiguous_one_does(checkpoint):
    """Each rank holds its shard of every block; one table, copied to both GPUs, names the blocks."""
    from mpk.paging import BlockPool, KvPages

    cfg, hf = checkpoint("llama")
    steps, rows = 24, 4
    seqs = torch.randint(0, cfg.vocab_size, (2, steps), generator=torch.Generator().manual_seed(5)).tolist()
    tg = compile_model(cfg, batch=2, max_seq_len=steps, tp_size=TP, num_sms=16)
    inputs, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, TP, torch.bfloat16), seqs)
    pool = BlockPool(2 * steps // rows + 3, rows, 2, steps)
    for end in range(rows, steps + rows, rows):  # the two sequences' blocks interleave in the pool
        pool.grow(1, end)
        pool.grow(0, end)
    results = []
    for pages in (None, KvPages(pool.num_blocks, rows)):
        with Megakernel(tg, weights=inputs, meta=meta, kv_pages=pages) as mk:
            if pages is not None:
                mk.set_kv_table(pool.table())
            results.append(mk.run(steps, collect_logits=True, eos_token_ids=[]))
    contiguous, paged = results
    assert paged.tokens == contiguous.tokens
    assert all(torch.equal(p, c) for p, c in zip(paged.logits, contiguous.logits))
