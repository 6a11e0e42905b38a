"""The `mpk` command: inspect a model's task graph, build its kernel, benchmark it, or generate with it.

Every user error ends as one line on stderr (`mpk: error: ...`) and exit status 2, never a traceback.
Results go to stdout; notes and progress go to stderr, and `--quiet` silences them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from mpk import __version__, defaults, progress
from mpk.batching import DEFAULT_PREFILL_ROWS
from mpk.errors import MpkError
from mpk.graph import (ACTIVATIONS, DEFAULT_ACTIVATIONS, DEFAULT_KV_CACHE, DEFAULT_MATMUL_INPUTS, KV_CACHES,
                       MATMUL_INPUTS, MAX_BATCH, MAX_NUM_SMS)

DEFAULT_MODEL = "qwen3-0.6b"
DEFAULT_TOKEN_IDS = "1,2,3,4"

# Integer options and their (lowest, highest) values, checked before anything runs or prints.
RANGES = {"batch": (1, MAX_BATCH), "num_sms": (1, MAX_NUM_SMS), "tp": (1, None), "max_seq_len": (1, None),
          "max_new_tokens": (1, None), "steps": (1, None), "port": (0, 65535), "max_waiting": (1, None), "max_batch": (1, MAX_BATCH),
          "clients": (1, None), "requests": (1, None), "prompt_len": (1, None), "output_len": (1, None),
          "kv_block_rows": (0, None), "prefill_rows": (1, None)}


def main(argv: list[str] | None = None) -> int:
    argv = _glue_dash_values(sys.argv[1:] if argv is None else list(argv))
    args = _parser().parse_args(argv)
    progress.enable(not args.quiet)
    try:
        _check_ranges(args)
        return args.func(args)
    except MpkError as e:
        print(f"mpk: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpk: interrupted", file=sys.stderr)
        return 130
    finally:
        progress.enable(False)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error of mpk."""

    def error(self, message: str):
        self.exit(2, f"mpk: error: {message} (see `{self.prog} --help`)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is no value to show or the help says it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpk", description="Compile LLM decoding into one persistent GPU megakernel.",
                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"mpk {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="print results and errors only: no notes or progress")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], formatter_class=_HelpFormatter)

    ins = command("inspect", "compile a model's decode step and summarize its task graph")
    ins.add_argument("model", help="checkpoint directory or preset name")
    ins.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ins.add_argument("--num-sms", type=int, default=defaults.NUM_SMS, help="SMs per GPU (132: an H100 or H200)")
    ins.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs")
    ins.add_argument("--max-seq-len", type=int, default=defaults.MAX_SEQ_LEN, help="KV cache length")
    ins.add_argument("--save-graph", metavar="PATH", help="also write the whole TaskGraph as JSON")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins.set_defaults(func=cmd_inspect)

    bld = command("build", "generate and compile a model's megakernel ahead of time (no GPU needed)")
    bld.add_argument("model", help="checkpoint directory or preset name")
    bld.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    bld.add_argument("--arch", default=defaults.ARCH, help="GPU architecture: sm_90a, sm_80, sm_100a, ...")
    bld.add_argument("--num-sms", type=int, default=defaults.NUM_SMS,
                     help="SMs of the target GPU: tile widths shape the kernel")
    bld.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (one library serves every rank)")
    bld.add_argument("--debug", action="store_true", help="with device asserts (MPK_DEBUG)")
    _add_precision_flags(bld)
    bld.set_defaults(func=cmd_build)

    ben = command("bench", "time mpk against a streaming-read ceiling and PyTorch (needs a GPU)")
    ben.add_argument("model", help="checkpoint directory or preset name")
    ben.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ben.add_argument("--steps", type=int, default=128, help="decode steps timed")
    ben.add_argument("--backends", default="stream,mpk,eager,compile",
                     help="comma-separated subset of stream,mpk,eager,compile")
    ben.add_argument("--profile", metavar="TRACE_JSON", help="also write per-SM task spans of mpk for Perfetto")
    _add_precision_flags(ben, "mpk's ", "; the torch baselines run in bfloat16")
    ben.add_argument("--context", type=int, default=0,
                     help="position of the first timed step, the cache filled up to it")
    ben.add_argument("--max-seq-len", type=int, default=None,
                     help="positions the mpk graph is compiled for, as a generate or serve run of that length is "
                          "(more attention splits); default: what the timed steps reach")
    ben.add_argument("--tp", type=int, default=1,
                     help="also time mpk over this many GPUs (tensor parallel), beside mpk on one")
    ben.add_argument("--kv-block-rows", type=int, default=0,
                     help="mpk reads a paged KV cache in blocks of this many rows, each sequence's blocks "
                          "interleaved with the others' as in a served batch (0: one contiguous cache)")
    ben.add_argument("--temperature", type=float, default=0.0,
                     help="above 0, mpk samples every token in the kernel (with --top-k, --top-p) instead of greedily")
    ben.add_argument("--top-k", type=int, default=0, help="with --temperature: sample among the k likeliest (0: all)")
    ben.add_argument("--top-p", type=float, default=1.0, help="with --temperature: the nucleus mass (1: all)")
    ben.add_argument("--prompt-len", type=int, default=None,
                     help="time to first token of prompts this long instead of decode steps (mpk: prefill ops "
                          "and one megakernel step, vs one batched PyTorch pass with fused attention; backends "
                          "mpk,eager, and mpk-graph: the prefill as task graphs on the persistent runtime)")
    ben.add_argument("--json", action="store_true", help="print the results as JSON")
    ben.set_defaults(func=cmd_bench)
    _add_bench_op(command)

    gen = command("generate", "generate tokens (greedily unless --temperature is above 0)")
    gen.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                     help="checkpoint directory or preset name (a preset has random weights)")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch); needs a tokenizer")
    src.add_argument("--token-ids", action="append",
                     help=f"comma-separated prompt token ids (repeat for a batch; default {DEFAULT_TOKEN_IDS} "
                          "without --prompt)")
    gen.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate per prompt, at most")
    _add_run_flags(gen)
    gen.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    _add_sampling_flags(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object with token_ids (and text)")
    gen.set_defaults(func=cmd_generate)

    cht = command("chat", "talk with a model through its chat template: one user turn per line of stdin, "
                          "until end of input or /exit")
    cht.add_argument("model", help="checkpoint directory with a tokenizer and a chat template")
    cht.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply, at most")
    cht.add_argument("--max-seq-len", type=int, default=defaults.MAX_SEQ_LEN,
                     help="tokens the whole conversation may hold (clipped to the model's context)")
    _add_run_flags(cht)
    _add_sampling_flags(cht)
    cht.set_defaults(func=cmd_chat)

    srv = command("serve", "serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                           "/v1/chat/completions, /v1/models, /health, /metrics); needs mpk[serve]")
    srv.add_argument("model", help="checkpoint directory or preset name")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on")
    srv.add_argument("--served-model-name", help="the model's name in the API (default: MODEL as given)")
    srv.add_argument("--max-seq-len", type=int, default=defaults.MAX_SEQ_LEN,
                     help="tokens a request's prompt and reply may hold together (clipped to the model's context)")
    srv.add_argument("--max-batch", type=int, default=None,
                     help="requests generated together (continuous batching: each joins when a slot frees up; "
                          "beyond 8 the matrix products run as GEMM tiles on tensor cores) (default: "
                          f"{defaults.SERVE_MAX_BATCH} on a GPU, {defaults.SERVE_MAX_BATCH_SIM} on the CPU executor)")
    srv.add_argument("--max-waiting", type=int, default=64,
                     help="requests that may wait for a slot; more are answered 503")
    srv.add_argument("--prefill-rows", type=int, default=None,
                     help="with a paged cache, prompt rows prefilled between two windows of decode steps: more admits "
                          "a burst of requests sooner, fewer keeps the running requests' tokens steadier "
                          f"(default: {DEFAULT_PREFILL_ROWS})")
    _add_run_flags(srv, serving=True)
    srv.set_defaults(func=cmd_serve)

    bsv = command("bench-serve", "load an OpenAI-compatible server (mpk serve, vLLM) with concurrent streaming "
                                 "completions; report throughput, time to first token (TTFT) and time per output "
                                 "token (TPOT); needs httpx")
    bsv.add_argument("url", help="the server's address, such as http://127.0.0.1:8000 (with or without /v1)")
    bsv.add_argument("--model", help="the model to ask for (default: the first the server lists at /v1/models)")
    bsv.add_argument("--clients", type=int, default=8, help="concurrent clients, each streaming one request at a time")
    amount = bsv.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, help="requests in all (default: 4 per client)")
    amount.add_argument("--duration", type=float, metavar="SECONDS",
                        help="send requests for this long instead; those in flight then finish")
    bsv.add_argument("--prompt-len", type=int, default=128,
                     help="mean prompt length in tokens (random token ids); each request's is drawn uniformly "
                          "within +-50%%")
    bsv.add_argument("--output-len", type=int, default=128,
                     help="mean output length in tokens; each request's is drawn uniformly within +-50%%")
    bsv.add_argument("--seed", type=int, default=0, help="seed of the drawn lengths and prompts")
    bsv.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                     help="let requests stop at an end-of-sequence token (by default they ask, with the ignore_eos "
                          "extension of mpk serve and vLLM, for exactly the drawn output length)")
    bsv.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    bsv.add_argument("--json", action="store_true", help="print the results as JSON")
    bsv.set_defaults(func=cmd_bench_serve)
    return p


def _add_precision_flags(cmd: argparse.ArgumentParser, whose: str = "", note: str = "") -> None:
    """The graph's precisions (`mpk.graph.precision_of`); `whose` and `note` frame the activations' help."""
    cmd.add_argument("--activations", choices=ACTIVATIONS, default=DEFAULT_ACTIVATIONS,
                     help=f"{whose}activation precision: float32 (a float32 computation on the stored weights) "
                          f"or model (the weights' dtype, rounding as transformers does){note}")
    cmd.add_argument("--kv-cache", choices=KV_CACHES, default=DEFAULT_KV_CACHE,
                     help=f"{whose}KV cache precision: model (the weights' dtype) or float32")
    cmd.add_argument("--matmul-inputs", choices=MATMUL_INPUTS, default=DEFAULT_MATMUL_INPUTS,
                     help="with float32 activations: bfloat16 rounds the input of every matrix product "
                          "(float32 sums; one tensor-core pass at batch 2-8 instead of two); auto: float32 at "
                          "batch 1, bfloat16 from batch 2")


def _add_run_flags(cmd: argparse.ArgumentParser, serving: bool = False) -> None:
    """Where and at what precision a model runs: the flags of generate, chat and serve. A server pages
    its KV cache by default and sizes it from the GPU's memory (docs/decisions.md, "Serving defaults")."""
    cmd.add_argument("--backend", choices=["auto", "cuda", "sim"], default="auto",
                     help="cuda: the GPU megakernel; sim: the CPU executor; auto: cuda when a GPU is present")
    cmd.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                     help="weight dtype: bfloat16 (the only one of the GPU backend) or float32 (CPU executor)")
    _add_precision_flags(cmd)
    cmd.add_argument("--kv-block-rows", type=int, default=defaults.KV_BLOCK_ROWS if serving else 0,
                     help="page the KV cache in blocks of this many rows, handed to sequences as they grow "
                          "(0: each sequence slot owns max-seq-len rows)")
    sized = (f"{defaults.SERVE_GPU_MEMORY_UTILIZATION:g} on a GPU, else as many blocks as max-batch full-length "
             "sequences need" if serving else "as many blocks as max-batch full-length sequences need")
    cmd.add_argument("--gpu-memory-utilization", type=float, default=None,
                     help="with --kv-block-rows: the share of the device's memory the run may take; the KV "
                          f"cache gets what the weights and workspace leave (default: {sized})")
    cmd.add_argument("--num-sms", type=int, default=None,
                     help=f"SMs to schedule for (default: the GPU's, or {defaults.SIM_NUM_SMS} on the CPU executor)")
    cmd.add_argument("--tp", type=int, default=1,
                     help="tensor-parallel ranks: one GPU each on the cuda backend, simulated together on sim")
    cmd.add_argument("--seed", type=int, default=0,
                     help="seed of the executor's task order (not of sampling: see --sample-seed)")


def _add_sampling_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--temperature", type=float, default=0.0,
                     help="0 takes the likeliest token (greedy); above 0 samples")
    cmd.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens only (0: all)")
    cmd.add_argument("--top-p", type=float, default=1.0,
                     help="sample among the likeliest tokens whose probabilities add up to p (1: all)")
    cmd.add_argument("--sample-seed", type=int, default=None,
                     help="seed of sampling, to repeat a sampled run (default: a fresh one each time)")
    cmd.add_argument("--stop", action="append", metavar="TEXT",
                     help="end the text before this string (repeat for several); needs a tokenizer")


def cmd_inspect(args) -> int:
    from mpk.compiler import compile_model
    from mpk.models import resolve_model
    from mpk.summary import format_summary, summarize

    source = resolve_model(args.model)
    source.check()
    t0 = time.perf_counter()
    with progress.phase("compiling and verifying the task graph"):
        tg = compile_model(source.cfg, batch=args.batch, max_seq_len=min(args.max_seq_len, source.cfg.max_position_embeddings),
                           tp_size=args.tp, num_sms=args.num_sms)
    summary = summarize(tg, seconds=time.perf_counter() - t0)
    if args.save_graph:
        _write_text(args.save_graph, tg.to_json())
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_build(args) -> int:
    from mpk.codegen import generate_source
    from mpk.compiler import compile_model
    from mpk.models import resolve_model
    from mpk.runtime.build import build, find_nvcc, gencode, writable_cache

    source = resolve_model(args.model)
    gencode(args.arch)  # a bad --arch, no nvcc or an unusable cache directory: say so before compiling
    writable_cache()
    find_nvcc()
    # The kernel depends on the op variants only (batch, widths, flags, columns per warp), not on the
    # context length, so a short context stands for every one of this model, batch and GPU.
    with progress.phase("compiling the task graph"):
        tg = compile_model(source.cfg, batch=args.batch, max_seq_len=min(64, source.cfg.max_position_embeddings),
                           num_sms=args.num_sms, tp_size=args.tp, verify=False, activations=args.activations,
                           kv_cache=args.kv_cache, matmul_inputs=args.matmul_inputs)
    t0 = time.perf_counter()
    path = build(generate_source(tg), args.arch, debug=args.debug or None)
    tp = f" tp {args.tp}" if args.tp > 1 else ""
    print(f"{source.name} batch {args.batch}{tp} for {args.arch}: {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_bench(args) -> int:
    from mpk.bench import format_bench, run_bench

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"stream", "mpk", "mpk-graph", "eager", "compile"}
    if unknown:
        raise MpkError(f"unknown backend(s) {', '.join(sorted(unknown))}; choose from stream, mpk, eager, compile "
                       "(and mpk-graph with --prompt-len)")
    if "mpk-graph" in backends and args.prompt_len is None:
        raise MpkError("the mpk-graph backend times prefill on the persistent runtime; use it with --prompt-len")
    if args.profile and "mpk" not in backends:
        raise MpkError("--profile traces the mpk backend; include mpk in --backends")
    if args.kv_block_rows and args.prompt_len is not None:
        raise MpkError("--kv-block-rows pages the decode bench's cache; time to first token (--prompt-len) "
                       "runs with a contiguous one")
    if args.max_seq_len is not None and args.prompt_len is not None:
        raise MpkError("--max-seq-len sizes the decode bench's graph; time to first token (--prompt-len) sizes "
                       "its own from the prompt")
    from mpk.bench import bench_seq_len

    bench_seq_len(args.context, args.steps, args.max_seq_len)  # a graph too short is refused before the GPU
    from mpk.api import SamplingParams

    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)  # validates them
    sampling = (args.temperature, max(args.top_k, 0), args.top_p) if args.temperature > 0 else None
    if args.prompt_len is not None:
        from mpk.bench import format_ttft, run_ttft_bench

        result = run_ttft_bench(args.model, batch=args.batch, prompt_len=args.prompt_len, backends=backends)
        print(json.dumps(result, indent=2) if args.json else format_ttft(result))
        return 0
    result = run_bench(args.model, batch=args.batch, steps=args.steps, backends=backends, profile=args.profile,
                       activations=args.activations, kv_cache=args.kv_cache, matmul_inputs=args.matmul_inputs,
                       context=args.context, tp=args.tp, sampling=sampling, kv_block_rows=args.kv_block_rows,
                       max_seq_len=args.max_seq_len)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


# --- mpk bench-op: each task template alone -------------------------------------------------------

def _add_bench_op(command) -> None:
    from mpk.opbench import DEFAULT_CONTEXT, DEFAULT_MODEL, DEFAULT_REPEATS, DEFAULT_STEPS

    bop = command("bench-op", "time each task template alone on one SM and on all SMs, checked against its "
                              "reference (needs a GPU)")
    bop.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                     help=f"checkpoint directory or preset name, the source of the shapes (default {DEFAULT_MODEL})")
    bop.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    bop.add_argument("--op", action="append", metavar="KIND",
                     help="op kind to bench (repeat or comma-separate; default: every GPU op kind of the graph)")
    bop.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                     help=f"positions in the KV cache when the timed steps start (default {DEFAULT_CONTEXT})")
    bop.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                     help=f"steps per launch; the first is not timed (default {DEFAULT_STEPS})")
    bop.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                     help=f"timed launches after a warm-up (default {DEFAULT_REPEATS})")
    bop.add_argument("--activations", choices=ACTIVATIONS, default=DEFAULT_ACTIVATIONS,
                     help=f"activation precision of the graph (default {DEFAULT_ACTIVATIONS})")
    bop.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    bop.add_argument("--prefill", type=int, default=0, metavar="ROWS",
                     help="bench the prefill graph's op variants for a chunk of ROWS positions per sequence "
                          "(GEMMs on tensor cores, causal attention) instead of the decode graph's (default 0: decode)")
    bop.add_argument("--json", action="store_true", help="print the results as JSON")
    bop.set_defaults(func=cmd_bench_op)


def cmd_bench_op(args) -> int:
    from mpk.opbench.report import failures, format_op_bench
    from mpk.opbench.run import run_op_bench

    kinds = [k.strip() for spec in args.op or () for k in spec.split(",") if k.strip()]
    if args.prefill < 0:
        raise MpkError(f"--prefill must be 0 (the decode graph) or a chunk of 1 or more positions, not {args.prefill}")
    result = run_op_bench(args.model, batch=args.batch, kinds=kinds or None, context=args.context, steps=args.steps,
                          repeats=args.repeats, activations=args.activations, seed=args.seed, prefill=args.prefill)
    print(json.dumps(result, indent=2) if args.json else format_op_bench(result))
    bad = failures(result)
    if bad:
        raise MpkError("outputs differ from the reference beyond the bound: " + "; ".join(
            f"{r['variant']} {r['error']:.1e} > {r['bound']:.0e}" for r in bad))
    return 0


def cmd_generate(args) -> int:
    from mpk.engine import check_prompts
    from mpk.models import resolve_model

    source = resolve_model(args.model)
    tokenizer = _tokenizer(source, args)
    prompts = _prompts(args, tokenizer)
    seq_len = check_prompts(source.cfg, prompts, args.max_new_tokens)
    params = _sampling_params(args)
    if params.stop and tokenizer is None:
        raise MpkError(f"--stop strings need a tokenizer, and {source.name} has none")
    _check_tp(source, args.tp)
    stored = _stored_dtypes(source)
    backend, device = _prepare_backend(args)
    kv_blocks = _check_memory(source, args, backend, len(prompts), seq_len, device)

    _describe_run(args, source, backend, stored)
    if not args.prompt and not args.token_ids:
        _note(args, f"prompt: token ids {DEFAULT_TOKEN_IDS}, the default (choose with --prompt TEXT or --token-ids)")
    with _load_llm(args, source, backend, device, max_batch=len(prompts), max_seq_len=seq_len,
                   kv_blocks=kv_blocks) as llm:
        outs = _generate(args, llm, source.name, prompts, params)
        _print_result(args, source.name, backend, outs, llm.last_run, text=tokenizer is not None)
    return 0


def cmd_chat(args) -> int:
    from mpk.models import resolve_model

    source = resolve_model(args.model)
    _check_can_chat(source)
    params = _sampling_params(args)
    seq_len = min(args.max_seq_len, source.cfg.max_position_embeddings)
    if args.max_new_tokens > seq_len:
        raise MpkError(f"--max-new-tokens {args.max_new_tokens} exceeds the conversation's {seq_len} tokens; "
                       "lower it or raise --max-seq-len")
    _check_tp(source, args.tp)
    stored = _stored_dtypes(source)
    backend, device = _prepare_backend(args)
    kv_blocks = _check_memory(source, args, backend, 1, seq_len, device)
    _describe_run(args, source, backend, stored)
    with _load_llm(args, source, backend, device, max_batch=1, max_seq_len=seq_len, kv_blocks=kv_blocks) as llm:
        _chat_loop(llm, params, sys.stdin, interactive=sys.stdin.isatty())
    return 0


def cmd_serve(args) -> int:
    import socket

    from mpk.models import resolve_model

    try:
        import uvicorn

        from mpk.serve import create_app
    except ImportError as e:
        raise MpkError(f"mpk serve needs fastapi and uvicorn ({e}); pip install 'mpk[serve]'") from None
    if args.prefill_rows is not None and not args.kv_block_rows:
        raise MpkError("--prefill-rows budgets the chunked prefill of a paged KV cache; without paging "
                       "(--kv-block-rows 0) a prompt is prefilled whole when it joins: drop one of the two")
    args.prefill_rows = args.prefill_rows or DEFAULT_PREFILL_ROWS
    source = resolve_model(args.model)
    seq_len = min(args.max_seq_len, source.cfg.max_position_embeddings)
    _check_tp(source, args.tp)
    stored = _stored_dtypes(source)
    backend, device = _prepare_backend(args)
    if args.max_batch is None:
        args.max_batch = defaults.SERVE_MAX_BATCH if backend == "cuda" else defaults.SERVE_MAX_BATCH_SIM
    if backend == "cuda" and args.kv_block_rows and args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = defaults.SERVE_GPU_MEMORY_UTILIZATION
    kv_blocks = _check_memory(source, args, backend, args.max_batch, seq_len, device)
    # Bind before loading weights, so a taken port is one line at once rather than after the load, and
    # listen at once, so a client that connects as soon as the "serving" line shows waits in the
    # backlog until the server accepts instead of being refused.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen()
    except OSError as e:
        sock.close()
        raise MpkError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    _describe_run(args, source, backend, stored)
    with _load_llm(args, source, backend, device, max_batch=args.max_batch, max_seq_len=seq_len,
                   kv_blocks=kv_blocks) as llm:
        app = create_app(llm, args.served_model_name or args.model, max_waiting=args.max_waiting,
                         prefill_rows=args.prefill_rows)
        host, port = sock.getsockname()[:2]
        _note(args, f"serving {args.served_model_name or args.model} on http://{host}:{port}/v1 "
                    f"({backend}; up to {args.max_batch} requests at once, {args.max_waiting} waiting)")
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning" if args.quiet else "info"))
        server.run(sockets=[sock])
    return 0


def cmd_bench_serve(args) -> int:
    for flag, value in (("--duration", args.duration), ("--timeout", args.timeout)):
        if value is not None and not value > 0:
            raise MpkError(f"{flag} must be more than 0 seconds, not {value}")
    try:
        from mpk.serve.loadgen import format_bench_serve, run_bench_serve
    except ImportError as e:
        raise MpkError(f"mpk bench-serve needs httpx ({e}); pip install 'mpk[serve]'") from None
    result = run_bench_serve(args.url, model=args.model, clients=args.clients, requests=args.requests,
                             duration=args.duration, prompt_len=args.prompt_len, output_len=args.output_len,
                             seed=args.seed, ignore_eos=args.ignore_eos, timeout=args.timeout)
    print(json.dumps(result, indent=2) if args.json else format_bench_serve(result))
    if result["completed"] == 0:
        raise MpkError(f"every request failed; the first: {result['first_error']}")
    return 0


def _check_can_chat(source) -> None:
    """Say, before loading any weights, that a checkpoint cannot chat."""
    try:
        tokenizer = source.tokenizer()
    except MpkError as e:
        raise MpkError(f"{source.name} cannot chat without a usable tokenizer: {e}") from None
    if tokenizer is None:
        raise MpkError(f"{source.name} has no tokenizer, so it cannot chat; give a checkpoint directory with one")
    if not tokenizer.chat_template:
        raise MpkError(f"{source.name} has no chat template (chat_template in tokenizer_config.json), so it cannot "
                       "chat; use `mpk generate --prompt` instead")


def _chat_loop(llm, params, lines, interactive: bool) -> None:
    """Read a user turn per line, stream each reply, and keep the whole conversation as the next prompt."""
    history: list[dict] = []
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = lines.readline()
        if not line:  # end of input
            if interactive:
                print()
            return
        turn = line.rstrip("\r\n")
        if turn.strip() == "/exit":
            return
        if not turn.strip():
            continue
        history.append({"role": "user", "content": turn})
        reply = llm.chat(history, params, on_text=lambda _, delta: print(delta, end="", flush=True))
        print(flush=True)
        history.append({"role": "assistant", "content": reply.outputs[0].text})


def _check_tp(source, tp: int) -> None:
    from mpk.graph import shard_of

    for rank in range(tp):
        shard_of(source.cfg, rank, tp)


def _sampling_params(args):
    from mpk.api import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          max_tokens=args.max_new_tokens, seed=args.sample_seed, stop=args.stop,
                          ignore_eos=getattr(args, "ignore_eos", False))


def _prepare_backend(args) -> tuple[str, object]:
    """The backend and CUDA device (None with tensor parallelism: GPUs 0..tp-1); what they cannot do
    is refused before loading anything."""
    backend = _backend(args.backend)
    device = None
    if backend == "cuda":
        from mpk.runtime import rank_devices
        from mpk.runtime.build import writable_cache

        devices = rank_devices(args.tp)  # too few GPUs, or too old ones: say so before loading anything
        device = devices[0] if args.tp == 1 else None
        writable_cache()
    return backend, device


def _load_llm(args, source, backend: str, device, max_batch: int, max_seq_len: int, kv_blocks: int | None = None):
    from mpk.api import LLM
    from mpk.dtypes import torch_dtype
    from mpk.models.checkpoint import expected_shapes

    what = "making random weights" if source.path is None else "loading weights"
    total = sum(math.prod(shape) for shape in expected_shapes(source.cfg).values()) * torch_dtype(args.dtype).itemsize
    with progress.phase(what, total=total, unit="B", unit_scale=True) as loading:
        return LLM(args.model, max_batch=max_batch, max_seq_len=max_seq_len, backend=backend, dtype=args.dtype,
                   device=device, tp_size=args.tp, num_sms=args.num_sms, activations=args.activations,
                   kv_cache=args.kv_cache, matmul_inputs=args.matmul_inputs, kv_block_rows=args.kv_block_rows,
                   kv_blocks=kv_blocks, seed=args.seed, load_progress=loading.update)


def _describe_run(args, source, backend: str, stored: set[str]) -> None:
    """Notes on stderr: where it runs, and what a first-time user could not otherwise know."""
    where = "the GPU megakernel" if backend == "cuda" else "the CPU executor (sim; no GPU found)" if args.backend == "auto" \
        else "the CPU executor (sim)"
    acts = "float32" if args.activations == "float32" else args.dtype
    _note(args, f"running {source.name} on {where}, {args.dtype} weights, {acts} activations")
    if source.path is None:
        _note(args, f"{source.name} is a preset: the model's shapes with random weights, so its tokens mean nothing "
                    "(give a checkpoint directory for real text)")
    if "F16" in stored and args.dtype == "bfloat16":
        _note(args, "the checkpoint stores float16 weights; bfloat16 rounds them to 8 significant bits "
                    "(--dtype float32 on the CPU executor keeps them exact)")


def _generate(args, llm, name: str, prompts: list[list[int]], params):
    """Generate, streaming the text of a single prompt to stdout as tokens arrive."""
    stream = not args.json and len(prompts) == 1
    # Streamed text on a terminal is its own progress; a bar beside it would garble both.
    bar_total = None if stream and sys.stdout.isatty() else len(prompts) * args.max_new_tokens
    longest = max(len(p) for p in prompts)
    warmup = progress.Phase(f"compiling the decode step and reading the prompt ({longest} tokens)")
    phases = [warmup]

    def on_token(seq: int, token: int) -> None:
        if not warmup.closed:  # the first new token
            warmup.close()
            if bar_total:
                phases.append(progress.Phase("generating", total=bar_total, unit="tok"))
            if stream:
                print(f"{name}: ", end="", flush=True)  # only now: an error before the first token leaves stdout empty
        if len(phases) > 1:
            phases[1].update(1)
        if stream and llm.tokenizer is None:
            print(f" {token}", end="", flush=True)

    def on_text(seq: int, delta: str) -> None:
        if stream:
            print(delta, end="", flush=True)

    try:
        return llm.generate(prompts, params, on_text=on_text, on_token=on_token)
    finally:
        if stream and warmup.closed:  # end the streamed line, also when generation failed halfway
            print(flush=True)
        for phase in phases:
            phase.close()


def _print_result(args, name: str, backend: str, outs, run, text: bool) -> None:
    token_ids = [o.outputs[0].token_ids for o in outs]
    texts = [o.outputs[0].text for o in outs] if text else None
    one = len(outs) == 1
    if args.json:
        result = {"model": name, "backend": backend, "dtype": args.dtype, "steps": run.steps, "prefilled": run.prefilled,
                  "seconds": round(run.seconds, 3), "token_ids": token_ids[0] if one else token_ids}
        if texts is not None:
            result["text"] = texts[0] if one else texts
        print(json.dumps(result))
    elif not one:
        for i, ids in enumerate(token_ids):
            print(f"[{i}] " + (texts[i] if texts is not None else " ".join(map(str, ids))))
    made = sum(len(t) for t in token_ids)
    prefilled = f" after a prefill of {run.prefilled} positions" if run.prefilled else ""
    _note(args, f"{made} tokens in {run.steps} steps{prefilled}, {run.seconds:.2f} s "
                f"({made / max(run.seconds, 1e-9):.1f} tokens/s, {run.tasks_per_step} tasks per step)")


def _tokenizer(source, args):
    """The checkpoint's tokenizer; one that cannot be used stops a --prompt run, and otherwise only costs the text."""
    try:
        return source.tokenizer()
    except MpkError as e:
        if args.prompt:
            raise
        _note(args, f"printing token ids, not text: {e}")
        return None


def _stored_dtypes(source) -> set[str]:
    """Validate the checkpoint's headers and return its weights' safetensors dtypes (none for a preset)."""
    if source.path is None:
        return set()
    from mpk.models.checkpoint import stored_dtypes

    return stored_dtypes(source.path, source.cfg)


def _check_memory(source, args, backend: str, batch: int, seq_len: int, device) -> int | None:
    """Refuse, before loading anything, a run whose weights, KV cache and workspace do not fit.
    Returns the blocks of a paged cache sized by --gpu-memory-utilization (None: the default size)."""
    from dataclasses import replace

    from mpk import memory
    from mpk.dtypes import dtype
    from mpk.paging import KvPages

    weight_bytes = dtype(args.dtype).bytes
    kv_bytes = 4 if args.kv_cache == "float32" else weight_bytes
    need = memory.estimate(source.cfg, batch=batch, max_seq_len=seq_len, tp_size=args.tp, weight_bytes=weight_bytes,
                           activation_bytes=4 if args.activations == "float32" else weight_bytes, kv_bytes=kv_bytes,
                           device="GPU memory" if backend == "cuda" else "CPU RAM")
    blocks = None
    if args.gpu_memory_utilization is not None and not args.kv_block_rows:
        raise MpkError("--gpu-memory-utilization sizes a paged KV cache; add --kv-block-rows (64, say)")
    if args.gpu_memory_utilization is not None and backend != "cuda":
        raise MpkError("--gpu-memory-utilization sizes the KV cache from a GPU's memory; the CPU executor takes "
                       "--kv-block-rows alone")
    if args.kv_block_rows and args.gpu_memory_utilization is not None:
        import torch

        block = memory.kv_block_bytes(source.cfg, args.kv_block_rows, kv_bytes)
        capacity = torch.cuda.get_device_properties(device or 0).total_memory * args.tp
        blocks = memory.kv_blocks_within(need, capacity, args.gpu_memory_utilization, block)
        one = KvPages.full(1, seq_len, args.kv_block_rows).num_blocks  # a request of max_seq_len tokens
        if blocks < one:
            raise MpkError(f"--gpu-memory-utilization {args.gpu_memory_utilization:g} leaves room for {blocks} KV blocks "
                           f"of {args.kv_block_rows} rows and one {seq_len}-token request needs {one}; raise it, or "
                           "lower --max-seq-len")
        need = replace(need, kv_cache=blocks * block)
    advice = memory.TOO_BIG if blocks is None else (  # the cache was sized from the whole device, part of it taken
        f"lower --gpu-memory-utilization (now {args.gpu_memory_utilization:g}) or free the GPU's memory")
    if backend == "cuda" and args.tp > 1:
        import torch

        for rank in range(args.tp):
            memory.check_fits(need.per_rank(args.tp), memory.available_gpu_bytes(torch.device("cuda", rank)),
                              f"rank {rank} of {source.name} on cuda:{rank}", advice)
    elif backend == "cuda":
        memory.check_fits(need, memory.available_gpu_bytes(device), f"{source.name} on the GPU", advice)
    else:
        memory.check_fits(need, memory.available_cpu_bytes(), f"{source.name} on the CPU executor")
    return blocks


def _backend(choice: str) -> str:
    """auto: the megakernel when a CUDA GPU is present, else the CPU executor."""
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "sim"


def _prompts(args, tokenizer) -> list[list[int]]:
    if args.prompt:
        if tokenizer is None:
            raise MpkError(f"{args.model} has no tokenizer files; pass --token-ids instead of --prompt")
        return [tokenizer.encode(text) for text in args.prompt]
    return [_parse_token_ids(spec) for spec in args.token_ids or [DEFAULT_TOKEN_IDS]]


def _parse_token_ids(spec: str) -> list[int]:
    parts = [p.strip() for p in spec.split(",")]
    if not any(parts):
        raise MpkError("--token-ids needs at least one token id, such as --token-ids 1,2,3")
    if not all(parts):
        raise MpkError(f"--token-ids {spec!r} has an empty entry between commas; give ids such as 1,2,3")
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise MpkError(f"--token-ids takes comma-separated integers, not {spec!r}") from None
    negative = [t for t in ids if t < 0]
    if negative:
        raise MpkError(f"token ids are 0 or more, but --token-ids {spec!r} has {negative[0]}")
    return ids


def _glue_dash_values(argv: list[str]) -> list[str]:
    """argparse takes the value of `--token-ids -1,2` for an option; glue it on (`--token-ids=-1,2`) so that
    the value reaches the check that explains what is wrong with it."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if a in ("--token-ids", "--prompt") and nxt.startswith("-") and not nxt.startswith("--") and nxt != "-h":
            out.append(f"{a}={nxt}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def _check_ranges(args) -> None:
    for name, (lo, hi) in RANGES.items():
        value = getattr(args, name, None)
        if value is None or (value >= lo and (hi is None or value <= hi)):
            continue
        flag = "--" + name.replace("_", "-")
        if hi is None:
            raise MpkError(f"{flag} must be at least {lo}, not {value}")
        raise MpkError(f"{flag} must be between {lo} and {hi}, not {value}")


def _note(args, message: str) -> None:
    if not args.quiet:
        print(f"mpk: {message}", file=sys.stderr, flush=True)


def _write_text(path: str, text: str) -> None:
    """Write whole or not at all: a temporary file renamed into place."""
    import os

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise MpkError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


if __name__ == "__main__":
    sys.exit(main())
