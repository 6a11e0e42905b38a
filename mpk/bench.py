"""`mpk bench`: mpk against its baselines, in one process on one GPU, on the same weights.

Rows: a streaming-read kernel (the measured bandwidth ceiling), the mpk megakernel (all steps in
one launch), PyTorch eager and PyTorch under torch.compile(mode="reduce-overhead") (CUDA graphs),
both on `mpk.models.reference`. A decode step reads the weights plus the KV rows up to its position,
so effective GB/s = bytes per step / time per step, and the floor is those bytes at the streaming
kernel's bandwidth. `context` N starts the timed steps at position N with the cache filled (random
values: the time does not depend on them), and every row counts the KV bytes of its own cache dtype.

`sampling` makes mpk sample each token in the kernel (the greedy default reads the LM head's argmax
candidates only). With tensor parallelism `tp` N, the mpk row runs on one GPU and an `mpk-tpN` row runs the same
weights over N GPUs; its bytes and floor are those of the busiest GPU (its shard of the weights
and of the KV heads), at the streaming bandwidth measured on GPU 0.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mpk.dtypes import dtype
from mpk.errors import MpkError
from mpk.graph import DEFAULT_ACTIVATIONS, DEFAULT_KV_CACHE, DEFAULT_MATMUL_INPUTS, EMBED, ROPE

STREAM_SOURCE = Path(__file__).resolve().parent / "csrc" / "stream_read.cu"


@dataclass
class Row:
    name: str
    ms_per_step: float
    batch: int
    bytes_per_step: int
    floor_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.batch * 1e3 / self.ms_per_step

    @property
    def gbps(self) -> float:
        return self.bytes_per_step / self.ms_per_step / 1e6

    @property
    def pct_of_floor(self) -> float:
        return 100.0 * self.floor_ms / self.ms_per_step

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "gbps": self.gbps, "pct_of_floor": self.pct_of_floor}


def weight_bytes_per_step(tg, rank: int | None = None) -> int:
    """Bytes of weights one decode step reads (of every rank, or of `rank`): every weight once, but
    only B rows of the embedding table."""
    total = 0
    for spec in tg.tensors.values():
        base = spec.name.rsplit("/", 1)[-1]
        if spec.kind != "weight" or base == ROPE or rank not in (None, spec.rank):
            continue
        n = dtype(spec.dtype).bytes
        for d in spec.shape:
            n *= d
        if base == EMBED:
            n = n // spec.shape[0] * tg.batch
        total += n
    return total


def kv_rows_per_step(context: int, steps: int, window: int | None) -> float:
    """K/V rows of one sequence and layer a step touches, averaged over positions [context, context + steps):
    the rows it reads up to its position (a sliding window caps them) plus the one it appends."""
    return sum(min(p + 1, window or p + 1) for p in range(context, context + steps)) / steps


def kv_bytes_per_step(cfg, batch: int, context: int, steps: int, kv_dtype: str) -> int:
    """KV cache bytes one decode step moves, averaged over the timed steps (K and V, every layer)."""
    row = 2 * batch * cfg.num_kv_heads * cfg.head_dim * dtype(kv_dtype).bytes
    return round(cfg.num_layers * row * kv_rows_per_step(context, steps, cfg.sliding_window))


def stream_read_gbps(device: torch.device, nbytes: int, num_sms: int, repeats: int = 10) -> float:
    """Read bandwidth of the bulk-copy streaming kernel over a buffer of about `nbytes` (median of repeats)."""
    from mpk.runtime.build import arch_for_capability, build

    props = torch.cuda.get_device_properties(device)
    lib = ctypes.CDLL(str(build(STREAM_SOURCE.read_text(), arch_for_capability(props.major, props.minor))))
    lib.mpk_stream_read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    chunk = lib.mpk_stream_read_chunk_bytes()
    chunks = max(num_sms * 8, nbytes // chunk)
    buf = torch.empty(chunks * chunk, dtype=torch.uint8, device=device)
    buf.random_(0, 255)
    checksum = torch.zeros(1, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream

    def once() -> None:
        rc = lib.mpk_stream_read(buf.data_ptr(), chunks, num_sms, checksum.data_ptr(), stream)
        if rc != 0:
            raise MpkError(f"the streaming-read kernel failed to launch (CUDA error {rc})")

    once()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return buf.numel() / statistics.median(times) / 1e9


def time_torch(model, batch: int, steps: int, compiled: bool, context: int = 0) -> float:
    """Seconds per decode step of the reference model at positions [context, context + steps), greedy
    tokens fed back on the GPU. Its cache has a fixed length and every step reads all of it."""
    device = model.device
    length = context + steps + 8
    model.reset(batch, length)
    step = model.decode_step
    if compiled:
        step = torch.compile(model.decode_step, mode="reduce-overhead", fullgraph=True)
    positions = torch.arange(length, device=device)
    token = torch.ones(batch, dtype=torch.long, device=device)

    def run(n: int) -> torch.Tensor:
        tok = token
        for s in range(context, context + n):
            pos = positions[s].expand(batch).clone() if compiled else s
            tok = step(tok, pos).argmax(-1)
        return tok

    run(4)  # warm-up: compilation, graph capture, allocator
    torch.cuda.synchronize(device)
    model.reset(batch, length)
    t0 = time.perf_counter()
    run(steps)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def rank_bytes_per_step(tg, nbytes: int) -> int:
    """The busiest rank's share of a step's `nbytes` (weights and KV), in proportion to its weights."""
    if tg.tp_size == 1:
        return nbytes
    whole = weight_bytes_per_step(tg)
    return max(round(nbytes * weight_bytes_per_step(tg, rank) / whole) for rank in range(tg.tp_size))


def fill_kv_cache(kernel, seed: int = 0) -> None:
    """Random values in every KV cache buffer of a loaded megakernel, standing in for a prompt's rows."""
    for name, spec in kernel.tg.tensors.items():
        if spec.kind == "state":
            buf = kernel.buffers[name]
            gen = torch.Generator(device=buf.device).manual_seed(seed)
            buf.copy_(torch.randn(buf.shape, generator=gen, device=buf.device))


def interleaved_kv_pages(tg, block_rows: int):
    """A paged cache for `tg` and its block table, each sequence's blocks interleaved with the others'
    as sequences that grow together get them: block i of sequence b is 1 + i * batch + b (block 0 is
    the scratch block)."""
    from mpk.paging import KvPages

    pages = KvPages.full(tg.batch, tg.max_seq_len, block_rows)
    batch, per_seq = pages.table_shape(tg)
    table = 1 + torch.arange(per_seq, dtype=torch.int32)[None, :] * batch + torch.arange(batch, dtype=torch.int32)[:, None]
    return pages, table


def time_mpk(tg, fused: dict, meta: dict, steps: int, device, profile: str | None = None,
             context: int = 0, kv_block_rows: int = 0) -> tuple[float, dict | None]:
    """Seconds per decode step of the megakernel (all `steps` steps in one launch, starting at position
    `context` over a filled cache, paged in blocks of `kv_block_rows` rows if not 0), and with
    `profile` the summary of a traced run whose per-SM task spans are written there. The traced run
    is a second kernel's, built with the marks inside each task; the timed kernel has none."""
    with _bench_kernel(tg, fused, meta, device, kv_block_rows, steps, context) as kernel:
        for d in kernel.devices:
            torch.cuda.synchronize(d)
        t0 = time.perf_counter()
        result = kernel.run(steps, max_new_tokens=None, first_step=context, eos_token_ids=[])
        seconds = time.perf_counter() - t0
        if result.steps != steps:
            raise MpkError(f"the megakernel ran {result.steps} of {steps} steps with nothing to stop it "
                           f"({kernel.stop_state()}); please report this with the command that showed it")
    summary = None
    if profile:
        from mpk.profile import summarize_trace, write_trace

        with _bench_kernel(tg, fused, meta, device, kv_block_rows, steps, context, task_marks=True) as kernel:
            traced = kernel.run(steps, max_new_tokens=None, first_step=context, eos_token_ids=[], trace=True)
        write_trace(profile, tg, traced.trace)
        summary = summarize_trace(tg, traced.trace, traced.marks) if traced.steps > 1 else None
    return seconds / steps, summary


def _bench_kernel(tg, fused: dict, meta: dict, device, kv_block_rows: int, steps: int, context: int,
                  task_marks: bool = False):
    """A megakernel over `tg` with a filled KV cache (paged in blocks of `kv_block_rows` rows if not 0),
    warmed up over up to `steps` steps from `context` and set back to the first token."""
    from mpk.runtime import Megakernel

    pages, table = interleaved_kv_pages(tg, kv_block_rows) if kv_block_rows else (None, None)
    kernel = Megakernel(tg, device=device if tg.tp_size == 1 else None, weights=fused, meta=meta,
                        kv_pages=pages, task_marks=task_marks)
    try:
        if pages is not None:
            kernel.set_kv_table(table)
        fill_kv_cache(kernel)
        # A timed run goes all its steps: a random model's greedy tokens may hit an end-of-sequence id.
        kernel.run(min(steps, 8), max_new_tokens=None, first_step=context, eos_token_ids=[])  # warm-up
        kernel.set_meta(meta)  # back to the first token; the KV rows are rewritten as the steps go
    except BaseException:
        kernel.close()
        raise
    return kernel


def run_bench(model: str, batch: int = 1, steps: int = 128, backends=("stream", "mpk", "eager", "compile"),
              profile: str | None = None, activations: str = DEFAULT_ACTIVATIONS, kv_cache: str = DEFAULT_KV_CACHE,
              context: int = 0, tp: int = 1, sampling: tuple[float, int, float] | None = None,
              matmul_inputs: str = DEFAULT_MATMUL_INPUTS, kv_block_rows: int = 0, max_seq_len: int | None = None) -> dict:
    """`sampling` (temperature, top_k, top_p) makes the mpk rows sample every token in the kernel
    (seeded per sequence) instead of taking the greedy one; the torch baselines stay greedy.
    `kv_block_rows` pages the mpk rows' KV cache (`interleaved_kv_pages`). `max_seq_len` sizes the
    mpk graph's context as a run of that length does (its attention splits); by default it is
    what the timed steps reach."""
    from mpk import memory
    from mpk.compiler import compile_model
    from mpk.models import resolve_model
    from mpk.runtime import cuda_device, rank_devices

    device = cuda_device()
    devices = rank_devices(tp) if tp > 1 else [device]
    props = torch.cuda.get_device_properties(device)
    source = resolve_model(model)
    cfg = source.cfg
    if context < 0:
        raise MpkError(f"--context must be at least 0, not {context}")
    seq_len = bench_seq_len(context, steps, max_seq_len)

    def graph(tp_size: int):
        return compile_model(cfg, batch=batch, max_seq_len=seq_len, tp_size=tp_size,
                             num_sms=props.multi_processor_count, activations=activations, kv_cache=kv_cache,
                             matmul_inputs=matmul_inputs)

    tg = graph(1)
    weight_bytes = weight_bytes_per_step(tg)
    # Each row's bytes: the weights plus the KV rows in its own cache dtype (the torch baselines keep bf16).
    nbytes = weight_bytes + kv_bytes_per_step(cfg, batch, context, steps, tg.precision.kv_cache)
    torch_bytes = weight_bytes + kv_bytes_per_step(cfg, batch, context, steps, "bfloat16")
    need = memory.estimate(cfg, batch=batch, max_seq_len=tg.max_seq_len,
                           activation_bytes=4 if activations == "float32" else 2,
                           kv_bytes=dtype(tg.precision.kv_cache).bytes, device="GPU memory")
    fits_one_gpu = need.total <= memory.available_gpu_bytes(device)
    # A preset's weights are random: the mpk rows make theirs in place on each GPU, so a model larger
    # than one GPU never passes through one. The torch baselines need the checkpoint's layout.
    hf = None
    if source.path is not None or {"eager", "compile"} & set(backends):
        hf = source.load_weights(torch.bfloat16, device=device)

    seconds: dict[str, tuple[float, int]] = {}
    skipped: dict[str, str] = {}
    gbps, traced = None, None
    if "stream" in backends:
        gbps = stream_read_gbps(device, min(max(nbytes, 1 << 30), 4 << 30), props.multi_processor_count)
        seconds["stream-read"] = nbytes / (gbps * 1e9), nbytes
    if "mpk" in backends and not fits_one_gpu:
        skipped["mpk"] = f"needs about {memory.gib(need.total)} of GPU memory, more than one GPU has free"
    elif "mpk" in backends:
        weights, meta = _mpk_inputs(cfg, tg, hf, [device], sampling)
        mpk_seconds, traced = time_mpk(tg, weights, meta, steps, device, profile if tp == 1 else None, context,
                                       kv_block_rows)
        seconds["mpk"] = mpk_seconds, nbytes
        del weights
    if "mpk" in backends and tp > 1:
        tg_tp = graph(tp)
        weights, meta = _mpk_inputs(cfg, tg_tp, hf, devices, sampling)
        mpk_seconds, traced = time_mpk(tg_tp, weights, meta, steps, None, profile, context, kv_block_rows)
        seconds[f"mpk-tp{tp}"] = mpk_seconds, rank_bytes_per_step(tg_tp, nbytes)
        del weights
    if hf is not None and ("eager" in backends or "compile" in backends):
        from mpk.models.reference import ReferenceModel

        ref = ReferenceModel(cfg, hf, torch.bfloat16, device)
        if "eager" in backends:
            seconds["torch-eager"] = time_torch(ref, batch, steps, False, context), torch_bytes
        if "compile" in backends:
            seconds["torch-compile"] = time_torch(ref, batch, steps, True, context), torch_bytes
    rows = [Row(name, sec * 1e3, batch, n, n / (gbps * 1e9) * 1e3 if gbps else float("nan"))
            for name, (sec, n) in seconds.items()]
    return {
        "model": source.name, "gpu": props.name, "num_sms": props.multi_processor_count, "batch": batch, "tp": tp,
        **({"sampling": dict(zip(("temperature", "top_k", "top_p"), sampling))} if sampling else {}),
        "activations": activations, "kv_cache": tg.precision.kv_cache, "matmul_inputs": tg.precision.matmul_inputs,
        "context": context, "max_seq_len": seq_len, **({"kv_block_rows": kv_block_rows} if kv_block_rows else {}),
        "steps": steps, "bytes_per_step": nbytes, "kv_bytes_per_step": nbytes - weight_bytes, "stream_read_gbps": gbps,
        "rows": [r.as_dict() for r in rows],
        **({"skipped": skipped} if skipped else {}),
        **({"profile": traced} if traced else {}),
    }


def bench_seq_len(context: int, steps: int, max_seq_len: int | None) -> int:
    """The context length of the bench's graph: `max_seq_len`, or what the timed steps reach."""
    need = context + steps + 8
    if max_seq_len is None:
        return need
    if max_seq_len < need:
        raise MpkError(f"--max-seq-len {max_seq_len} is shorter than the bench's {need} positions (--context "
                       f"{context} + --steps {steps} + 8); raise it or time fewer steps")
    return max_seq_len


def _mpk_inputs(cfg, tg, hf: dict | None, devices: list, sampling=None) -> tuple[dict, dict]:
    """The megakernel's weights and meta: fused from `hf`, or random in place on each rank's GPU."""
    from mpk.inputs import fuse_weights, program_inputs, random_fused_weights

    fused = fuse_weights(cfg, hf, tg.tp_size, torch.bfloat16) if hf is not None else random_fused_weights(tg, devices)
    params = [(*sampling, b) for b in range(tg.batch)] if sampling else None
    return program_inputs(cfg, tg, fused, [[1]] * tg.batch, params)


def run_ttft_bench(model: str, batch: int, prompt_len: int, backends=("mpk", "eager"), repeats: int = 3) -> dict:
    """Time to first token for `batch` prompts of `prompt_len` random tokens: mpk (the prefill ops over
    positions [0, prompt_len - 1) on the megakernel's buffers, then one megakernel decode step, which
    makes the first token), mpk-graph (the same with the prefill as task graphs on the persistent
    runtime), against the PyTorch reference doing one batched forward pass with fused causal
    attention (SDPA) in bfloat16. Median of `repeats` runs after a warm-up."""
    from mpk.models import resolve_model
    from mpk.runtime import cuda_device

    device = cuda_device()
    props = torch.cuda.get_device_properties(device)
    source = resolve_model(model)
    cfg = source.cfg
    if not 1 <= prompt_len < cfg.max_position_embeddings:
        raise MpkError(f"--prompt-len must be between 1 and {cfg.max_position_embeddings - 1}, not {prompt_len}")
    if cfg.sliding_window and cfg.sliding_window < prompt_len:
        raise MpkError(f"{source.name} has a sliding window of {cfg.sliding_window}; the PyTorch baseline's fused "
                       "attention has none, so use a --prompt-len within it")
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    hf = source.load_weights(torch.bfloat16, device=device)
    seconds: dict[str, float] = {}
    parts: dict[str, dict] = {}
    if "mpk" in backends:
        seconds["mpk"], parts["mpk"] = time_mpk_ttft(cfg, hf, prompts, device, props.multi_processor_count, repeats)
    if "mpk-graph" in backends:
        seconds["mpk-graph"], parts["mpk-graph"] = time_mpk_ttft(cfg, hf, prompts, device, props.multi_processor_count,
                                                                 repeats, graph=True)
    if "eager" in backends:
        from mpk.models.reference import ReferenceModel

        ref = ReferenceModel(cfg, hf, torch.bfloat16, device)
        tokens = prompts.to(device)
        times = []
        for _ in range(repeats + 1):
            ref.reset(batch, prompt_len)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            ref.prefill(tokens)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        seconds["torch-sdpa"] = statistics.median(times[1:])
    return {"model": source.name, "gpu": props.name, "batch": batch, "prompt_len": prompt_len,
            "ttft_ms": {name: s * 1e3 for name, s in seconds.items()},
            **({"mpk_parts_ms": {b: {name: s * 1e3 for name, s in p.items()} for b, p in parts.items()}}
               if parts else {})}


def time_mpk_ttft(cfg, hf: dict, prompts: torch.Tensor, device, num_sms: int, repeats: int,
                  graph: bool = False) -> tuple[float, dict]:
    """Seconds to mpk's first token, and its parts: the prefill (`mpk.prefill.prefill_ops`, or with
    `graph` `prefill_graphs`) and the decode steps after it (one, for prompts of one length).
    Medians of `repeats` runs after a warm-up (which builds what the prefill needs)."""
    from mpk.compiler import compile_model
    from mpk.inputs import program_meta
    from mpk.prefill import prefill_graphs, prefill_ops
    from mpk.runtime import Megakernel

    batch, prompt_len = prompts.shape
    ids = prompts.tolist()
    tg = compile_model(cfg, batch=batch, max_seq_len=prompt_len, num_sms=num_sms)
    weights, meta = _mpk_inputs(cfg, tg, hf, [device])
    meta.update(program_meta(tg, ids))  # the prompts, in place of _mpk_inputs' [1]
    times: list[tuple[float, float]] = []
    made: dict = {}  # the prefill programs or megakernels, made in the warm-up run
    with Megakernel(tg, device=device, weights=weights, meta=meta) as kernel:
        for _ in range(repeats + 1):
            kernel.set_meta(meta)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            first = prefill_graphs(kernel, cfg, ids, made) if graph else prefill_ops(kernel, cfg, ids, programs=made)
            torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            result = kernel.run(prompt_len - first, max_new_tokens=1, first_step=first, eos_token_ids=[])
            times.append((t1 - t0, time.perf_counter() - t1))
            if result.steps != prompt_len - first:
                raise MpkError(f"the megakernel ran {result.steps} of {prompt_len - first} steps after the prefill")
    for prefill_kernel in made.values() if graph else ():
        prefill_kernel.close()
    prefill = statistics.median(t[0] for t in times[1:])
    decode = statistics.median(t[1] for t in times[1:])
    total = statistics.median(sum(t) for t in times[1:])
    return total, {"prefill": prefill, "decode": decode} if prompt_len > 1 else {"decode": decode}


def format_ttft(result: dict) -> str:
    ms = result["ttft_ms"]
    lines = [f"{result['model']}: time to first token, batch {result['batch']} x {result['prompt_len']} prompt "
             f"tokens on {result['gpu']}"]
    parts = result.get("mpk_parts_ms", {})
    positions = f"positions 0..{result['prompt_len'] - 2}"
    prefill_how = {"mpk": f"{positions}, PyTorch ops on the megakernel's buffers",
                   "mpk-graph": f"{positions}, task graphs on the persistent runtime"}
    for name, value in ms.items():
        lines.append(f"  {name:<12} {value:>10.2f} ms")
        what = {"prefill": ("prefill", prefill_how.get(name)), "decode": ("first step", "one megakernel decode step")}
        lines += [f"    {what[p][0]:<10} {ms_:>10.2f} ms  ({what[p][1]})" for p, ms_ in parts.get(name, {}).items()]
    for name in ("mpk", "mpk-graph"):
        if name in ms and "torch-sdpa" in ms:
            lines.append(f"  {name} takes {ms[name] / ms['torch-sdpa']:.2f}x the time of one batched PyTorch pass")
    return "\n".join(lines)


def _sampled(result: dict) -> str:
    s = result.get("sampling")
    return f", mpk sampling (temperature {s['temperature']:g}, top-k {s['top_k']}, top-p {s['top_p']:g})" if s else ""


def _graph_length(result: dict) -> str:
    """ ' in a graph of N positions' when the bench was sized longer than its steps reach."""
    n = result.get("max_seq_len")
    return f" in a graph of {n} positions" if n and n > bench_seq_len(result.get("context", 0), result["steps"], None) else ""


def format_bench(result: dict) -> str:
    kv = result.get("kv_bytes_per_step", 0)
    cache = f", {result['kv_cache']} KV cache" if "kv_cache" in result else ""  # runs before it was its own choice
    if result.get("kv_block_rows"):
        cache += f" in blocks of {result['kv_block_rows']} rows"
    if result.get("activations", DEFAULT_ACTIVATIONS) == "float32" and result.get("matmul_inputs") == "bfloat16":
        cache += ", bfloat16 matrix-product inputs"
    lines = [
        f"{result['model']} batch {result['batch']} on {result['gpu']} ({result['num_sms']} SMs), "
        f"{result['steps']} steps from position {result.get('context', 0)}{_graph_length(result)}, "
        f"{result['bytes_per_step'] / 1e9:.2f} GB per step ({kv / 1e9:.2f} GB of KV), "
        f"{result.get('activations', DEFAULT_ACTIVATIONS)} activations{cache}{_sampled(result)}",
        f"  {'backend':<14} {'ms/step':>9} {'tokens/s':>10} {'GB/s':>8} {'% floor':>8}",
    ]
    for r in result["rows"]:
        pct = r["pct_of_floor"]
        floor = f"{pct:>7.1f}%" if math.isfinite(pct) else f"{'-':>8}"  # no stream-read row: no floor measured
        lines.append(f"  {r['name']:<14} {r['ms_per_step']:>9.3f} {r['tokens_per_s']:>10.1f} {r['gbps']:>8.0f} {floor}")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"  {name:<14} skipped: {why}")
    by_name = {r["name"]: r for r in result["rows"]}
    tp = result.get("tp", 1)
    if tp > 1 and "mpk" in by_name and f"mpk-tp{tp}" in by_name:
        ratio = by_name[f"mpk-tp{tp}"]["ms_per_step"] / by_name["mpk"]["ms_per_step"]
        lines.append(f"  mpk-tp{tp} takes {ratio:.3f}x the time of mpk on one GPU ({1 / ratio:.2f}x faster); its "
                     f"bytes and floor are per GPU")
    if "profile" in result:
        from mpk.profile import format_trace_summary

        lines.append(format_trace_summary(result["profile"]))
    return "\n".join(lines)
