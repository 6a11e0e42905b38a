"""The benchmark's bookkeeping on the CPU: bytes per step, the table, the trace summary in it.

Checked against a real run recorded on an H100 (docs/bench/): the same compile must count the same
weight bytes, and the table must show what the JSON holds.
"""

import json
from pathlib import Path

from mpk.bench import Row, format_bench, kv_bytes_per_step, kv_rows_per_step, weight_bytes_per_step
from mpk.compiler import compile_model
from mpk.models import resolve_model

RECORDED = Path(__file__).resolve().parents[1] / "docs" / "bench" / "h100-2026-11-28" / "bench-qwen3-8b-b1.json"


def test_row_derives_throughput_and_floor_share():
    r = Row("mpk", ms_per_step=8.0, batch=4, bytes_per_step=16_000_000_000, floor_ms=4.0)
    assert r.tokens_per_s == 500.0 and r.gbps == 2000.0 and r.pct_of_floor == 50.0


def test_recorded_h100_run_counts_the_same_bytes_and_formats():
    result = json.loads(RECORDED.read_text())
    tg = compile_model(resolve_model(result["model"]).cfg, batch=result["batch"], max_seq_len=result["steps"] + 8,
                       num_sms=result["num_sms"], verify=False, activations=result["activations"])
    assert weight_bytes_per_step(tg) == result["bytes_per_step"]
    text = format_bench(result)
    assert text.splitlines()[0].startswith(f"{result['model']} batch 1 on NVIDIA H100")
    mpk = next(r for r in result["rows"] if r["name"] == "mpk")
    assert f"{mpk['ms_per_step']:.3f}" in text and f"{mpk['pct_of_floor']:.1f}%" in text


def test_table_ends_with_the_trace_summary_when_profiled():
    result = json.loads(RECORDED.read_text())
    result["profile"] = {"steps": 63, "step_us": 6400.0, "run_share": 0.8, "wait_share": 0.15, "other_share": 0.05,
                         "kinds": [{"kind": "rmsnorm_linear", "tasks_per_step": 132, "run_us_per_task": 30.0,
                                    "run_share": 0.5, "wait_share": 0.1, "run_gbps": 3.0e12, "wake_us": 1.5,
                                    "op_span_us": 42.0, "tail_us": 3.0}]}
    last = format_bench(result).splitlines()
    assert "80.0% running, 15.0% waiting, 5.0% between tasks" in last[-3]
    assert last[-1].split() == ["rmsnorm_linear", "132", "30.00", "50.0%", "10.0%", "3000", "1.50", "42.00", "3.00"]


def test_kv_bytes_count_the_rows_each_step_reads_and_appends():
    assert kv_rows_per_step(0, 4, None) == (1 + 2 + 3 + 4) / 4
    assert kv_rows_per_step(0, 4, 2) == (1 + 2 + 2 + 2) / 4  # a sliding window caps them
    cfg = resolve_model("qwen3-8b").cfg
    # Per layer 2 x batch x (context + (steps + 1) / 2) x kv_heads x head_dim x bytes.
    assert kv_bytes_per_step(cfg, 1, 4096, 64, "bfloat16") == 36 * 2 * 1 * (4096 + 32.5) * 8 * 128 * 2
    assert kv_bytes_per_step(cfg, 4, 4096, 64, "float32") == 4 * 2 * kv_bytes_per_step(cfg, 1, 4096, 64, "bfloat16")


def test_table_says_the_context_and_the_kv_cache():
    result = json.loads(RECORDED.read_text())
    result.update(context=4096, kv_cache="bfloat16", kv_bytes_per_step=612_000_000)
    first = format_bench(result).splitlines()[0]
    assert "64 steps from position 4096" in first and "(0.61 GB of KV)" in first and "bfloat16 KV cache" in first


def test_tensor_parallel_rows_count_the_busiest_rank_and_the_speedup():
    from mpk.bench import rank_bytes_per_step

    cfg = resolve_model("qwen3-8b").cfg
    one = compile_model(cfg, batch=1, max_seq_len=16, num_sms=132, verify=False)
    two = compile_model(cfg, batch=1, max_seq_len=16, num_sms=132, tp_size=2, verify=False)
    whole = weight_bytes_per_step(one)
    per_rank = [weight_bytes_per_step(two, r) for r in range(2)]
    # Each rank reads about half: its slices, plus the whole embedding rows and norms it keeps.
    assert sum(per_rank) == weight_bytes_per_step(two) and all(0.49 < b / whole < 0.52 for b in per_rank)
    assert rank_bytes_per_step(two, whole) == round(whole * max(per_rank) / weight_bytes_per_step(two))
    assert rank_bytes_per_step(one, whole) == whole
    result = json.loads(RECORDED.read_text())
    mpk = next(r for r in result["rows"] if r["name"] == "mpk")
    result["tp"] = 2
    result["rows"].append({**mpk, "name": "mpk-tp2", "ms_per_step": mpk["ms_per_step"] * 0.55})
    assert "mpk-tp2 takes 0.550x the time of mpk on one GPU (1.82x faster)" in format_bench(result)


def test_random_fused_weights_have_the_layout_fuse_weights_makes():
    """The bench's in-place random weights for presets: every tensor the fused checkpoint has, by rank."""
    import torch

    from mpk.inputs import fuse_weights, random_fused_weights
    from mpk.models.presets import random_weights

    cfg = resolve_model("tiny").cfg
    tg = compile_model(cfg, batch=1, max_seq_len=16, num_sms=4, tp_size=2, verify=False)
    made = random_fused_weights(tg, ["cpu", "cpu"])
    want = fuse_weights(cfg, random_weights(cfg), 2, torch.bfloat16)
    assert set(made) == set(want)
    for name, t in made.items():
        assert t.shape == want[name].shape and t.dtype == want[name].dtype, name
    assert torch.all(made["rank1/layers.0.attn_norm"] == 1)
    assert 0.015 < made["rank0/layers.0.gate_up"].float().std() < 0.025


def test_table_says_when_mpk_samples():
    result = json.loads(RECORDED.read_text())
    result["sampling"] = {"temperature": 0.8, "top_k": 50, "top_p": 0.9}
    assert "mpk sampling (temperature 0.8, top-k 50, top-p 0.9)" in format_bench(result).splitlines()[0]


def test_time_to_first_token_table():
    from mpk.bench import format_ttft

    result = {"model": "qwen3-8b", "gpu": "NVIDIA H200", "batch": 1, "prompt_len": 2048,
              "ttft_ms": {"mpk": 196.0, "mpk-graph": 392.0, "torch-sdpa": 98.0},
              "mpk_parts_ms": {"mpk": {"prefill": 190.0, "decode": 6.0}, "mpk-graph": {"prefill": 386.0, "decode": 6.0}}}
    lines = format_ttft(result).splitlines()
    assert lines[0] == "qwen3-8b: time to first token, batch 1 x 2048 prompt tokens on NVIDIA H200"
    assert lines[1].split() == ["mpk", "196.00", "ms"]
    assert lines[2].split()[:3] == ["prefill", "190.00", "ms"] and "positions 0..2046, PyTorch ops" in lines[2]
    assert lines[3].split()[:4] == ["first", "step", "6.00", "ms"]
    assert lines[4].split() == ["mpk-graph", "392.00", "ms"]
    assert lines[5].split()[:3] == ["prefill", "386.00", "ms"] and "persistent runtime" in lines[5]
    assert "98.00 ms" in lines[7] and "2.00x" in lines[8] and lines[9].endswith("4.00x the time of one batched PyTorch pass")


def test_reference_prefill_with_fused_attention_equals_the_masked_pass(make_checkpoint):
    """The PyTorch baseline of the time-to-first-token bench computes what the reference does, and
    fills the cache decode continues from."""
    import torch

    from mpk.models.checkpoint import load_checkpoint
    from mpk.models.reference import ReferenceModel

    cfg, hf = load_checkpoint(make_checkpoint("qwen3"))
    ref = ReferenceModel(cfg, hf)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    ref.reset(2, 24)
    want = ref.forward(tokens, 0)[:, -1]
    want_next = ref.decode_step(tokens[:, -1], 20)
    ref.reset(2, 24)
    got = ref.prefill(tokens)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ref.decode_step(tokens[:, -1], 20), want_next, atol=1e-5, rtol=1e-5)


def test_a_run_without_the_stream_read_row_shows_no_floor_share():
    result = json.loads(RECORDED.read_text())
    result["rows"] = [r | {"pct_of_floor": float("nan")} for r in result["rows"] if r["name"] == "mpk"]
    mpk_line = next(line for line in format_bench(result).splitlines() if line.split()[:1] == ["mpk"])
    assert mpk_line.split()[-1] == "-" and "nan" not in mpk_line


def test_the_graph_is_as_long_as_the_steps_reach_or_as_asked():
    import pytest

    from mpk.bench import bench_seq_len
    from mpk.errors import MpkError

    assert bench_seq_len(0, 64, None) == 72 and bench_seq_len(4096, 64, None) == 4168
    assert bench_seq_len(0, 64, 4096) == 4096
    with pytest.raises(MpkError, match="--max-seq-len 100 is shorter than the bench's 136 positions"):
        bench_seq_len(64, 64, 100)
    result = json.loads(RECORDED.read_text())
    assert " in a graph of" not in format_bench({**result, "max_seq_len": 72}).splitlines()[0]
    assert "64 steps from position 0 in a graph of 4096 positions" in format_bench({**result, "max_seq_len": 4096})


def test_bench_refuses_a_graph_too_short_before_it_needs_a_gpu(capsys):
    from test_cli import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "bench", "tiny", "--steps", "64", "--context", "64", "--max-seq-len", "100")
    assert_one_line_error(code, err, "--max-seq-len 100 is shorter than the bench's 136 positions")
    code, _, err = run_cli(capsys, "bench", "tiny", "--prompt-len", "64", "--max-seq-len", "4096")
    assert_one_line_error(code, err, "--max-seq-len sizes the decode bench's graph")
