"""`mpk serve`: the OpenAI-compatible server on the CPU executor, against LLM.generate and LLM.chat.

Servers run in-process (uvicorn on a thread), listen on 127.0.0.1 at a free port, and stop at
the end of their test module or test.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import tiny_tokenizers  # noqa: E402
from mpk import LLM, SamplingParams  # noqa: E402
from mpk.batching import Request  # noqa: E402
from mpk.prefill import chunks  # noqa: E402
from mpk.serve import create_app  # noqa: E402

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
MODEL = "tiny-chat"
MAX_SEQ_LEN = 96


@contextmanager
def serving(app):
    """The app on a uvicorn thread at a free 127.0.0.1 port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_until(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def llm(make_checkpoint):
    path = make_checkpoint("llama", vocab_size=300)
    tiny_tokenizers.save(tiny_tokenizers.byte_level(), path, chat_template=TEMPLATE)
    return LLM(str(path), backend="sim", dtype="float32", max_batch=4, max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def app(llm):
    return create_app(llm, MODEL, max_waiting=16)


@pytest.fixture(scope="module")
def url(app):
    with serving(app) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def expected(llm, prompt: str, **params):
    return llm.generate([prompt], SamplingParams(**params))[0].outputs[0]


def test_models_and_health(url):
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_completion_through_the_openai_client_is_generates(client, llm):
    got = client.completions.create(model=MODEL, prompt="the cat", max_tokens=8, temperature=0.8, seed=3)
    want = expected(llm, "the cat", max_tokens=8, temperature=0.8, seed=3)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    prompt_tokens = len(llm.tokenizer.encode("the cat"))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_tokens, len(want.token_ids))


def test_completion_maps_top_p_top_k_and_stop(client, llm):
    params = dict(max_tokens=12, temperature=0.9, top_p=0.8, seed=5)
    got = client.completions.create(model=MODEL, prompt="a dog", stop=["e"], extra_body={"top_k": 20}, **params)
    want = expected(llm, "a dog", top_k=20, stop=["e"], **params)
    assert got.choices[0].text == want.text


def test_chat_through_the_openai_client_is_llm_chat(client, llm):
    messages = [{"role": "user", "content": "hello"}]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    want = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0)).outputs[0]
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids)


def test_streaming_completion_and_chat_through_the_openai_client(client, llm):
    chunks = list(client.completions.create(model=MODEL, prompt="the cat", max_tokens=10, temperature=0.7,
                                            seed=1, stream=True))
    want = expected(llm, "the cat", max_tokens=10, temperature=0.7, seed=1)
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert len(chunks) - 1 == len(want.token_ids)  # one chunk per token, then the one that says why it ended

    messages = [{"role": "user", "content": "hi"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    want = llm.chat(messages, SamplingParams(max_tokens=10, temperature=0)).outputs[0]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content is not None and
               not c.choices[0].delta.role) == len(want.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_sse_ends_with_done(url):
    body = {"model": MODEL, "prompt": "the", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_concurrent_requests_each_get_what_generate_gives(url, llm):
    prompts = [(f"the cat {i}", i) for i in range(8)]
    want = [expected(llm, p, max_tokens=6, temperature=1.0, seed=s).text for p, s in prompts]

    def ask(prompt_seed):
        prompt, seed = prompt_seed
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0,
                                         seed=seed).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, prompts)) == want


def mixed_request(i: int) -> dict:
    """Request i of a mixed load: completions and chats, streamed or not, greedy or sampled with a seed."""
    params = {"max_tokens": 2 + i % 4}
    if i % 3 == 0:
        params["temperature"] = 0.0
    else:
        params.update(temperature=0.6 + 0.1 * (i % 5), seed=100 + i)
        if i % 2:
            params["top_p"] = 0.85
    chat = i % 2 == 1
    prompt = [{"role": "user", "content": f"dog {i}"}] if chat else f"{i} cat"
    return {"chat": chat, "stream": i % 4 >= 2, "prompt": prompt, "params": params}


def send(url: str, req: dict, start: threading.Barrier) -> tuple[str, str, int]:
    """The reply's text, finish reason and token count, through the openai client (a client per thread)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    usage = {"stream_options": {"include_usage": True}} if req["stream"] else {}
    start.wait(30)
    if req["chat"]:
        reply = client.chat.completions.create(model=MODEL, messages=req["prompt"], stream=req["stream"],
                                               **usage, **req["params"])
        if not req["stream"]:
            choice = reply.choices[0]
            return choice.message.content, choice.finish_reason, reply.usage.completion_tokens
        chunks = list(reply)
        choices = [c.choices[0] for c in chunks if c.choices]
        return ("".join(c.delta.content or "" for c in choices), choices[-1].finish_reason,
                chunks[-1].usage.completion_tokens)
    reply = client.completions.create(model=MODEL, prompt=req["prompt"], stream=req["stream"], **usage, **req["params"])
    if not req["stream"]:
        return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens
    chunks = list(reply)
    choices = [c.choices[0] for c in chunks if c.choices]
    return "".join(c.text for c in choices), choices[-1].finish_reason, chunks[-1].usage.completion_tokens


def test_sixteen_mixed_concurrent_requests_each_get_what_the_llm_gives(url, llm):
    requests = [mixed_request(i) for i in range(16)]
    assert {(r["chat"], r["stream"], "seed" in r["params"]) for r in requests} == {
        (c, s, seeded) for c in (False, True) for s in (False, True) for seeded in (False, True)}
    want = []
    for r in requests:
        params = SamplingParams(**r["params"])
        out = llm.chat(r["prompt"], params) if r["chat"] else llm.generate([r["prompt"]], params)[0]
        o = out.outputs[0]
        want.append((o.text, o.finish_reason, len(o.token_ids)))
    assert len({text for text, _, _ in want}) > 8  # the prompts and seeds really differ

    start = threading.Barrier(len(requests))  # every thread sends at the same moment
    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(lambda r: send(url, r, start), requests))
    assert got == want


GOOD = {"model": MODEL, "prompt": "the cat", "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/completions", {**GOOD, "prompt": "x" * 200}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**GOOD, "max_tokens": MAX_SEQ_LEN}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {**GOOD, "max_tokens": -3}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {**GOOD, "max_tokens": "ten"}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {**GOOD, "n": 2}, 400, "n", "unsupported_parameter"),
    ("/v1/completions", {**GOOD, "logprobs": 1}, 400, "logprobs", "unsupported_parameter"),
    ("/v1/completions", {**GOOD, "echo": True}, 400, "echo", "unsupported_parameter"),
    ("/v1/completions", {**GOOD, "frobnicate": 1}, 400, "frobnicate", "unsupported_parameter"),
    ("/v1/completions", {**GOOD, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("/v1/completions", {**GOOD, "prompt": [5, 10_000]}, 400, "prompt", None),
    ("/v1/completions", {**GOOD, "stop": [""]}, 400, None, None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    ("/v1/completions", [1, 2], 400, None, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3},
     400, "n", "unsupported_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True},
     400, "logprobs", "unsupported_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 200}]},
     400, "messages", "context_length_exceeded"),
])
def test_bad_requests_get_openai_errors(url, path, body, status, param, code):
    r = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_malformed_json_is_a_400(url):
    r = httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny-chat", "prompt": ',
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"


def test_the_server_still_answers_after_bad_requests(client, llm):
    httpx.post(f"{client.base_url}completions", content=b"nonsense", headers={"content-type": "application/json"})
    got = client.completions.create(model=MODEL, prompt="the", max_tokens=3, temperature=0)
    assert got.choices[0].text == expected(llm, "the", max_tokens=3, temperature=0).text


def metric(url: str, line_start: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_and_tokens(url, client):
    ok = 'mpk_requests_total{endpoint="/v1/completions",status="200"}'
    before, tokens = metric(url, ok), metric(url, "mpk_generation_tokens_total")
    bad = 'mpk_requests_total{endpoint="/v1/completions",status="400"}'
    bad_before = metric(url, bad)
    out = client.completions.create(model=MODEL, prompt="the", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    httpx.post(f"{url}/v1/completions", json={**GOOD, "max_tokens": 0})
    assert metric(url, ok) == before + 1
    assert metric(url, bad) == bad_before + 1
    assert metric(url, "mpk_generation_tokens_total") == tokens + out.usage.completion_tokens == tokens + 4
    text = httpx.get(f"{url}/metrics").text
    for name in ("mpk_prompt_tokens_total", "mpk_time_to_first_token_seconds_count",
                 "mpk_time_per_output_token_seconds_count", "mpk_requests_waiting", "mpk_requests_running"):
        assert name in text
    steps = metric(url, "mpk_decode_steps")
    assert steps >= 4 and metric(url, 'mpk_decode_slot_steps{slot="all"}') >= metric(url, 'mpk_decode_slot_steps{slot="busy"}') >= steps
    window, decode = metric(url, 'mpk_engine_seconds{phase="window"}'), metric(url, 'mpk_engine_seconds{phase="decode"}')
    assert window >= decode + metric(url, 'mpk_engine_seconds{phase="prefill"}') and decode > 0


def test_a_client_that_disconnects_stops_its_generation(url, app):
    tokens = metric(url, "mpk_generation_tokens_total")
    body = {"model": MODEL, "prompt": "the", "max_tokens": MAX_SEQ_LEN - 10, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"text": "' in line and '"text": ""' not in line:
                break  # one piece of text arrived: leave
    wait_until(lambda: app.state.worker.running == 0 and metric(url, "mpk_generation_tokens_total") > tokens)
    assert metric(url, "mpk_generation_tokens_total") - tokens < MAX_SEQ_LEN - 10


class BlockingJob:
    """Holds the engine until released (its first token's callback waits), so a test can fill the queue."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def request(self) -> Request:
        def hold(_token: int) -> None:
            self.started.set()
            self.release.wait(30)

        return Request([1], SamplingParams(max_tokens=1, temperature=0), on_token=hold)


@contextmanager
def busy_server(llm):
    """A server whose engine runs one job and whose queue (of one) holds another, until the block
    ends; yields (base URL, a function that frees both)."""
    app = create_app(llm, MODEL, max_waiting=1)
    running, waiting = BlockingJob(), BlockingJob()

    def free() -> None:
        running.release.set()
        waiting.release.set()

    with serving(app) as base:
        try:
            app.state.worker.submit(running)
            assert running.started.wait(10)
            app.state.worker.submit(waiting)
            yield base, free
        finally:
            free()


def test_a_full_queue_answers_503(llm):
    with busy_server(llm) as (base, free):
        r = httpx.post(f"{base}/v1/completions", json=GOOD, timeout=60)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "queue_full"
        assert httpx.get(f"{base}/health").status_code == 200
        free()
        r = httpx.post(f"{base}/v1/completions", json=GOOD, timeout=60)
        assert r.status_code == 200


def test_a_paged_cache_serves_the_same_tokens_and_counts_its_blocks(make_checkpoint, llm):
    path = make_checkpoint("llama", vocab_size=300)
    tiny_tokenizers.save(tiny_tokenizers.byte_level(), path, chat_template=TEMPLATE)
    paged = LLM(str(path), backend="sim", dtype="float32", max_batch=4, max_seq_len=MAX_SEQ_LEN, kv_block_rows=8)
    plain = LLM(str(path), backend="sim", dtype="float32", max_batch=4, max_seq_len=MAX_SEQ_LEN)
    with serving(create_app(paged, MODEL, max_waiting=4, prefill_rows=3)) as base:  # the prompt over windows
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        got = client.completions.create(model=MODEL, prompt="the cat", max_tokens=6, temperature=0)
        assert got.choices[0].text == expected(plain, "the cat", max_tokens=6, temperature=0).text
        assert got.usage.prompt_tokens > 4 and metric(base, "mpk_prefill_rows") == got.usage.prompt_tokens - 1
        # Two 3-row chunks, each in passes of 2 and 1 rows on the CPU executor, which replays no CUDA graphs.
        assert got.usage.prompt_tokens == 7 and len(chunks(3)) == 2
        assert metric(base, 'mpk_prefill_passes{how="eager"}') == 4
        assert metric(base, 'mpk_prefill_passes{how="replayed"}') == metric(base, 'mpk_prefill_passes{how="captured"}') == 0
        assert metric(base, "mpk_kv_blocks ") == 4 * MAX_SEQ_LEN // 8 + 1
        assert metric(base, "mpk_kv_blocks_in_use") == 0  # the finished request gave its blocks back
