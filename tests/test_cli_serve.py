"""`mpk serve` from the command line: it listens, answers, and its errors are one line."""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading

import pytest

import tiny_tokenizers
from test_cli import assert_one_line_error, run_cli

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")


def test_import_mpk_and_its_cli_leave_fastapi_out():
    code = ("import sys, mpk, mpk.cli; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'openai', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_serve_on_a_taken_port_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code, _, err = run_cli(capsys, "serve", "tiny", "--backend", "sim", "--dtype", "float32", "--port", port)
    assert_one_line_error(code, err, "cannot listen on 127.0.0.1:" + port)


def test_serve_listens_before_it_says_so(make_checkpoint, monkeypatch, capsys):
    """A client that connects as soon as the "serving" line shows waits in the backlog, not refused."""
    import uvicorn

    path = make_checkpoint("llama", vocab_size=300)
    tiny_tokenizers.save(tiny_tokenizers.byte_level(), path)
    connected = []

    def run_connecting(server, sockets):
        with socket.create_connection(sockets[0].getsockname()[:2], timeout=5):
            connected.append(True)

    monkeypatch.setattr(uvicorn.Server, "run", run_connecting)
    code, _, err = run_cli(capsys, "serve", str(path), "--backend", "sim", "--dtype", "float32", "--port", "0",
                           "--max-seq-len", "32")
    assert code == 0 and "serving " in err and connected == [True]


def test_serve_answers_on_the_port_it_names(make_checkpoint):
    path = make_checkpoint("llama", vocab_size=300)
    tiny_tokenizers.save(tiny_tokenizers.byte_level(), path)
    cmd = [sys.executable, "-c", "import sys; from mpk.cli import main; sys.exit(main(sys.argv[1:]))",
           "serve", str(path), "--backend", "sim", "--dtype", "float32", "--port", "0", "--max-seq-len", "32",
           "--served-model-name", "m"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        while "serving m on " not in (line := lines.get(timeout=120)):
            assert proc.poll() is None, line
        base = line.split(" on ", 1)[1].split()[0]
        r = httpx.get(f"{base}/models", timeout=30)
        assert [m["id"] for m in r.json()["data"]] == ["m"]
        r = httpx.post(f"{base}/completions", json={"model": "m", "prompt": "the", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        # Paged by default: on the CPU executor 8 slots of one 64-row block each (max-seq-len 32), and
        # the scratch block.
        metrics = httpx.get(base.removesuffix("/v1") + "/metrics", timeout=30).text
        blocks = next(line for line in metrics.splitlines() if line.startswith("mpk_kv_blocks "))
        assert float(blocks.split()[1]) == 8 + 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_takes_a_prefill_budget_of_at_least_one_row_for_a_paged_cache(capsys, monkeypatch):
    import mpk.cli
    from mpk.batching import DEFAULT_PREFILL_ROWS
    from mpk.errors import MpkError

    code, _, err = run_cli(capsys, "serve", "tiny", "--prefill-rows", "0")
    assert_one_line_error(code, err, "--prefill-rows must be at least 1, not 0")
    code, _, err = run_cli(capsys, "serve", "tiny", "--prefill-rows", "256", "--kv-block-rows", "0")
    assert_one_line_error(code, err, "--prefill-rows budgets the chunked prefill of a paged KV cache")
    seen = []

    def check_memory(source, args, *rest):
        seen.append(args.prefill_rows)
        raise MpkError("sized")

    monkeypatch.setattr(mpk.cli, "_prepare_backend", lambda args: ("sim", None))
    monkeypatch.setattr(mpk.cli, "_check_memory", check_memory)
    for flags, want in (([], DEFAULT_PREFILL_ROWS), (["--prefill-rows", "2048"], 2048)):
        code, _, err = run_cli(capsys, "serve", "tiny", *flags)
        assert_one_line_error(code, err, "sized")
    assert seen == [DEFAULT_PREFILL_ROWS, 2048]


def test_serve_pages_its_cache_by_default_and_generate_does_not():
    from mpk import defaults
    from mpk.cli import _parser

    serve = _parser().parse_args(["serve", "tiny"])
    assert serve.kv_block_rows == defaults.KV_BLOCK_ROWS
    # Both filled in once the backend is known: 64 slots and a cache sized from memory on a GPU.
    assert serve.max_batch is None and serve.gpu_memory_utilization is None
    assert _parser().parse_args(["generate", "tiny"]).kv_block_rows == 0
    assert _parser().parse_args(["serve", "tiny", "--kv-block-rows", "0"]).kv_block_rows == 0


@pytest.mark.parametrize("backend, batch, utilization", [("cuda", 64, 0.9), ("sim", 8, None)])
def test_serve_fills_in_its_defaults_for_the_backend(capsys, monkeypatch, backend, batch, utilization):
    import mpk.cli
    from mpk.errors import MpkError

    seen = {}

    def check_memory(source, args, *rest):
        seen.update(batch=args.max_batch, utilization=args.gpu_memory_utilization)
        raise MpkError("sized")

    monkeypatch.setattr(mpk.cli, "_prepare_backend", lambda args: (backend, None))
    monkeypatch.setattr(mpk.cli, "_check_memory", check_memory)
    code, _, err = run_cli(capsys, "serve", "tiny")
    assert_one_line_error(code, err, "sized")
    assert seen == {"batch": batch, "utilization": utilization}


def test_a_cache_sized_from_a_busy_gpu_names_the_utilization(capsys, monkeypatch):
    """The pool takes 90% of the device; when others hold part of it, the way out is a lower share."""
    from types import SimpleNamespace

    import torch

    import mpk.cli
    from mpk import memory

    monkeypatch.setattr(mpk.cli, "_prepare_backend", lambda args: ("cuda", None))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * memory.GIB))
    monkeypatch.setattr(memory, "available_gpu_bytes", lambda device: 10 * memory.GIB)
    code, _, err = run_cli(capsys, "serve", "tiny")
    assert_one_line_error(code, err, "but 10.0 GiB is available", "lower --gpu-memory-utilization (now 0.9)")
    monkeypatch.setattr(memory, "available_gpu_bytes", lambda device: 1024)
    code, _, err = run_cli(capsys, "serve", "tiny", "--kv-block-rows", "0")  # no pool sized from the device
    assert_one_line_error(code, err, "use a smaller model or a bigger machine")
    assert "utilization" not in err
