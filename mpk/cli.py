"""The `mpk` command: inspect a model's task graph, or generate with it.

Every user error ends as one line on stderr (`mpk: error: ...`) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mpk import defaults
from mpk.errors import MpkError
from mpk.graph import ACTIVATIONS, DEFAULT_ACTIVATIONS, DEFAULT_KV_CACHE, KV_CACHES

DEFAULT_MODEL = "qwen3-0.6b"
DEFAULT_TOKEN_IDS = "1,2,3,4"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except MpkError as e:
        print(f"mpk: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpk: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpk", description="Compile LLM decoding into one persistent GPU megakernel.")
    sub = p.add_subparsers(dest="command", required=True)

    ins = sub.add_parser("inspect", help="compile a model's decode step and summarize its task graph")
    ins.add_argument("model", help="checkpoint directory or preset name")
    ins.add_argument("--batch", type=int, default=1)
    ins.add_argument("--num-sms", type=int, default=defaults.NUM_SMS,
                     help=f"SMs per GPU (default {defaults.NUM_SMS}, an H100 or H200)")
    ins.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs")
    ins.add_argument("--max-seq-len", type=int, default=defaults.MAX_SEQ_LEN,
                     help=f"KV cache length (default {defaults.MAX_SEQ_LEN})")
    ins.add_argument("--save-graph", metavar="PATH", help="also write the whole TaskGraph as JSON")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins.set_defaults(func=cmd_inspect)

    bld = sub.add_parser("build", help="generate and compile a model's megakernel ahead of time (no GPU needed)")
    bld.add_argument("model", help="checkpoint directory or preset name")
    bld.add_argument("--batch", type=int, default=1)
    bld.add_argument("--arch", default=defaults.ARCH,
                     help=f"GPU architecture: {defaults.ARCH} (default), sm_80, sm_100a, ...")
    bld.add_argument("--debug", action="store_true", help="with device asserts (MPK_DEBUG)")
    bld.set_defaults(func=cmd_build)

    ben = sub.add_parser("bench", help="time mpk against a streaming-read ceiling and PyTorch (needs a GPU)")
    ben.add_argument("model", help="checkpoint directory or preset name")
    ben.add_argument("--batch", type=int, default=1)
    ben.add_argument("--steps", type=int, default=128, help="decode steps timed (default 128)")
    ben.add_argument("--backends", default="stream,mpk,eager,compile",
                     help="comma-separated subset of stream,mpk,eager,compile")
    ben.add_argument("--profile", metavar="TRACE_JSON", help="also write per-SM task spans of mpk for Perfetto")
    ben.add_argument("--activations", choices=ACTIVATIONS, default=DEFAULT_ACTIVATIONS,
                     help=f"mpk's activation precision (default {DEFAULT_ACTIVATIONS}; the torch baselines run in bfloat16)")
    ben.add_argument("--kv-cache", choices=KV_CACHES, default=DEFAULT_KV_CACHE,
                     help="mpk's KV cache precision: model (default, the weights' dtype) or float32")
    ben.add_argument("--context", type=int, default=0,
                     help="position of the first timed step, the cache filled up to it (default 0)")
    ben.add_argument("--json", action="store_true", help="print the results as JSON")
    ben.set_defaults(func=cmd_bench)

    gen = sub.add_parser("generate", help="generate tokens greedily")
    gen.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                     help=f"checkpoint directory or preset name (default {DEFAULT_MODEL}, random weights)")
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch); needs a tokenizer")
    src.add_argument("--token-ids", action="append", help="comma-separated prompt token ids (repeat for a batch)")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--backend", choices=["auto", "cuda", "sim"], default="auto",
                     help="cuda: the GPU megakernel; sim: the CPU executor; auto: cuda when a GPU is present")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                     help="bfloat16 (default; the only dtype of the GPU backend) or float32 (CPU executor)")
    gen.add_argument("--activations", choices=ACTIVATIONS, default=DEFAULT_ACTIVATIONS,
                     help="activation precision: float32 (default; a float32 computation on the "
                          "stored weights) or model (the weights' dtype, rounding as transformers does)")
    gen.add_argument("--kv-cache", choices=KV_CACHES, default=DEFAULT_KV_CACHE,
                     help="KV cache precision: model (default, the weights' dtype) or float32")
    gen.add_argument("--num-sms", type=int, default=None,
                     help=f"SMs to schedule for (default: the GPU's, or {defaults.SIM_NUM_SMS} on the CPU executor)")
    gen.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (simulated together)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the executor's task order")
    gen.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    gen.add_argument("--json", action="store_true", help="print one JSON object with token_ids (and text)")
    gen.set_defaults(func=cmd_generate)
    return p


def cmd_inspect(args) -> int:
    from mpk.compiler import compile_model
    from mpk.summary import format_summary, summarize
    from mpk.models import resolve_model

    source = resolve_model(args.model)
    source.check()
    t0 = time.perf_counter()
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
    from mpk.runtime.build import build

    source = resolve_model(args.model)
    # The kernel depends on the op variants only (batch, widths, flags), not on the SM count or the
    # context length, so a small graph stands for every one of this model and batch.
    tg = compile_model(source.cfg, batch=args.batch, max_seq_len=min(64, source.cfg.max_position_embeddings),
                       num_sms=8, verify=False)
    t0 = time.perf_counter()
    path = build(generate_source(tg), args.arch, debug=args.debug or None)
    print(f"{source.name} batch {args.batch} for {args.arch}: {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_bench(args) -> int:
    from mpk.bench import format_bench, run_bench

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"stream", "mpk", "eager", "compile"}
    if unknown:
        raise MpkError(f"unknown backend(s) {', '.join(sorted(unknown))}; choose from stream, mpk, eager, compile")
    if args.profile and "mpk" not in backends:
        raise MpkError("--profile traces the mpk backend; include mpk in --backends")
    if args.steps < 1:
        raise MpkError(f"--steps must be at least 1, not {args.steps}")
    result = run_bench(args.model, batch=args.batch, steps=args.steps, backends=backends, profile=args.profile,
                       activations=args.activations, kv_cache=args.kv_cache, context=args.context)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def cmd_generate(args) -> int:
    from mpk.dtypes import torch_dtype
    from mpk.engine import check_prompts, generate
    from mpk.graph import shard_of
    from mpk.models import resolve_model

    source = resolve_model(args.model)
    tokenizer = source.tokenizer()
    prompts = _prompts(args, tokenizer)
    check_prompts(source.cfg, prompts, args.max_new_tokens)
    if args.num_sms is not None and args.num_sms < 1:
        raise MpkError(f"--num-sms must be at least 1, not {args.num_sms}")
    for rank in range(args.tp):
        shard_of(source.cfg, rank, args.tp)
    source.check()
    backend = _backend(args.backend)
    if backend == "cuda":
        from mpk.runtime import cuda_device

        cuda_device()  # no GPU, or too old a one: say so before loading anything
    where = "the GPU megakernel" if backend == "cuda" else "the CPU executor (sim; no GPU found)" if args.backend == "auto" \
        else "the CPU executor (sim)"
    acts = "float32" if args.activations == "float32" else args.dtype
    print(f"mpk: running {source.name} on {where}, {args.dtype} weights, {acts} activations", file=sys.stderr)
    hf = source.load_weights(torch_dtype(args.dtype), device="cuda" if backend == "cuda" else "cpu")

    stream = not args.json and len(prompts) == 1
    if stream:
        print(f"{source.name}: ", end="", flush=True)

    def on_tokens(seq: int, token: int) -> None:
        if stream:
            piece = tokenizer.decode([token]) if tokenizer is not None else f" {token}"
            print(piece, end="", flush=True)

    out = generate(source.cfg, hf, prompts, args.max_new_tokens, backend=backend, dtype=args.dtype, num_sms=args.num_sms,
                   tp_size=args.tp, seed=args.seed, stop_at_eos=not args.ignore_eos, on_tokens=on_tokens,
                   activations=args.activations, kv_cache=args.kv_cache)
    texts = [tokenizer.decode(ids) for ids in out.token_ids] if tokenizer is not None else None
    tokens_made = sum(len(t) for t in out.token_ids)
    if args.json:
        result = {"model": source.name, "backend": backend, "dtype": args.dtype, "steps": out.steps,
                  "seconds": round(out.seconds, 3),
                  "token_ids": out.token_ids[0] if len(prompts) == 1 else out.token_ids}
        if texts is not None:
            result["text"] = texts[0] if len(prompts) == 1 else texts
        print(json.dumps(result))
    else:
        if stream:
            print()
        else:
            for i, ids in enumerate(out.token_ids):
                print(f"[{i}] " + (texts[i] if texts is not None else " ".join(map(str, ids))))
        print(f"mpk: {tokens_made} tokens in {out.steps} steps, {out.seconds:.2f} s "
              f"({len(out.taskgraph.tasks)} tasks per step)", file=sys.stderr)
    return 0


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
        return [list(tokenizer(text)["input_ids"]) for text in args.prompt]
    prompts = []
    for spec in args.token_ids or [DEFAULT_TOKEN_IDS]:
        try:
            prompts.append([int(t) for t in spec.split(",") if t.strip()])
        except ValueError:
            raise MpkError(f"--token-ids takes comma-separated integers, not {spec!r}") from None
    return prompts


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
