"""The Perfetto trace writer on a synthetic recording (the GPU records real ones)."""

import json

import torch

from mpk.compiler import compile_model
from mpk.models.config import ModelConfig
from mpk.profile import write_trace


def test_trace_has_one_span_per_task_instance_on_its_sm(tmp_path):
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    tg = compile_model(cfg, batch=1, max_seq_len=8, num_sms=4, verify=False)
    steps, n = 2, len(tg.tasks)
    spans = torch.zeros(steps, n, 3, dtype=torch.int64)
    for s in range(steps):
        for t in range(n):
            base = 10_000 + (s * n + t) * 1000
            spans[s, t] = torch.tensor([base, base + 200 * (t % 2), base + 700])
    path = tmp_path / "trace.json"
    count = write_trace(str(path), tg, spans)
    events = json.loads(path.read_text())["traceEvents"]
    runs = [e for e in events if e["ph"] == "X" and e["cat"] != "wait"]
    waits = [e for e in events if e["ph"] == "X" and e["cat"] == "wait"]
    assert len(runs) == steps * n and len(waits) == steps * (n // 2)
    assert count == len(runs) + len(waits)
    first = runs[0]
    assert first["ts"] == 0 and first["dur"] == 0.7 and first["tid"] == tg.tasks[0].queue
    assert {e["args"]["step"] for e in runs} == {0, 1}
    assert all(e["name"] == tg.ops[tg.tasks[e["args"]["task"]].op].name for e in runs)
