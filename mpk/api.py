"""The Python API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`.

An `LLM` loads and fuses the weights once, and keeps one compiled graph with its executor per
batch size (all of the same `max_seq_len`), so later calls reuse them: new prompts only rewrite
the meta tensors. Each sequence stops at the checkpoint's EOS ids, at `max_tokens`, or at a stop
string (its text is cut before the stop string).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Sequence

from mpk.errors import MpkError

BACKENDS = ("auto", "cuda", "sim")


@dataclass
class SamplingParams:
    """How to pick each new token, and when to stop. temperature 0 is greedy; top_k 0 (or -1) and
    top_p 1 keep every token; seed None draws one per call."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if not self.temperature >= 0:
            raise MpkError(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MpkError(f"top_p must be in (0, 1], not {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise MpkError(f"top_k must be an integer, 0 or -1 for all tokens, not {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise MpkError(f"max_tokens must be at least 1, not {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise MpkError("stop must be a non-empty string or a list of them")

    def run_seed(self) -> int:
        """The seed of one run: the one given, or a fresh one."""
        return self.seed if self.seed is not None else random.getrandbits(63)

    def sample_row(self, seed: int) -> tuple[float, int, float, int]:
        """The sample op's per-sequence parameters (`mpk.inputs.sampling_meta`): temperature, top_k
        (0 for all), top_p, seed."""
        return (self.temperature, max(self.top_k, 0), self.top_p, seed)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS or a stop string) or "length" (max_tokens)


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


@dataclass
class RunStats:
    """What the last `generate` call ran: for the command line's summary."""

    steps: int  # decode steps
    seconds: float
    tasks_per_step: int
    prefilled: int = 0  # positions the prefill filled before the decode steps


class LLM:
    """A model ready to generate: `LLM("qwen3-0.6b", backend="sim").generate(["the cat"], params)`.

    `backend` "auto" runs the GPU megakernel when a GPU is present and the CPU executor otherwise;
    `dtype` is the weights' dtype (default: bfloat16, or float32 on the CPU executor); `device` a
    CUDA device for the megakernel (`tp_size` > 1: GPUs 0..tp_size-1). `max_seq_len` is clipped to
    the model's context. `prefill` runs the prompts' first positions at once (`mpk.prefill`: on the
    GPU op by op in PyTorch, on the CPU as task graphs) instead of one decode step each.
    `activations`, `kv_cache` and `matmul_inputs` are the precisions of `mpk.graph.precision_of`.
    `kv_block_rows` > 0 pages the KV cache (`mpk.paging`): `kv_blocks` blocks of that many rows per
    cache tensor (default: as many as max_batch sequences of max_seq_len fill), handed to sequences
    as they grow.
    """

    def __init__(self, model: str, *, max_batch: int = 8, max_seq_len: int = 4096, backend: str = "auto",
                 dtype: str | None = None, device=None, tp_size: int = 1, num_sms: int | None = None,
                 activations: str | None = None, kv_cache: str | None = None, matmul_inputs: str | None = None,
                 kv_block_rows: int = 0, kv_blocks: int | None = None, seed: int = 0,
                 weights: dict | None = None, load_progress: Callable[[int], None] | None = None,
                 prefill: bool = True):
        import torch

        from mpk.dtypes import torch_dtype
        from mpk.engine import SUPPORTED_DTYPES
        from mpk.graph import DEFAULT_ACTIVATIONS, DEFAULT_KV_CACHE, DEFAULT_MATMUL_INPUTS, MAX_BATCH, matmul_inputs_for
        from mpk.inputs import fuse_weights
        from mpk.models import resolve_model

        if backend not in BACKENDS:
            raise MpkError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if not 1 <= max_batch <= MAX_BATCH:
            raise MpkError(f"max_batch must be between 1 and {MAX_BATCH}, not {max_batch}")
        if max_seq_len < 1:
            raise MpkError(f"max_seq_len must be at least 1, not {max_seq_len}")
        if kv_block_rows < 0 or (kv_blocks is not None and (kv_block_rows == 0 or kv_blocks < 2)):
            raise MpkError(f"a paged KV cache takes kv_block_rows >= 1 and kv_blocks >= 2 (one is scratch), not "
                           f"{kv_block_rows} and {kv_blocks}")
        self.backend = backend if backend != "auto" else "cuda" if torch.cuda.is_available() else "sim"
        self.dtype = dtype or ("bfloat16" if self.backend == "cuda" else "float32")
        if self.dtype not in SUPPORTED_DTYPES:
            raise MpkError(f"unsupported dtype {self.dtype!r}; choose one of {', '.join(SUPPORTED_DTYPES)}")
        if self.backend == "cuda" and self.dtype != "bfloat16":
            raise MpkError("the GPU megakernel runs bfloat16 weights; pass dtype='bfloat16' or backend='sim'")
        self.source = resolve_model(model)
        self.tokenizer = self._load_tokenizer()
        self.cfg = _with_tokenizer_eos(self.source.cfg, self.tokenizer)
        self.max_batch, self.max_seq_len = max_batch, min(max_seq_len, self.cfg.max_position_embeddings)
        self.tp_size, self.seed = tp_size, seed
        self.activations, self.kv_cache = activations or DEFAULT_ACTIVATIONS, kv_cache or DEFAULT_KV_CACHE
        # Resolved at max_batch, so that every executor of 1, 2, 4, ... slots computes alike: a request's
        # tokens do not depend on how many others run beside it.
        self.matmul_inputs = matmul_inputs_for(matmul_inputs or DEFAULT_MATMUL_INPUTS, self.activations, max_batch,
                                               self.dtype)
        if kv_block_rows:
            from mpk.paging import check_block_rows

            check_block_rows(kv_block_rows)
        self.kv_block_rows, self.kv_blocks = kv_block_rows, kv_blocks
        self.device = None
        if self.backend == "cuda":
            from mpk.runtime import rank_devices

            # One GPU per tensor-parallel rank: `device` for one rank, GPUs 0..tp_size-1 otherwise.
            devices = rank_devices(tp_size, device)
            self.device = devices[0] if tp_size == 1 else None
            if num_sms is None:
                num_sms = torch.cuda.get_device_properties(devices[0]).multi_processor_count
        self.num_sms = num_sms
        if weights is None:
            # With several ranks the weights are sliced on the host and each GPU gets its slice only.
            on_gpu = self.backend == "cuda" and tp_size == 1
            weights = self.source.load_weights(torch_dtype(self.dtype), device=self.device if on_gpu else "cpu",
                                               progress=load_progress)
        self._fused = fuse_weights(self.cfg, weights, tp_size, torch_dtype(self.dtype))
        self._executors: dict[tuple[int, int], object] = {}
        self._block_pools: dict[int, object] = {}  # slots -> the BlockPool of `_executor(slots)`'s paged cache
        # batch -> (start, rows) -> the prefill TaskGraph (CPU executor) or Program (GPU) of those positions
        self._prefills: dict[int, dict[tuple[int, int], object]] = {}
        self.prefill = prefill
        self.last_run: RunStats | None = None

    # --- generation --------------------------------------------------------------------------

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 on_text: Callable[[int, str], None] | None = None,
                 on_token: Callable[[int, int], None] | None = None,
                 cancel: threading.Event | None = None) -> list[RequestOutput]:
        """Complete each prompt (a string, or a list of token ids; or a list of those). More prompts
        than `max_batch` take turns in the slots of one batch (`mpk.batching`), each with the
        tokens it would get alone.

        `params` is one SamplingParams for all prompts or one per prompt. `on_text(i, delta)` gets
        each piece of prompt i's new text as soon as it is final (held back only while it could
        still be the start of a stop string). `on_token(i, token_id)` gets each new token of prompt i,
        before its text. Setting `cancel` (from another thread) ends the run after the current step;
        the outputs then hold what was generated so far, with finish_reason None where unfinished.
        """
        texts, ids = self._encode(prompts)
        params = self._params(params, len(ids))
        if len(ids) > self.max_batch:
            return self._generate_in_turns(texts, ids, params, on_text, on_token, cancel)
        seqs = [_Sequence(p, sp, self._decode, self._eos(sp)) for p, sp in zip(ids, params)]
        self._run(ids, params, seqs, on_text, cancel, on_token=on_token)
        return [RequestOutput(t, p, [CompletionOutput(0, s.text, s.token_ids, s.finish_reason)])
                for t, p, s in zip(texts, ids, seqs)]

    def generate_stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """The new text of one prompt, piece by piece as tokens arrive."""
        pieces: queue.Queue = queue.Queue()
        cancel = threading.Event()
        done = object()

        def work():
            try:
                self._run_one(prompt, params, lambda _, delta: pieces.put(delta), cancel)
                pieces.put(done)
            except BaseException as e:  # handed to the consumer, who raises it
                pieces.put(e)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            while (item := pieces.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                if item:
                    yield item
        finally:
            cancel.set()
            worker.join()

    def chat(self, messages: list[dict], params: SamplingParams | None = None,
             on_text: Callable[[int, str], None] | None = None) -> RequestOutput:
        """One assistant reply to `messages` ([{"role": ..., "content": ...}]), through the
        checkpoint's chat template."""
        from mpk.chat import render_chat

        if self.tokenizer is None:
            raise MpkError(f"{self.source.name} has no tokenizer, so it cannot chat")
        text = render_chat(self.tokenizer, messages)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        out = self.generate([ids], params, on_text)[0]
        out.prompt = text
        return out

    def close(self) -> None:
        """Release the executors (GPU buffers and kernels)."""
        for executor in self._executors.values():
            executor.close()
        self._executors.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------

    def _generate_in_turns(self, texts, ids, params, on_text, on_token, cancel) -> list[RequestOutput]:
        from mpk.batching import Batcher, Request

        batcher = Batcher(self)
        outs: list[RequestOutput | None] = [None] * len(ids)
        errors: list[BaseException] = []
        requests = []
        for i, (p, sp) in enumerate(zip(ids, params)):
            request = Request(p, sp, on_error=errors.append,
                              on_token=None if on_token is None else (lambda t, i=i: on_token(i, t)),
                              on_text=None if on_text is None else (lambda d, i=i: on_text(i, d)),
                              on_done=lambda out, i=i: outs.__setitem__(i, out))
            batcher.submit(request)
            requests.append(request)
        while batcher.run_window():
            if cancel is not None and cancel.is_set():
                for request in requests:
                    request.cancel.set()
        if errors:
            raise errors[0]
        return [RequestOutput(t, p, out.outputs) for t, p, out in zip(texts, ids, outs)]

    def _run_one(self, prompt, params, on_text, cancel: threading.Event) -> None:
        texts, ids = self._encode([prompt])
        params = self._params(params, 1)
        seqs = [_Sequence(ids[0], params[0], self._decode, self._eos(params[0]))]
        self._run(ids, params, seqs, on_text, cancel)

    def _run(self, ids: list[list[int]], params: list[SamplingParams], seqs: list["_Sequence"], on_text,
             cancel: threading.Event | None = None, on_token=None) -> None:
        from mpk.inputs import program_meta

        if any(sp.stop for sp in params) and self.tokenizer is None:
            raise MpkError(f"stop strings need a tokenizer, and {self.source.name} has none")
        self._check_fits(ids, params)
        steps = max(len(p) + sp.max_tokens - 1 for p, sp in zip(ids, params))
        sampling = [sp.sample_row(sp.run_seed()) for sp in params]
        tg, executor = self._executor(len(ids))
        meta = program_meta(tg, ids, sampling)

        token_to = [None if on_token is None else partial(on_token, s) for s in range(len(seqs))]
        text_to = [None if on_text is None else partial(on_text, s) for s in range(len(seqs))]

        def on_step(step: int, tokens: list[int]) -> bool:
            for s, seq in enumerate(seqs):
                if seq.finish_reason is None and step >= len(ids[s]) - 1:
                    seq.take(tokens[s], token_to[s], text_to[s])
            return all(seq.finish_reason is not None for seq in seqs) or (cancel is not None and cancel.is_set())

        t0 = time.perf_counter()
        executor.set_meta(meta)
        pool = self._block_pools.get(tg.batch)
        try:
            if pool is not None:  # every row the run may write, for each of its sequences
                for slot in range(tg.batch):
                    pool.grow(slot, steps)
                executor.set_kv_table(pool.table())
            first = self._prefill(tg, executor, ids)
            result = executor.run(steps - first, max_new_tokens=[sp.max_tokens for sp in params], on_step=on_step,
                                  first_step=first, eos_token_ids=sorted(set.intersection(*(seq.eos for seq in seqs))))
        finally:
            if pool is not None:
                for slot in range(tg.batch):
                    pool.release(slot)
        self.last_run = RunStats(result.steps, time.perf_counter() - t0, len(tg.tasks), first)

    def _prefill(self, tg, executor, ids: list[list[int]]) -> int:
        """Fill the KV cache of the positions every prompt has before its last token and return the
        decode step that continues after them (0: none). On the GPU op by op in PyTorch over the
        megakernel's buffers (`mpk.prefill.prefill_ops`); on the CPU executor as verified task
        graphs, a chunk at a time (`mpk.prefill.chunks`)."""
        from mpk.prefill import chunks, compile_prefill, prefill_ops, prefill_rows, run_prefill

        if not self.prefill:
            return 0
        made = self._prefills.setdefault(tg.batch, {})
        if self.backend == "cuda":
            return prefill_ops(executor, self.cfg, ids, programs=made)
        done = 0
        for start, rows in chunks(prefill_rows(ids)):
            if (start, rows) not in made:
                made[start, rows] = compile_prefill(tg, self.cfg, rows, start=start)
            run_prefill(made[start, rows], executor.buffers, ids, self.seed, executor.kv_table)
            done = start + rows
        if done:
            executor.set_tokens([p[done] for p in ids])
        return done

    def _executor(self, batch: int):
        """The compiled graph and open executor for `batch` sequences, made on first use."""
        key = (batch, self.max_seq_len)
        if key not in self._executors:
            from mpk.engine import open_executor
            from mpk.inputs import program_inputs

            tg = self._compile(batch)
            weights, meta = program_inputs(self.cfg, tg, self._fused, [[0]] * batch)
            pages = self._kv_pages(batch)
            self._executors[key] = open_executor(self.backend, tg, weights, meta, device=self.device, seed=self.seed,
                                                 kv_pages=pages)
            if pages is not None:
                from mpk.paging import BlockPool

                self._block_pools[batch] = BlockPool(pages.num_blocks, pages.block_rows, batch, self.max_seq_len)
        executor = self._executors[key]
        return executor.tg, executor

    def _kv_pages(self, slots: int):
        """How an executor of `slots` sequences stores its KV cache: None (contiguous) or its pools."""
        if not self.kv_block_rows:
            return None
        from mpk.paging import KvPages

        if self.kv_blocks:
            return KvPages(self.kv_blocks, self.kv_block_rows)
        return KvPages.full(slots, self.max_seq_len, self.kv_block_rows)

    def _block_pool(self, slots: int):
        """The BlockPool of `_executor(slots)`'s paged KV cache, or None."""
        self._executor(slots)
        return self._block_pools.get(slots)

    def _slots_executor(self, slots: int, batch: int):
        """An executor for the first `batch` of the `slots` sequence slots of `_executor(slots)`: the
        same weights and KV cache (its first `batch` slots), its own inputs and activations. A batch
        of few requests then runs a kernel of its size (`mpk.batching`)."""
        home_tg, home = self._executor(slots)
        if batch == slots:
            return home_tg, home
        key = ("slots", slots, batch, self.max_seq_len)
        if key not in self._executors:
            from mpk.engine import open_executor
            from mpk.execution import slot_buffers

            tg = self._compile(batch)
            self._executors[key] = open_executor(self.backend, tg, {}, {}, device=self.device, seed=self.seed,
                                                 buffers=slot_buffers(tg, home.buffers, home.kv_pages),
                                                 kv_pages=home.kv_pages)
        executor = self._executors[key]
        return executor.tg, executor

    def _build_kernels(self, slots: int, sizes) -> None:
        """On the GPU: build the megakernels of the executors of `_slots_executor(slots, b)` for the
        sizes b not open yet, side by side, so that opening them finds them built."""
        missing = [b for b in sizes if b != slots and ("slots", slots, b, self.max_seq_len) not in self._executors]
        if self.backend != "cuda" or not missing:
            return
        import torch

        from mpk.codegen import generate_source
        from mpk.runtime.build import arch_for_capability, build_all

        props = torch.cuda.get_device_properties(self.device if self.device is not None else 0)
        build_all([generate_source(self._compile(b)) for b in missing], arch_for_capability(props.major, props.minor))

    def _compile(self, batch: int):
        from mpk import defaults
        from mpk.compiler import compile_model

        return compile_model(self.cfg, batch=batch, max_seq_len=self.max_seq_len, tp_size=self.tp_size,
                             num_sms=defaults.SIM_NUM_SMS if self.num_sms is None else self.num_sms,
                             activations=self.activations, weights=self.dtype, kv_cache=self.kv_cache,
                             matmul_inputs=self.matmul_inputs)

    def _encode(self, prompts) -> tuple[list[str | None], list[list[int]]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise MpkError("no prompts given")
        texts, ids = [], []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise MpkError(f"{self.source.name} has no tokenizer; pass prompts as lists of token ids")
                texts.append(p)
                ids.append(self.tokenizer.encode(p))
            else:
                texts.append(None)
                ids.append([int(t) for t in p])
        for p in ids:
            if not p:
                raise MpkError("every prompt needs at least one token")
            bad = [t for t in p if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise MpkError(f"token id {bad[0]} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        return texts, ids

    def _params(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        params = [params] * n if isinstance(params, SamplingParams) else list(params)
        if len(params) != n:
            raise MpkError(f"{len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
        return params

    def _check_fits(self, ids, params) -> None:
        for p, sp in zip(ids, params):
            if len(p) + sp.max_tokens - 1 > self.max_seq_len:
                raise MpkError(f"a prompt of {len(p)} tokens plus max_tokens={sp.max_tokens} exceeds "
                               f"max_seq_len={self.max_seq_len}; shorten the prompt or lower max_tokens")

    def _eos(self, sp: SamplingParams) -> set[int]:
        return set() if sp.ignore_eos else set(self.cfg.eos_token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _load_tokenizer(self):
        """The checkpoint's tokenizer; one that cannot be used only costs the text (token ids still work)."""
        try:
            return self.source.tokenizer()
        except MpkError:
            return None


class _Sequence:
    """One sequence's new tokens and text, and why it finished."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, decode, eos: set[int]):
        from mpk.detokenize import IncrementalDetokenizer

        self.params, self.eos = params, eos
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._detok = IncrementalDetokenizer(decode, prompt_ids)
        self._hold = max((len(s) for s in params.stop), default=1) - 1  # text that may start a stop string
        self._sent = 0
        self._cut = False  # the text ended at a stop string

    def take(self, token: int, on_token=None, on_text=None) -> None:
        """Add a new token, then tell `on_token(token)`, and `on_text(delta)` if text became final."""
        self.add(token)
        if on_token is not None:
            on_token(token)
        delta = self.delta()
        if delta and on_text is not None:
            on_text(delta)

    def add(self, token: int) -> None:
        self.token_ids.append(token)
        if token in self.eos:
            self.finish_reason = "stop"
        else:
            self._append(self._detok.push(token))
        if self.finish_reason is None and len(self.token_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self._append(self._detok.flush())

    def delta(self) -> str:
        """New text that no later token can change."""
        end = len(self.text) if self.finish_reason else max(self._sent, len(self.text) - self._hold)
        piece, self._sent = self.text[self._sent:end], end
        return piece

    def _append(self, piece: str) -> None:
        if not piece or self._cut:
            return
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason, self._cut = "stop", True


def _with_tokenizer_eos(cfg, tokenizer):
    """A checkpoint whose config files name no end-of-sequence token stops at its tokenizer's."""
    import dataclasses

    if cfg.eos_token_ids or tokenizer is None or tokenizer.eos_token_id is None:
        return cfg
    return dataclasses.replace(cfg, eos_token_ids=(tokenizer.eos_token_id,))
