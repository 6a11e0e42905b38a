"""Prefill on the CPU executor: a prompt's first positions at once, then decode over the filled cache.

- Against decode alone (the prompt fed one token per step, itself checked against transformers in
  test_generate_vs_hf): with a float32 cache the logits agree to float32 summation noise, and
  greedy tokens are equal; with the default bf16 cache, within bf16 rounding flips.
- Against transformers directly: the logits after a prefill stay within the accuracy bound.
- The verifier proves prefill graphs (one and two ranks) and catches a dropped dependency.
- The API prefills on the CPU executor and returns what it returns without prefill.
- Op by op (`run_prefill_ops`, the GPU's path, here on CPU tensors): the exact mode fills the same
  KV cache and leads to the same logits as the task graph, in one chunk or several; the fast mode
  (bf16 GEMM inputs, fused attention) stays within the accuracy bound of a float32 reference.
"""

import pytest
import torch

from mpk import LLM, SamplingParams
from mpk.compiler import compile_model
from mpk.compiler.verify import VerificationError, verify
from mpk.errors import MpkError
from mpk.inputs import fuse_weights, program_inputs
from mpk.models.checkpoint import load_checkpoint
from mpk.models.reference import ReferenceModel
from mpk.ops import OP_KINDS
from mpk.ops.prefill import query_rows
from mpk.prefill import chunks, compile_prefill, op_chunks, prefill_ops, prefill_rows, run_prefill, run_prefill_ops
from mpk.sim import CpuExecutor
from mpk.taskgraph import TaskGraph

CASES = {  # name: (family, config overrides, tp)
    "llama": ("llama", {}, 1),
    "qwen2-bias": ("qwen2", {}, 1),
    "qwen3-qknorm-tied": ("qwen3", {"tie_word_embeddings": True}, 1),
    "mistral-window": ("mistral", {"sliding_window": 5}, 1),
    "llama-odd": ("llama", {"hidden_size": 60, "intermediate_size": 98, "vocab_size": 131}, 1),
    "qwen3-tp2": ("qwen3", {}, 2),
}


def checkpoints(make_checkpoint, **extra):
    """get(case) -> the loaded checkpoint of CASES[case], with `extra` config overrides, made once."""
    cache = {}

    def get(case):
        if case not in cache:
            family, overrides, _ = CASES[case]
            cache[case] = load_checkpoint(make_checkpoint(family, **extra, **overrides))
        return cache[case]

    return get


@pytest.fixture(scope="module")
def models(make_checkpoint):
    return checkpoints(make_checkpoint)


def decode_logits(cfg, hf, prompts, steps, tp, kv_cache, prefill: bool, weights="bfloat16", chunk=256):
    """Per-step logits and tokens of decode from position 0, or after a prefill of the prompts' first
    positions (in chunks of at most `chunk`)."""
    tg = compile_model(cfg, batch=len(prompts), max_seq_len=steps, num_sms=4, tp_size=tp, kv_cache=kv_cache,
                       weights=weights, matmul_inputs="float32")  # exact products: only summation order differs
    weights, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, tp, torch.float32), prompts)
    with CpuExecutor(tg, weights, meta) as ex:
        first = 0
        if prefill:
            first = prefill_rows(prompts)
            for start, rows in chunks(first, chunk):
                run_prefill(compile_prefill(tg, cfg, rows, start=start), ex.buffers, prompts)
            ex.set_tokens([p[first] for p in prompts])
        res = ex.run(steps - first, first_step=first, eos_token_ids=[], collect_logits=True)
    return res.logits, res.tokens, first


def rel(a, b) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def test_chunks_cover_the_positions_with_few_distinct_shapes():
    assert chunks(600, 256) == [(0, 256), (256, 256), (512, 64), (576, 16), (592, 8)]
    assert chunks(7, 4) == [(0, 4), (4, 2), (6, 1)] and chunks(0, 4) == []
    covered = [p for start, rows in chunks(1000, 128) for p in range(start, start + rows)]
    assert covered == list(range(1000))


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_then_decode_equals_decode_alone(models, case):
    """Eight positions in chunks of 3, 3 and 2 (later chunks attend to the cached ones), the rest by
    decode; against decode of every position."""
    cfg, hf = models(case)
    tp = CASES[case][2]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (11, 9, 13)]
    steps = 15
    for kv_cache, tol in (("float32", 1e-5), ("model", 5e-3)):
        want, want_tokens, _ = decode_logits(cfg, hf, prompts, steps, tp, kv_cache, prefill=False)
        got, tokens, first = decode_logits(cfg, hf, prompts, steps, tp, kv_cache, prefill=True, chunk=3)
        assert first == 8  # the shortest prompt's positions before its last token
        errs = [rel(a, b) for a, b in zip(got, want[first:])]
        assert max(errs) < tol, (kv_cache, max(errs))
        if kv_cache == "float32":
            assert tokens == want_tokens[first:]


@pytest.mark.parametrize("length", [1, 2, 66, 300, 2048])
def test_logits_after_a_prefill_match_transformers(load_hf_model, make_checkpoint, length):
    """A prompt of `length` tokens: all but the last through prefill (chunks of 256, then powers of
    two), the last one decoded; its logits against float32 transformers."""
    path = make_checkpoint("qwen3", max_position_embeddings=2048)
    cfg, hf = load_checkpoint(path)
    model = load_hf_model(path)
    seq = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        want = model(seq).logits[0, -1]
    got, _, first = decode_logits(cfg, hf, [seq[0].tolist()], length, 1, "float32", prefill=True, weights="float32")
    assert first == length - 1
    assert rel(got[0][0], want) < 1e-4


@pytest.mark.parametrize("tp, start", [(1, 0), (2, 0), (1, 4)])
def test_prefill_graphs_verify_and_a_dropped_dependency_is_caught(models, tp, start):
    cfg, _ = models("qwen3-tp2")
    decode = compile_model(cfg, batch=2, max_seq_len=24, num_sms=4, tp_size=tp)
    tg = compile_prefill(decode, cfg, 16, start=start)
    assert tg.stats["verify"]["verdict"] == "pass"
    assert {op.kind for op in tg.ops} >= {"embed", "rmsnorm_linear", "prefill_attention", "rmsnorm_gate_up_silu"}
    bad = TaskGraph.from_json(tg.to_json())
    attention = next(t for t in bad.tasks if bad.ops[t.op].kind == "prefill_attention")
    ev = bad.events[attention.wait]
    dropped = ev.producers.pop()
    bad.tasks[dropped].signals.remove(ev.id)
    ev.target -= 1
    with pytest.raises(VerificationError) as err:
        verify(bad)
    assert err.value.check in ("race", "coverage") and "qkv_out" in str(err.value)


def test_a_prefill_graph_is_gemm_tiled_and_proven_for_its_one_step(models):
    from mpk.execution import check_steps
    from mpk.ops.linear import GEMM_ROWS, GEMM_WEIGHT_ROWS

    cfg, _ = models("llama")
    decode = compile_model(cfg, batch=2, max_seq_len=200, num_sms=4)
    assert not decode.one_step and decode.stats["verify"]["steps"] == 2
    tg = compile_prefill(decode, cfg, 150)  # 2 x 150 rows: row blocks of 128, 128 and 44
    assert tg.one_step and tg.stats["verify"]["steps"] == 1
    qkv = next(i for i, op in enumerate(tg.ops) if op.kind == "rmsnorm_linear")
    tiles = [t for t in tg.tasks if t.op == qkv]
    n = tg.tensors[tg.ops[qkv].outputs["out"]].shape[1]
    assert {t.tile[0] for t in tiles} == {0, 1, 2} and len(tiles) == 3 * -(-n // max(GEMM_WEIGHT_ROWS))
    rows = sorted({next(r.box[0] for r in t.reads if r.role == "x") for t in tiles})
    assert rows == [(0, GEMM_ROWS), (GEMM_ROWS, 2 * GEMM_ROWS), (2 * GEMM_ROWS, 300)]
    with pytest.raises(MpkError, match="runs one step per launch"):
        check_steps(tg, 0, 2)
    assert TaskGraph.from_json(tg.to_json()).one_step


def test_a_prefill_graph_whose_activations_do_not_fit_is_refused(models, monkeypatch):
    import mpk.memory
    from mpk.prefill import _check_activations_fit

    cfg, _ = models("llama")
    tg = compile_prefill(compile_model(cfg, batch=1, max_seq_len=256, num_sms=4), cfg, 200)
    monkeypatch.setattr(mpk.memory, "available_gpu_bytes", lambda device: 1 << 30)
    _check_activations_fit(tg, ["cuda:0"])
    monkeypatch.setattr(mpk.memory, "available_gpu_bytes", lambda device: 1 << 10)
    with pytest.raises(MpkError, match=r"^the prefill graph of 200 positions x 1 sequences needs .* of activations "
                                       r"on cuda:0 and 0\.0 GiB is free; use a smaller chunk_rows$"):
        _check_activations_fit(tg, ["cuda:0"])


def test_a_prompt_shorter_than_the_prefill_is_refused(models):
    cfg, hf = models("llama")
    decode = compile_model(cfg, batch=1, max_seq_len=32, num_sms=8)
    weights, meta = program_inputs(cfg, decode, fuse_weights(cfg, hf, 1, torch.float32), [[1, 2, 3]])
    with CpuExecutor(decode, weights, meta) as ex, pytest.raises(MpkError, match="needs prompts of at least 9 tokens"):
        run_prefill(compile_prefill(decode, cfg, 8), ex.buffers, [[1, 2, 3]])
    with pytest.raises(MpkError, match="does not fit a context of 32"):
        compile_prefill(decode, cfg, 8, start=24)


def test_the_api_prefills_and_returns_what_it_returns_without(make_checkpoint):
    path = str(make_checkpoint("qwen3", tokenizer=True))
    prompts = [list(range(3, 30)), list(range(50, 70))]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=6, seed=4, ignore_eos=True)
    with LLM(path, backend="sim", dtype="float32", kv_cache="float32") as fast, \
            LLM(path, backend="sim", dtype="float32", kv_cache="float32", prefill=False) as slow:
        for params in (greedy, sampled):
            a = [o.outputs[0].token_ids for o in fast.generate(prompts, params)]
            assert fast.last_run.prefilled == 19  # every position both prompts have before their last token
            b = [o.outputs[0].token_ids for o in slow.generate(prompts, params)]
            assert slow.last_run.prefilled == 0 and fast.last_run.steps < slow.last_run.steps
            assert a == b


# --- op by op ------------------------------------------------------------------------------------

BOUND = 2e-2  # the accuracy bound is max(2e-2, 1.25x transformers' bf16 error): 2e-2 is never looser


@pytest.fixture(scope="module")
def long_models(make_checkpoint):
    """The CASES checkpoints with room for prompts of 300 tokens and more."""
    return checkpoints(make_checkpoint, max_position_embeddings=512)


def by_tasks(cfg, prompts):
    def run(tg, ex):
        first = prefill_rows(prompts)
        for start, rows in chunks(first):
            run_prefill(compile_prefill(tg, cfg, rows, start=start), ex.buffers, prompts)
        if first:
            ex.set_tokens([p[first] for p in prompts])
        return first

    return run


def by_ops(cfg, prompts, fast=False, chunk_rows=8192):
    return lambda tg, ex: prefill_ops(ex, cfg, prompts, fast=fast, chunk_rows=chunk_rows)


def after_prefill(cfg, hf, prompts, tp, prefill, new_tokens=3, kv_cache="model"):
    """The KV cache rows a prefill filled, then per decode step until every prompt has `new_tokens`
    new tokens: the logits, and the tokens each sequence was fed."""
    steps = max(len(p) for p in prompts) + new_tokens - 1
    tg = compile_model(cfg, batch=len(prompts), max_seq_len=steps, num_sms=4, tp_size=tp, kv_cache=kv_cache,
                       matmul_inputs="float32")  # exact products, as the op-by-op prefill's
    weights, meta = program_inputs(cfg, tg, fuse_weights(cfg, hf, tp, torch.float32), prompts)
    with CpuExecutor(tg, weights, meta) as ex:
        first = prefill(tg, ex)
        cache = {n: ex.buffers[n][:, :first].clone() for n, spec in tg.tensors.items() if spec.kind == "state"}
        res = ex.run(steps - first, first_step=first, eos_token_ids=[], collect_logits=True)
    fed = [[p[s] if s < len(p) else res.tokens[s - 1 - first][b] for s in range(first, steps)]
           for b, p in enumerate(prompts)]
    return cache, res.logits, fed, first


def float32_rows(cfg, hf, prompts, fed, first):
    """Per step from `first`, the float32 reference's logits [batch, vocab] along the tokens each
    sequence was fed (on the run's bf16 weights, with a float32 cache)."""
    ref = ReferenceModel(cfg, {k: v.to(torch.bfloat16) for k, v in hf.items()}, torch.float32)
    rows = []
    for p, tokens in zip(prompts, fed):
        seq = torch.tensor([p[:first] + tokens])
        ref.reset(1, seq.shape[1])
        rows.append(ref.forward(seq, 0)[0, first:])
    return [torch.stack([r[s] for r in rows]) for s in range(len(fed[0]))]


def mixed_prompts(cfg, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (length + 2, length, length + 1)]


def test_op_chunks_are_few_and_equal():
    assert op_chunks(2047, 1) == [(0, 2047)] and op_chunks(511, 8) == [(0, 511)]
    assert op_chunks(600, 2, 512) == [(0, 200), (200, 200), (400, 200)]
    assert op_chunks(7, 3, 6) == [(0, 2), (2, 2), (4, 2), (6, 1)] and op_chunks(0, 4) == []
    covered = [p for start, rows in op_chunks(1000, 3, 256) for p in range(start, start + rows)]
    assert covered == list(range(1000))


@pytest.mark.parametrize("length", [1, 5, 300])
@pytest.mark.parametrize("case", list(CASES))
def test_ops_fill_the_cache_the_task_graph_fills(long_models, case, length):
    """The exact op-by-op prefill, in one chunk and in chunks of about a third (the later ones
    attend to cached rows under a mask), against the task graph's chunks of 256 and powers of two.
    Only float32 summation order differs: with a bf16 cache it flips a few entries' rounding."""
    cfg, hf = long_models(case)
    tp = CASES[case][2]
    prompts = mixed_prompts(cfg, length, length)
    for kv_cache, tol in (("float32", 1e-5), ("model", 1e-4)):
        want_cache, want, want_fed, first = after_prefill(cfg, hf, prompts, tp, by_tasks(cfg, prompts),
                                                          kv_cache=kv_cache)
        assert first == length - 1
        for chunk_rows in (8192, 3 * max(1, length // 3)):
            cache, got, fed, done = after_prefill(cfg, hf, prompts, tp, by_ops(cfg, prompts, chunk_rows=chunk_rows),
                                                  kv_cache=kv_cache)
            assert done == first and fed == want_fed
            for name, rows in want_cache.items() if first else ():
                assert rel(cache[name].float(), rows.float()) < tol, (kv_cache, chunk_rows, name)
            assert max(rel(a, b) for a, b in zip(got, want)) < tol, (kv_cache, chunk_rows)


@pytest.mark.parametrize("length", [5, 300])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_ops_stay_within_the_bound(long_models, case, length):
    """bf16 GEMM inputs and fused attention (with a mask after the first chunk): every step's
    logits within the bound of the float32 reference, and not the exact mode's."""
    cfg, hf = long_models(case)
    tp = CASES[case][2]
    prompts = mixed_prompts(cfg, length, length + 1)
    _, exact, _, _ = after_prefill(cfg, hf, prompts, tp, by_ops(cfg, prompts))
    for chunk_rows in (8192, 3 * max(1, length // 3)):
        _, got, fed, first = after_prefill(cfg, hf, prompts, tp, by_ops(cfg, prompts, fast=True, chunk_rows=chunk_rows))
        want = float32_rows(cfg, hf, prompts, fed, first)
        errs = [rel(a, b) for a, b in zip(got, want)]
        assert max(errs) < BOUND, (chunk_rows, errs)
        assert rel(got[0], exact[0]) > 1e-5  # the fast mode rounds: this is not the exact mode again


def test_an_op_without_a_whole_form_is_refused(models):
    cfg, _ = models("llama")
    tg = compile_model(cfg, batch=1, max_seq_len=8, num_sms=4)
    for kind in ("rmsnorm_lm_head_argmax", "sample", "attention"):
        op = next(op for op in tg.ops if op.kind == kind)
        with pytest.raises(MpkError, match=f"op kind '{kind}' .* cannot run as one whole op"):
            OP_KINDS[kind].run_whole(op, {}, 0)


def test_the_api_on_the_gpu_path_prefills_op_by_op(make_checkpoint):
    """`LLM._prefill`'s GPU branch (op by op, fast) over the CPU executor's buffers: it prefills the
    positions every prompt has, and greedy decode continues as after the task graph's prefill."""
    path = str(make_checkpoint("qwen3"))
    prompts = [list(range(3, 30)), list(range(50, 70))]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(path, backend="sim", dtype="bfloat16") as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]  # opens the CPU executor
        llm.backend = "cuda"  # from here on `_prefill` takes the GPU's branch, over that same executor
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        assert llm.last_run.prefilled == 19 and (0, 19) in llm._prefills[2]
        assert got == want


@pytest.mark.parametrize("heads, kv_heads", [(8, 1), (6, 2)])
def test_row_block_tasks_compute_the_whole_op(make_checkpoint, heads, kv_heads):
    """A chunk after cached positions, under a sliding window, whose attention tasks each take a block
    of query rows (16 rows x 8 heads, 32 rows x 3 heads; the last block partial): the task graph
    fills the KV cache the exact whole-op run fills, layer 1's rows depending on layer 0's output."""
    cfg, hf = load_checkpoint(make_checkpoint("mistral", sliding_window=7, num_attention_heads=heads,
                                              num_key_value_heads=kv_heads))
    prompts = mixed_prompts(cfg, 60, 3)[:2]
    start, rows = 20, 37
    decode = compile_model(cfg, batch=len(prompts), max_seq_len=64, num_sms=4, kv_cache="float32")
    tg = compile_prefill(decode, cfg, rows, start=start)
    blocks = {t.tile[2] for t in tg.tasks if tg.ops[t.op].kind == "prefill_attention"}
    assert len(blocks) == -(-rows // query_rows(cfg.q_per_kv)) > 1
    weights, meta = program_inputs(cfg, decode, fuse_weights(cfg, hf, 1, torch.float32), prompts)
    caches = []
    for by_tasks_too in (True, False):
        with CpuExecutor(decode, weights, meta) as ex:
            run_prefill(compile_prefill(decode, cfg, start), ex.buffers, prompts)
            if by_tasks_too:
                run_prefill(tg, ex.buffers, prompts)
            else:
                run_prefill_ops(tg, ex.buffers, prompts)
            caches.append({n: ex.buffers[n][:, start:start + rows].clone() for n, spec in decode.tensors.items()
                           if spec.kind == "state"})
    got, want = caches
    assert len(want) == 2 * cfg.num_layers
    for name in want:
        assert rel(got[name], want[name]) < 1e-5, name
