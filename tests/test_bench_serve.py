"""`mpk bench-serve` against `mpk serve` on the CPU executor: its counts match the server's, and its
errors are one line.

The server runs in-process (uvicorn on a thread, as in test_serve.py); the command runs through
`mpk.cli.main`.
"""

from __future__ import annotations

import json
import socket
from itertools import islice

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

import tiny_tokenizers  # noqa: E402
from mpk import LLM  # noqa: E402
from mpk.serve import create_app  # noqa: E402
from mpk.serve.loadgen import percentile, request_bodies  # noqa: E402
from test_cli import assert_one_line_error, run_cli  # noqa: E402
from test_serve import busy_server, metric, serving  # noqa: E402

MODEL = "tiny-bench"
MAX_SEQ_LEN = 48


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    path = make_checkpoint("llama", vocab_size=300)
    tiny_tokenizers.save(tiny_tokenizers.byte_level(), path)  # text streams, so there is a first token to time
    return LLM(str(path), backend="sim", dtype="float32", max_batch=1, max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def url(llm):
    with serving(create_app(llm, MODEL, max_waiting=16)) as base:
        yield base


def bench(capsys, url: str, *flags: str) -> tuple[int, dict | str, str]:
    code, out, err = run_cli(capsys, "bench-serve", url, *flags)
    return code, json.loads(out) if "--json" in flags and out else out, err


def test_bench_serve_counts_what_the_server_counts(capsys, url):
    generated, prompted = metric(url, "mpk_generation_tokens_total"), metric(url, "mpk_prompt_tokens_total")
    code, result, err = bench(capsys, url, "--clients", "4", "--requests", "8", "--prompt-len", "8",
                              "--output-len", "4", "--json")
    assert code == 0, err
    assert (result["completed"], result["failures"], result["first_error"]) == (8, 0, None)
    assert (result["model"], result["clients"], result["url"]) == (MODEL, 4, f"{url}/v1")
    assert result["requests_per_s"] > 0 and result["output_tokens_per_s"] > 0
    for name in ("ttft_ms", "tpot_ms"):
        assert 0 < result[name]["p50"] <= result[name]["p99"], name
    assert result["output_tokens"] == metric(url, "mpk_generation_tokens_total") - generated
    assert result["prompt_tokens"] == metric(url, "mpk_prompt_tokens_total") - prompted
    # ignore_eos: each request generates exactly its drawn length, the same ones for the same seed.
    bodies = list(islice(request_bodies(MODEL, 8, 4, seed=0), 8))
    assert result["output_tokens"] == sum(b["max_tokens"] for b in bodies)
    assert result["prompt_tokens"] == sum(len(b["prompt"]) for b in bodies)
    assert {b["max_tokens"] for b in bodies} <= set(range(2, 7))
    assert {len(b["prompt"]) for b in bodies} <= set(range(4, 13))


def test_bench_serve_prints_a_table_and_finds_the_model(capsys, url):
    code, out, err = bench(capsys, url + "/v1/", "--clients", "2", "--requests", "2", "--prompt-len", "4",
                           "--output-len", "3", "--quiet")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{MODEL} at {url}/v1, 2 clients"
    assert lines[1].startswith("completed     2 requests (0 failed) in ")
    assert lines[3].startswith("TTFT          mean ") and lines[4].startswith("TPOT          mean ")


def test_bench_serve_for_a_duration(capsys, url):
    code, result, err = bench(capsys, url, "--clients", "2", "--duration", "0.3", "--prompt-len", "4",
                              "--output-len", "2", "--model", MODEL, "--json")
    assert code == 0, err
    assert result["completed"] >= 2 and result["failures"] == 0


def test_a_busy_server_is_counted_as_failures(capsys, llm):
    with busy_server(llm) as (base, _):
        code, result, err = bench(capsys, base, "--clients", "2", "--requests", "3", "--prompt-len", "4",
                                  "--output-len", "2", "--json")
    assert (result["completed"], result["failures"]) == (0, 3)
    assert result["ttft_ms"] is None and result["first_error"].startswith("HTTP 503: the server is busy")
    assert_one_line_error(code, err, "every request failed; the first: HTTP 503")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("target, phrase", [
    (None, "cannot reach http://127.0.0.1:"),
    ("localhost:8000", "is not an http(s) URL"),
    ("ftp://127.0.0.1/", "is not an http(s) URL"),
    ("http://127.0.0.1:99999", "is not a URL (port 99999"),
    ("http://127.0.0.1:x", "is not a URL"),
])
def test_an_unreachable_or_bad_url_is_one_line(capsys, target, phrase):
    code, out, err = bench(capsys, target or f"http://127.0.0.1:{free_port()}", "--requests", "1")
    assert_one_line_error(code, err, phrase)
    assert out == ""


@pytest.mark.parametrize("flags, phrase", [
    (["--model", "gpt-4"], f"does not serve 'gpt-4'; it serves '{MODEL}'"),
    (["--prompt-len", "40", "--output-len", "8"], f"exceed the model's context of {MAX_SEQ_LEN}"),
    (["--clients", "0"], "--clients must be at least 1"),
    (["--duration", "0"], "--duration must be more than 0 seconds"),
])
def test_requests_the_server_cannot_take_are_refused_before_any_is_sent(capsys, url, flags, phrase):
    before = metric(url, 'mpk_requests_total{endpoint="/v1/completions",status="200"}')
    code, _, err = bench(capsys, url, *flags)
    assert_one_line_error(code, err, phrase)
    assert metric(url, 'mpk_requests_total{endpoint="/v1/completions",status="200"}') == before


def test_percentiles_interpolate_as_numpy_does():
    np = pytest.importorskip("numpy")
    values = sorted([3.0, 1.0, 4.0, 1.5, 9.0, 2.6])
    for q in (0, 50, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_a_model_without_a_tokenizer_still_has_ttft_and_tpot(capsys, make_checkpoint):
    """Token-id prompts and no text: the server still streams a chunk per token, which is what is timed."""
    plain = LLM(str(make_checkpoint("llama")), backend="sim", dtype="float32", max_batch=1, max_seq_len=MAX_SEQ_LEN)
    with serving(create_app(plain, MODEL, max_waiting=16)) as base:
        code, result, err = bench(capsys, base, "--clients", "2", "--requests", "4", "--prompt-len", "6",
                                  "--output-len", "4", "--json")
    assert code == 0, err
    assert result["completed"] == 4 and result["failures"] == 0
    for name in ("ttft_ms", "tpot_ms"):
        assert 0 < result[name]["p50"] <= result[name]["p99"], name
