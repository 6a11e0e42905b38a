"""The memory estimate: it counts what generation really holds, and a run that does not fit is refused
in one line before any weight is loaded."""

from __future__ import annotations

import math

import pytest
import torch

from mpk import memory
from mpk.compiler import compile_model
from mpk.models import resolve_model
from mpk.inputs import fuse_weights
from mpk.models.presets import PRESETS
from test_cli import assert_one_line_error, run_cli


def distinct_bytes(*dicts) -> int:
    """Bytes of the distinct storages behind the tensors of `dicts` (views share their base's)."""
    seen = {}
    for d in dicts:
        for t in d.values():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_and_fused_copies_are_what_generation_holds(make_checkpoint, tp, dtype):
    source = resolve_model(str(make_checkpoint("llama", num_attention_heads=4, num_key_value_heads=2)))
    hf = source.load_weights(dtype)
    fused = fuse_weights(source.cfg, hf, tp, dtype)
    need = memory.estimate(source.cfg, batch=1, max_seq_len=8, tp_size=tp, weight_bytes=dtype.itemsize)
    assert need.weights == distinct_bytes(hf)
    assert need.weights + need.fused == distinct_bytes(hf, fused)


@pytest.mark.parametrize("num_sms", [8, 132])
@pytest.mark.parametrize("activations, act_bytes", [("float32", 4), ("model", 2)])
def test_kv_cache_and_activations_are_what_the_graph_declares(activations, act_bytes, num_sms):
    cfg, batch, seq = PRESETS["tiny"], 3, 40
    tg = compile_model(cfg, batch=batch, max_seq_len=seq, num_sms=num_sms, verify=False, activations=activations)
    need = memory.estimate(cfg, batch=batch, max_seq_len=seq, weight_bytes=2, activation_bytes=act_bytes)
    size = {"model": act_bytes, "bfloat16": 2, "float16": 2, "float32": 4, "int64": 8}
    state = sum(math.prod(t.shape) * size[t.dtype] for t in tg.tensors.values() if t.kind == "state")
    assert need.kv_cache == state
    activations = sum(math.prod(t.shape) * size[t.dtype] for t in tg.tensors.values() if t.kind == "activation")
    assert activations <= need.workspace - memory.PROCESS_ALLOWANCE["CPU RAM"] <= 2 * activations


def test_qwen3_8b_on_the_cpu_executor_needs_about_1_6x_its_weights():
    need = memory.estimate(PRESETS["qwen3-8b"], batch=1, max_seq_len=20)
    assert 1.5 < need.total / need.weights < 1.65
    assert 23 * memory.GIB < need.total < 25 * memory.GIB


def test_cli_refuses_what_does_not_fit_before_loading(capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_cpu_bytes", lambda: 8 * memory.GIB)
    code, out, err = run_cli(capsys, "generate", "qwen3-8b", "--backend", "sim")
    assert_one_line_error(code, err, "qwen3-8b on the CPU executor needs about", "CPU RAM", "but 8.0 GiB is available",
                          "weights", "KV cache", memory.SKIP_ENV)
    assert out == ""


def test_cli_runs_small_models_with_the_real_free_memory(capsys, make_checkpoint):
    assert memory.available_cpu_bytes() > memory.estimate(PRESETS["tiny"], batch=1, max_seq_len=64).total
    code, _, err = run_cli(capsys, "generate", str(make_checkpoint("qwen3")), "--token-ids", "1,2",
                           "--max-new-tokens", "2")
    assert code == 0, err


def test_the_check_can_be_skipped(monkeypatch):
    need = memory.estimate(PRESETS["qwen3-8b"], batch=1, max_seq_len=20)
    with pytest.raises(Exception, match="needs about"):
        memory.check_fits(need, memory.GIB, "qwen3-8b")
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    memory.check_fits(need, memory.GIB, "qwen3-8b")


def test_available_cpu_memory_is_plausible():
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert 0 < memory.available_cpu_bytes() <= total


def test_the_gpu_estimate_holds_the_op_by_op_prefill_at_its_widest():
    cfg = PRESETS["qwen3-8b"]
    cpu = memory.estimate(cfg, batch=1, max_seq_len=4096)
    gpu = memory.estimate(cfg, batch=1, max_seq_len=4096, device="GPU memory")
    extra = gpu.workspace - cpu.workspace - (memory.PROCESS_ALLOWANCE["GPU memory"] - memory.PROCESS_ALLOWANCE["CPU RAM"])
    assert 1.0 * memory.GIB < extra < 2.0 * memory.GIB  # 4096 rows through qwen3-8b's MLP
    short = memory.estimate(cfg, batch=1, max_seq_len=64, device="GPU memory")
    assert short.workspace < gpu.workspace  # a short context prefills few rows
