"""`mpk bench-serve`: a load generator for an OpenAI-compatible server (mpk serve, vLLM, ...).

`clients` streaming clients each send one completion at a time, back to back, until `requests`
have been sent or `duration` seconds have passed (requests in flight then still finish). Prompts
are random token ids, so their lengths are exact whatever the server's tokenizer. Each request's
prompt and output lengths are drawn uniformly within +-50% of the means from `seed`, so runs with
one seed send the same requests.

Per request: TTFT is the time from sending to the first token's chunk (mpk serve streams one chunk
per token, its text possibly empty); TPOT is (end of stream - first token) / (output tokens - 1),
with the output tokens the server's usage counts. A request that streams no token chunk has no
TTFT or TPOT, and one of a single token no TPOT.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx

from mpk import progress
from mpk.errors import MpkError

SPREAD = 0.5  # lengths are drawn from [mean * (1 - SPREAD), mean * (1 + SPREAD)]
# Prompt token ids are drawn below this: the API does not say the server's vocabulary size, and
# every vocabulary has this many ids.
PROMPT_ID_LIMIT = 100
CONNECT_TIMEOUT_S = 10.0


@dataclass
class Outcome:
    """One request: its token counts and latencies (seconds) if it completed, else why it failed."""

    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    tpot: float | None = None
    error: str | None = None


def api_base(url: str) -> str:
    """The /v1 base of a server URL given with or without /v1."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise MpkError(f"{url!r} is not a URL ({e}); give the server's address, such as "
                       "http://127.0.0.1:8000") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise MpkError(f"{url!r} is not an http(s) URL; give the server's address, such as http://127.0.0.1:8000")
    if parsed.port is not None and not 0 < parsed.port <= 65535:
        raise MpkError(f"{url!r} is not a URL (port {parsed.port} is not between 1 and 65535)")
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def length_range(mean: int) -> tuple[int, int]:
    """The lowest and highest length drawn for a mean (at least 1)."""
    lo = max(1, round(mean * (1 - SPREAD)))
    return lo, max(lo, round(mean * (1 + SPREAD)))


def served_model(base: str, model: str | None, longest: int, timeout: float) -> str:
    """Ask /v1/models: the model to load (`model`, or the first served) once the server is known to
    answer and the longest request is known to fit its context."""
    try:
        r = httpx.get(f"{base}/models", timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S))
    except httpx.HTTPError as e:
        raise MpkError(f"cannot reach {base}: {_one_line(e)}; is the server running there?") from None
    if r.status_code != 200:
        raise MpkError(f"{base}/models answered HTTP {r.status_code}: {_error_message(r)}")
    try:
        listed = [m for m in r.json()["data"] if isinstance(m.get("id"), str)]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MpkError(f"{base}/models did not answer with a list of models; is it an OpenAI-compatible "
                       "server?") from None
    if not listed:
        raise MpkError(f"{base} serves no models")
    names = [m["id"] for m in listed]
    if model is not None and model not in names:
        raise MpkError(f"{base} does not serve {model!r}; it serves {', '.join(map(repr, names))}")
    chosen = next(m for m in listed if m["id"] == (model or names[0]))
    context = chosen.get("max_model_len")
    if isinstance(context, int) and longest > context:
        raise MpkError(f"requests of up to {longest} tokens (prompt and output) exceed the model's context of "
                       f"{context}; lower --prompt-len or --output-len")
    return chosen["id"]


def run_bench_serve(url: str, *, model: str | None = None, clients: int = 8, requests: int | None = None,
                    duration: float | None = None, prompt_len: int = 128, output_len: int = 128, seed: int = 0,
                    ignore_eos: bool = True, timeout: float = 600.0) -> dict:
    """Load the server at `url` and summarize what it did: see the module's docstring.

    Without `duration`, `requests` defaults to 4 per client. `ignore_eos` asks for exactly the
    drawn output lengths (an extension mpk serve and vLLM take)."""
    base = api_base(url)
    if requests is None and duration is None:
        requests = 4 * clients
    model = served_model(base, model, length_range(prompt_len)[1] + length_range(output_len)[1], timeout)
    bodies = request_bodies(model, prompt_len, output_len, seed, ignore_eos)
    what = f"{requests} requests" if requests is not None else f"requests for {duration:g} s"
    with progress.phase(f"sending {what} from {clients} clients", total=requests, unit="req") as shown:
        outcomes, seconds = asyncio.run(_load(base, bodies, clients, requests, duration, timeout, shown.update))
    return summarize(outcomes, seconds, url=base, model=model, clients=clients)


def request_bodies(model: str, prompt_len: int, output_len: int, seed: int, ignore_eos: bool = True):
    """Request bodies, endlessly, the same ones for the same seed."""
    rng = random.Random(seed)
    prompt_range, output_range = length_range(prompt_len), length_range(output_len)
    while True:
        prompt = [rng.randrange(PROMPT_ID_LIMIT) for _ in range(rng.randint(*prompt_range))]
        body = {"model": model, "prompt": prompt, "max_tokens": rng.randint(*output_range), "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        if ignore_eos:
            body["ignore_eos"] = True
        yield body


async def _load(base: str, bodies, clients: int, requests: int | None, duration: float | None, timeout: float,
                on_done) -> tuple[list[Outcome], float]:
    outcomes: list[Outcome] = []
    sent = 0
    start = time.perf_counter()
    deadline = None if duration is None else start + duration

    def next_body() -> dict | None:
        # One event loop runs every client, so taking the next body needs no lock.
        nonlocal sent
        if (requests is not None and sent >= requests) or (deadline is not None and time.perf_counter() >= deadline):
            return None
        sent += 1
        return next(bodies)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S), limits=limits) as http:
        async def client() -> None:
            while (body := next_body()) is not None:
                outcomes.append(await _request(http, base, body))
                on_done(1)

        await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes, time.perf_counter() - start


async def _request(http: httpx.AsyncClient, base: str, body: dict) -> Outcome:
    """Stream one completion; any error of the server or the connection is this request's failure."""
    sent = time.perf_counter()
    first = usage = None
    try:
        async with http.stream("POST", f"{base}/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(False, error=f"HTTP {r.status_code}: {_error_message(r)}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[len("data: "):])
                if not isinstance(chunk, dict):
                    return Outcome(False, error=f"a stream chunk is not a JSON object: {_one_line(line)[:200]}")
                if "error" in chunk:
                    return Outcome(False, error=_error_text(chunk))
                if first is None and any(isinstance(c, dict) and "text" in c and c.get("finish_reason") is None
                                         for c in chunk.get("choices") or ()):
                    first = time.perf_counter()  # the first token's chunk (its text may still be held back)
                usage = chunk.get("usage") or usage
            else:
                return Outcome(False, error="the stream ended before its [DONE]")
    except (httpx.HTTPError, ValueError) as e:  # ValueError: a chunk that is not JSON
        return Outcome(False, error=": ".join(part for part in (type(e).__name__, _one_line(e)) if part))
    end = time.perf_counter()
    if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
        return Outcome(False, error="the stream carried no usage (stream_options.include_usage)")
    tokens = usage["completion_tokens"]
    return Outcome(True, prompt_tokens=usage.get("prompt_tokens", len(body["prompt"])), output_tokens=tokens,
                   ttft=None if first is None else first - sent,
                   tpot=(end - first) / (tokens - 1) if first is not None and tokens > 1 else None)


def summarize(outcomes: list[Outcome], seconds: float, **head) -> dict:
    done = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    output_tokens = sum(o.output_tokens for o in done)
    return {**head, "completed": len(done), "failures": len(failed), "seconds": round(seconds, 3),
            "prompt_tokens": sum(o.prompt_tokens for o in done), "output_tokens": output_tokens,
            "requests_per_s": round(len(done) / seconds, 3), "output_tokens_per_s": round(output_tokens / seconds, 3),
            "ttft_ms": latency_ms([o.ttft for o in done if o.ttft is not None]),
            "tpot_ms": latency_ms([o.tpot for o in done if o.tpot is not None]),
            "first_error": failed[0].error if failed else None}


def latency_ms(seconds: list[float]) -> dict | None:
    """Mean, median and 99th percentile in milliseconds (None without samples)."""
    if not seconds:
        return None
    ms = sorted(s * 1000 for s in seconds)
    return {"mean": round(sum(ms) / len(ms), 3), "p50": round(percentile(ms, 50), 3),
            "p99": round(percentile(ms, 99), 3)}


def percentile(ordered: list[float], q: float) -> float:
    """The q-th percentile of sorted values, interpolated between neighbours (as numpy's default)."""
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def format_bench_serve(result: dict) -> str:
    lines = [f"{result['model']} at {result['url']}, {result['clients']} clients",
             (f"completed     {result['completed']} requests ({result['failures']} failed) in "
              f"{result['seconds']:.2f} s: {result['requests_per_s']:.2f} requests/s"),
             (f"tokens        {result['prompt_tokens']} prompt, {result['output_tokens']} output: "
              f"{result['output_tokens_per_s']:.1f} output tokens/s")]
    for name, why_none in (("ttft", "no request streamed a token"),
                           ("tpot", "no request streamed a token and more than one token")):
        stats = result[f"{name}_ms"]
        shown = f"none ({why_none})" if stats is None else \
            "   ".join(f"{k} {stats[k]:.1f} ms" for k in ("mean", "p50", "p99"))
        lines.append(f"{name.upper():<13} {shown}")
    if result["first_error"]:
        lines.append(f"first error   {result['first_error']}")
    return "\n".join(lines)


def _error_message(r: httpx.Response) -> str:
    try:
        return _error_text(r.json())
    except ValueError:
        return _one_line(r.text[:200]) or r.reason_phrase


def _error_text(body) -> str:
    """The message of OpenAI's error shape, or the body itself."""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return _one_line(message if isinstance(message, str) else json.dumps(body)[:200])


def _one_line(e) -> str:
    return " ".join(str(e).split())
