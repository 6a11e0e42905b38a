"""Registers, spills and code size of a model's megakernel, from ptxas, without a GPU (as `mpk build`
compiles it).

    python3 scripts/ptxas_report.py MODEL [--batch B] [--tp N] [--max-seq-len N] [--arch sm_90a] [--per-variant]

Build knobs in the environment (MPK_GEMV, MPK_HEAD_KB, ...) apply as in any build. A change that
makes the kernel spill or grow a stack frame is worth a look before it goes to a GPU. The code size (the
kernel's .text section) needs cuobjdump on the PATH; the kernel is several times an SM's
instruction cache (docs/perf.md). --per-variant also builds the kernel once per op variant, the
dispatch holding that variant alone, and prints each one's code above the runtime's own.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpk.codegen import generate_source  # noqa: E402
from mpk.compiler import compile_model  # noqa: E402
from mpk.models import resolve_model  # noqa: E402
from mpk.runtime.build import find_nvcc, nvcc_flags  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--num-sms", type=int, default=132)
    ap.add_argument("--max-seq-len", type=int, default=64,
                    help="the graph's context: past 256 positions attention splits (mpk.graph.attention_splits)")
    ap.add_argument("--per-variant", action="store_true", help="code size of each op variant (needs cuobjdump)")
    args = ap.parse_args()
    cfg = resolve_model(args.model).cfg
    tg = compile_model(cfg, batch=args.batch, max_seq_len=args.max_seq_len, num_sms=args.num_sms, tp_size=args.tp, verify=False)
    source = generate_source(tg)
    flags = [f for f in nvcc_flags(args.arch, False) if f != "-shared"]
    rc, out, code = build(source, flags)
    if rc:
        print(out[-3000:], file=sys.stderr)
        return 1
    for name, body in re.findall(r"Compiling entry function '(\w+)'.*?\n(.*?)(?=ptxas info    : Compiling|\Z)", out, re.S):
        regs = re.search(r"Used (\d+) registers", body)
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body)
        size = f", {code[name] // 1024} KB of code" if name in code else ""
        # The stack frame counts what ptxas places in local memory besides its spills (arrays it cannot
        # keep in registers): a kernel may report 4 bytes of spills and still read hundreds from the stack.
        print(f"{args.model} batch {args.batch}{f' tp {args.tp}' if args.tp > 1 else ''} {name}: "
              f"{regs.group(1) if regs else '?'} registers, {spill.group(1)} B stack frame, spills {spill.group(2)} B "
              f"stored / {spill.group(3)} B loaded{size}" if spill else name)
    if args.per_variant:
        return per_variant(source, flags)
    return 0


def build(source: str, flags: list[str]) -> tuple[int, str, dict[str, int]]:
    """nvcc -c of `source`: its return code, ptxas's report and the kernels' code bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        cu, obj = Path(tmp) / "kernel.cu", Path(tmp) / "kernel.o"
        cu.write_text(source)
        proc = subprocess.run([find_nvcc(), *flags, "-Xptxas", "-v", "-c", str(cu), "-o", str(obj)],
                              capture_output=True, text=True)
        return proc.returncode, proc.stdout + proc.stderr, code_bytes(obj) if proc.returncode == 0 else {}


def per_variant(source: str, flags: list[str]) -> int:
    """Each variant's code: the kernel with only its dispatch case, less the kernel with none."""
    if not shutil.which("cuobjdump"):
        print("--per-variant needs cuobjdump on the PATH", file=sys.stderr)
        return 1
    case = re.compile(r"^ +case (\d+): V\d+::run\(t, op, smem\); break;\n", re.M)  # a dispatch case
    cases = case.findall(source)
    declared = dict(re.findall(r"^using V(\d+) = (.*);$", source, re.M))

    def only(keep: str | None) -> str:
        return case.sub(lambda m: m.group(0) if m.group(1) == keep else "", source)

    with ThreadPoolExecutor(max_workers=4) as pool:
        sizes = list(pool.map(lambda keep: sum(build(only(keep), flags)[2].values()), [None, *cases]))
    print(f"{'KB':>6}  variant (the runtime alone: {sizes[0] // 1024} KB)")
    for i, size in zip(cases, sizes[1:]):
        print(f"{(size - sizes[0]) // 1024:>6}  V{i} = {declared[i]}")
    return 0


def code_bytes(obj: Path) -> dict[str, int]:
    """Bytes of each kernel's .text section in a CUDA object file, from `cuobjdump -elf` (empty without it)."""
    if not shutil.which("cuobjdump"):
        return {}
    elf = subprocess.run(["cuobjdump", "-elf", str(obj)], capture_output=True, text=True).stdout
    # Section header rows: index, offset, size (hex), ..., PROGBITS, ..., name.
    return {m.group(2): int(m.group(1), 16)
            for m in re.finditer(r"^\s*\w+\s+\w+\s+(\w+)\s+.*PROGBITS.*\s\.text\.(\w+)$", elf, re.M)}


if __name__ == "__main__":
    sys.exit(main())
