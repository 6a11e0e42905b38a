"""The `mpk` command: inspect and generate work, and every bad input is one clear line with exit 2."""

import json
import subprocess
import sys

import pytest

from mpk.cli import main


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what writing the checkpoint printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *phrases):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpk: error: "), err
    assert "Traceback" not in err
    for p in phrases:
        assert p in lines[0], lines[0]


def test_inspect_preset_prints_summary_with_passing_verdict(capsys):
    code, out, _ = run_cli(capsys, "inspect", "tiny", "--num-sms", "16")
    assert code == 0
    assert "verifier         PASS" in out
    assert "events" in out and "load balance" in out and "critical path" in out


def test_inspect_json_and_saved_graph(capsys, make_checkpoint, tmp_path):
    ckpt = make_checkpoint("qwen3", num_attention_heads=8, num_key_value_heads=2)
    graph = tmp_path / "graph.json"
    code, out, _ = run_cli(capsys, "inspect", str(ckpt), "--batch", "2", "--tp", "2", "--num-sms", "8",
                           "--max-seq-len", "64", "--json", "--save-graph", str(graph))
    assert code == 0
    summary = json.loads(out)
    assert summary["verifier"]["verdict"] == "pass"
    assert summary["tp"] == 2 and summary["batch"] == 2
    assert summary["events"] < summary["events_unfused"]
    assert sum(r["tasks"] for r in summary["ops"]) == summary["tasks"]
    saved = json.loads(graph.read_text())
    assert len(saved["tasks"]) == summary["tasks"]


def test_generate_json_has_tokens_and_text(capsys, make_checkpoint):
    ckpt = make_checkpoint("llama", tokenizer=True)
    code, out, _ = run_cli(capsys, "generate", str(ckpt), "--prompt", "the cat is", "--max-new-tokens", "5",
                           "--dtype", "float32", "--ignore-eos", "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["token_ids"]) == 5 and all(isinstance(t, int) for t in result["token_ids"])
    assert isinstance(result["text"], str)


def test_generate_batch_of_token_ids(capsys, make_checkpoint):
    ckpt = make_checkpoint("qwen2")
    code, out, _ = run_cli(capsys, "generate", str(ckpt), "--token-ids", "3,4,5", "--token-ids", "7",
                           "--max-new-tokens", "4", "--ignore-eos", "--json")
    assert code == 0
    result = json.loads(out)
    assert [len(t) for t in result["token_ids"]] == [4, 4]
    assert "text" not in result


def test_generate_streams_text_without_json(capsys, make_checkpoint):
    ckpt = make_checkpoint("llama")
    code, out, err = run_cli(capsys, "generate", str(ckpt), "--token-ids", "3,4", "--max-new-tokens", "3",
                             "--ignore-eos")
    assert code == 0
    assert len(out.split(":", 1)[1].split()) == 3
    assert "CPU executor" in err


def test_missing_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "no such checkpoint directory or preset")


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert_one_line_error(code, err, "unsupported architecture", "GPT2LMHeadModel")


def test_config_weights_mismatch(capsys, make_checkpoint):
    ckpt = make_checkpoint("llama")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert_one_line_error(code, err, "mlp")


def test_truncated_safetensors(capsys, make_checkpoint):
    ckpt = make_checkpoint("qwen3")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for argv in (("inspect", str(ckpt)), ("generate", str(ckpt), "--token-ids", "1")):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "model.safetensors")


def test_prompt_longer_than_context(capsys, make_checkpoint):
    ckpt = make_checkpoint("llama", max_position_embeddings=16)
    ids = ",".join(["5"] * 14)
    code, _, err = run_cli(capsys, "generate", str(ckpt), "--token-ids", ids, "--max-new-tokens", "8")
    assert_one_line_error(code, err, "context of 16")


@pytest.mark.parametrize("argv, phrase", [
    (("--prompt", "hello"), "no tokenizer"),
    (("--token-ids", "1,x"), "comma-separated integers"),
    (("--token-ids", "1,99999"), "outside the vocabulary"),
    (("--max-new-tokens", "0"), "at least 1"),
    (("--tp", "3"), "does not divide"),
])
def test_bad_generate_arguments(capsys, make_checkpoint, argv, phrase):
    ckpt = make_checkpoint("llama")
    code, _, err = run_cli(capsys, "generate", str(ckpt), *argv)
    assert_one_line_error(code, err, phrase)


def test_console_entry_point_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpk.cli", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("mpk: error: ") and "Traceback" not in proc.stderr


def test_build_prints_the_library_path(capsys, tmp_path, monkeypatch):
    from mpk.errors import MpkError
    from mpk.runtime.build import find_nvcc

    try:
        find_nvcc()
    except MpkError:
        pytest.skip("no nvcc on this machine")
    monkeypatch.setenv("MPK_CACHE_DIR", str(tmp_path))
    code, out, _ = run_cli(capsys, "build", "tiny", "--batch", "2", "--tp", "2")
    assert code == 0 and out.startswith("tiny batch 2 tp 2 for sm_90a: ")
    so = out.split(": ", 1)[1].split(" (")[0]
    assert so.startswith(str(tmp_path)) and so.endswith(".so")
    import os
    assert os.path.getsize(so) > 0


def test_build_errors(capsys, monkeypatch):
    import mpk.runtime.build as build_mod

    code, _, err = run_cli(capsys, "build", "tiny", "--arch", "sm_75")
    assert_one_line_error(code, err, "sm_80 or newer")
    monkeypatch.setenv("CUDACXX", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(build_mod, "NVCC_FALLBACK", "/nonexistent/nvcc")
    code, _, err = run_cli(capsys, "build", "tiny")
    assert_one_line_error(code, err, "nvcc not found")


def test_cuda_backend_without_a_gpu_is_one_line(capsys, make_checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    ckpt = make_checkpoint("llama")
    code, _, err = run_cli(capsys, "generate", str(ckpt), "--backend", "cuda", "--token-ids", "1,2")
    assert_one_line_error(code, err, "no CUDA GPU")
    code, _, err = run_cli(capsys, "generate", str(ckpt), "--backend", "cuda", "--tp", "2", "--token-ids", "1,2")
    assert_one_line_error(code, err, "tensor parallelism 2 needs 2 GPUs and this machine has 0")


def test_generate_with_a_float32_kv_cache(capsys, make_checkpoint):
    ckpt = make_checkpoint("qwen3")
    args = ("generate", str(ckpt), "--token-ids", "3,4,5", "--max-new-tokens", "4", "--ignore-eos", "--json")
    runs = [json.loads(run_cli(capsys, *args, "--kv-cache", kv)[1])["token_ids"] for kv in ("model", "float32")]
    assert len(runs[0]) == len(runs[1]) == 4
