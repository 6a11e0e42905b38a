"""The HTTP routes: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health and /metrics.

Handlers check and encode a request on the event loop, then hand it to the engine thread
(`worker.py`) and await its events; so a bad request is answered at once, whatever is running.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mpk.api import LLM, SamplingParams
from mpk.batching import DEFAULT_PREFILL_ROWS
from mpk.errors import MpkError
from mpk.serve.errors import ApiError, from_validation, invalid
from mpk.serve.metrics import Metrics
from mpk.serve.protocol import ChatRequest, CompletionRequest, unsupported_parameter
from mpk.serve.worker import EngineWorker, Job, QueueFull

GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


def create_app(llm: LLM, model_name: str, max_waiting: int = 64, prefill_rows: int = DEFAULT_PREFILL_ROWS) -> FastAPI:
    """An app serving `llm` under `model_name`; at most `max_waiting` requests wait for the engine, and
    with a paged cache each window prefills at most `prefill_rows` prompt rows (`mpk.batching`)."""
    worker = EngineWorker(llm, max_waiting, prefill_rows=prefill_rows)

    @asynccontextmanager
    async def lifespan(_):
        yield
        worker.stop()

    app = FastAPI(title="mpk", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = Metrics(worker)
    app.state.worker, app.state.metrics = worker, metrics
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        return from_validation(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _server_error(_, exc: Exception):
        return ApiError(500, f"internal error: {exc}", type="server_error").response()

    @app.middleware("http")
    async def _count_requests(request: Request, call_next):
        response = await call_next(request)
        if request.url.path in GENERATION_ENDPOINTS:
            metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mpk", "max_model_len": llm.max_seq_len}]}

    def admit(req, ids: list[int], max_tokens: int | None) -> Job:
        """Check what the engine cannot do, and queue the job; `max_tokens` None: the rest of the context."""
        if req.model != model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if (name := unsupported_parameter(req)) is not None:
            raise invalid(f"unsupported parameter: {name} (this server supports n=1 and no {name})",
                          param=name, code="unsupported_parameter")
        room = llm.max_seq_len - len(ids) + 1  # the last new token needs no cache slot
        if max_tokens is None:
            max_tokens = room
        if len(ids) > llm.max_seq_len or max_tokens > room:
            raise invalid(f"this model's context is {llm.max_seq_len} tokens; the prompt has {len(ids)} and "
                          f"max_tokens={max_tokens} asks for {max_tokens} more", code="context_length_exceeded",
                          param="messages" if isinstance(req, ChatRequest) else "prompt")
        try:
            params = SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                                    top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k,
                                    max_tokens=max_tokens, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos)
        except MpkError as e:
            raise invalid(str(e)) from None
        if params.stop and llm.tokenizer is None:
            raise invalid("stop strings need a tokenizer, and this model has none", param="stop")
        job = Job(ids, params, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except MpkError as e:
            raise invalid(str(e)) from None
        except QueueFull:
            raise ApiError(503, "the server is busy: too many requests are waiting; retry later",
                           type="server_overloaded", code="queue_full") from None
        return job

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        arrived = time.perf_counter()
        ids = encode_prompt(llm, req.prompt)
        job = admit(req, ids, req.max_tokens or DEFAULT_COMPLETION_TOKENS)
        reply = Reply("cmpl", "text_completion", model_name, len(ids))
        if req.stream:
            return stream(job, arrived, reply.completion_chunk, reply, req)
        out = await finish(job, arrived)
        return reply.completion(out)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        from mpk.chat import render_chat

        arrived = time.perf_counter()
        if llm.tokenizer is None:
            raise invalid("this model has no tokenizer, so it cannot chat", param="messages")
        try:
            text = render_chat(llm.tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
        except MpkError as e:
            raise invalid(str(e), param="messages") from None
        ids = llm.tokenizer.encode(text, add_special_tokens=False)  # as LLM.chat encodes it
        job = admit(req, ids, req.max_completion_tokens or req.max_tokens)
        reply = Reply("chatcmpl", "chat.completion", model_name, len(ids))
        if req.stream:
            return stream(job, arrived, reply.chat_chunk, reply, req)
        out = await finish(job, arrived)
        return reply.chat(out)

    async def finish(job: Job, arrived: float):
        try:
            return await job.result()
        except MpkError as e:
            raise invalid(str(e)) from None
        finally:
            job.cancel.set()  # no-op once done; stops the run if this handler was cancelled
            metrics.observe_generation(arrived, len(job.prompt_ids), job.token_times)

    def stream(job: Job, arrived: float, chunk, reply: "Reply", req) -> StreamingResponse:
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        # One chunk per new token, carrying the text that token made final ("" while text is held
        # back, or without a tokenizer), so a client sees every token arrive.
        async def events():
            try:
                if reply.object == "chat.completion":
                    yield sse(chunk(first=True))  # the assistant's role, as OpenAI's first chat chunk
                unsent = False  # a token arrived whose chunk is not out yet
                while True:
                    kind, value = await job.next_event()
                    if kind == "token":
                        if unsent:
                            yield sse(chunk(text="", token=True))
                        unsent = True
                    elif kind == "text":
                        yield sse(chunk(text=value, token=True))
                        unsent = False
                    elif kind == "done":
                        if unsent:
                            yield sse(chunk(text="", token=True))
                        yield sse(chunk(finish_reason=value.outputs[0].finish_reason))
                        if include_usage:
                            yield sse(reply.usage_chunk(value))
                        break
                    else:
                        status = 400 if isinstance(value, MpkError) else 500
                        yield sse(ApiError(status, str(value), type="invalid_request_error" if status == 400
                                           else "server_error").body())
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()  # a client that disconnects stops its generation
                metrics.observe_generation(arrived, len(job.prompt_ids), job.token_times)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def encode_prompt(llm: LLM, prompt) -> list[int]:
    """One prompt (text or token ids) as token ids; a batch of more than one is refused."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise invalid("one prompt per request (this server does not batch prompts yet)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if llm.tokenizer is None:
            raise invalid("this model has no tokenizer; send the prompt as token ids", param="prompt")
        ids = llm.tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < llm.cfg.vocab_size]
        if bad:
            raise invalid(f"token id {bad[0]} is outside the vocabulary (0..{llm.cfg.vocab_size - 1})", param="prompt")
    if not ids:
        raise invalid("the prompt is empty", param="prompt")
    return ids


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Reply:
    """The JSON bodies of one request's response, or of its stream's chunks."""

    def __init__(self, prefix: str, object: str, model: str, prompt_tokens: int):
        self.id, self.object, self.model = f"{prefix}-{uuid.uuid4().hex}", object, model
        self.created, self.prompt_tokens = int(time.time()), prompt_tokens

    def _head(self, object: str) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}

    def usage(self, out) -> dict:
        n = len(out.outputs[0].token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def completion(self, out) -> dict:
        o = out.outputs[0]
        return {**self._head("text_completion"), "usage": self.usage(out),
                "choices": [{"index": 0, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}]}

    def chat(self, out) -> dict:
        o = out.outputs[0]
        return {**self._head("chat.completion"), "usage": self.usage(out),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": o.text},
                             "logprobs": None, "finish_reason": o.finish_reason}]}

    def completion_chunk(self, text: str = "", finish_reason: str | None = None, first: bool = False,
                         token: bool = False) -> dict:
        return {**self._head("text_completion"),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

    def chat_chunk(self, text: str = "", finish_reason: str | None = None, first: bool = False,
                   token: bool = False) -> dict:
        delta = {"role": "assistant", "content": ""} if first else {"content": text} if text or token else {}
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def usage_chunk(self, out) -> dict:
        object = "chat.completion.chunk" if self.object == "chat.completion" else "text_completion"
        return {**self._head(object), "choices": [], "usage": self.usage(out)}
