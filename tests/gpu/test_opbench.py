"""`mpk bench-op` on the GPU: every task template of a small preset, alone, matches its reference; and a
graph without a sampling task runs all its steps with a full trace."""

from __future__ import annotations

import pytest
import torch

from gpu_build import require_gpu_build

require_gpu_build()

from mpk.compiler import compile_model  # noqa: E402
from mpk.graph import ONE_PASS_ATTN_ROWS  # noqa: E402
from mpk.models import resolve_model  # noqa: E402
from mpk.opbench.check import random_buffers  # noqa: E402
from mpk.opbench.program import bench_ops, compile_one_op  # noqa: E402
from mpk.opbench.run import run_op_bench  # noqa: E402
from mpk.runtime import Megakernel  # noqa: E402


@pytest.mark.parametrize("batch, activations, context", [(1, "float32", 40), (4, "model", 40),
                                                          (1, "float32", 2 * ONE_PASS_ATTN_ROWS + 44),
                                                          (4, "model", 2 * ONE_PASS_ATTN_ROWS + 44)])
def test_every_template_alone_matches_its_reference(batch, activations, context):
    """At 40 positions attention is one pass per (sequence, group); at 300 splits and a merge."""
    result = run_op_bench("tiny", batch=batch, context=context, steps=3, repeats=1, activations=activations)
    attention = ["layers.0.attention"] if context < ONE_PASS_ATTN_ROWS else ["layers.0.attention", "layers.0.attn_merge"]
    assert [r["op"] for r in result["rows"]] == ["embed", "layers.0.qkv", *attention, "layers.0.o", "layers.0.gate_up",
                                                 "layers.0.down", "lm_head", "sample"]
    for r in result["rows"]:
        assert r["ok"], r
        assert r["task_us_1sm"] > 0 and r["op_us_all"] > 0 and r["gbps_all"] > 0, r


def test_a_graph_without_sampling_runs_every_step():
    cfg = resolve_model("tiny").cfg
    tg = compile_model(cfg, batch=2, max_seq_len=16, num_sms=4, verify=False)
    one = compile_one_op(cfg, tg, bench_ops(tg, ["rmsnorm_gate_up_silu"])[0], 4)
    with Megakernel(one, buffers=random_buffers(one, cfg.vocab_size, torch.device("cuda"))) as kernel:
        result = kernel.run(5, eos_token_ids=[], trace=True)  # from step 0: no prompt to restart from
    assert result.steps == 5 and not result.stopped
    assert result.trace.shape == (5, len(one.tasks), 3) and bool((result.trace[..., 2] > 0).all())
