"""Global loads that wait out each other's round trips, found in a model's megakernel SASS, without a GPU.

    python3 scripts/sass_serial_loads.py MODEL [--batch B] [--context N] [--tp N] [--top 30]

A load whose value is used before the next load of the same basic block is issued holds that next load
behind its own L2 round trip: the use stalls until the value arrives. In a loop that streams weights this
is the pipeline working (a round's loads, then its math); in a prologue it is a chain, such as a loop
that loads through a generic pointer and stores to shared memory, where nvcc may not move the next load
above a store that could alias it (one L2 round trip, ~0.6 us under load, per iteration). The report
counts each (load line, use line, next load line) triple; a prologue's lines among the first rows are
worth a look. Needs nvcc and nvdisasm (the nvidia-cuda-nvdisasm wheel) on the PATH.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpk.codegen import generate_source  # noqa: E402
from mpk.compiler import compile_model  # noqa: E402
from mpk.models import resolve_model  # noqa: E402
from mpk.runtime.build import find_nvcc, nvcc_flags  # noqa: E402

INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*);")
SOURCE_LINE = re.compile(r'//## File "(.*?)", line (\d+)')
REGISTER = re.compile(r"\bR(\d+)\b")
ENDS_BLOCK = ("BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT")  # a label starts one


def is_global_load(opcode: str) -> bool:
    """LDG or generic LD (not shared, local, constant, matrix or asynchronous copies)."""
    return opcode.split(".")[0] in ("LDG", "LD")


def width(opcode: str) -> int:
    """Registers a load writes: .64 two, .128 four."""
    return 4 if ".128" in opcode else 2 if ".64" in opcode else 1


def writes_first_operand(opcode: str) -> bool:
    return not opcode.split(".")[0] in ("ST", "STG", "STS", "STL", "RED", "BRA", "EXIT", "BAR", "MEMBAR", "CCTL")


def serial_loads(sass: str) -> Counter:
    """(load's source line, use's, next load's) -> how often a use comes between two loads of a block."""
    found: Counter = Counter()
    where = "?"
    pending: dict[int, tuple[int, str]] = {}  # register -> (load number, its source line)
    loads = 0
    used: list[tuple[str, str]] = []  # (load line, use line) since the last load
    for text in sass.splitlines():
        if m := SOURCE_LINE.search(text):
            where = f"{Path(m.group(1)).name}:{m.group(2)}"
            continue
        if text.strip().startswith(".L"):  # a label starts a block
            pending, used = {}, []
            continue
        m = INSTRUCTION.match(text)
        if not m:
            continue
        opcode, operands = m.group(1), m.group(2)
        regs = [int(r) for r in REGISTER.findall(operands)]
        if is_global_load(opcode):
            for load_line, use_line in used:
                found[(load_line, use_line, where)] += 1
            used = []
            sources = regs[1:]
            first = regs[0] if regs else None
        elif writes_first_operand(opcode):
            sources, first = regs[1:], regs[0] if regs else None
        else:
            sources, first = regs, None
        for r in sources:
            if r in pending:  # the load's first use: its other registers no longer count
                load, load_line = pending[r]
                used.append((load_line, where))
                pending = {k: v for k, v in pending.items() if v[0] != load}
        if first is not None:
            pending.pop(first, None)
            if is_global_load(opcode):
                loads += 1
                for k in range(width(opcode)):
                    pending[first + k] = (loads, where)
        if opcode.split(".")[0] in ENDS_BLOCK:
            pending, used = {}, []
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=64, help="the graph's context length (the attention variant)")
    ap.add_argument("--tp", type=int, default=1, help="the kernel of one rank of a tensor-parallel run")
    ap.add_argument("--num-sms", type=int, default=132)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    if not shutil.which("nvdisasm"):
        print("sass_serial_loads needs nvdisasm on the PATH (pip download nvidia-cuda-nvdisasm)", file=sys.stderr)
        return 1
    cfg = resolve_model(args.model).cfg
    tg = compile_model(cfg, batch=args.batch, max_seq_len=args.context, num_sms=args.num_sms, tp_size=args.tp,
                       verify=False)
    flags = [f for f in nvcc_flags("sm_90a", False) if f != "-shared"]
    with tempfile.TemporaryDirectory() as tmp:
        cu, cubin = Path(tmp) / "kernel.cu", Path(tmp) / "kernel.cubin"
        cu.write_text(generate_source(tg))
        proc = subprocess.run([find_nvcc(), *flags, "-cubin", str(cu), "-o", str(cubin)], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        sass = subprocess.run(["nvdisasm", "-g", "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    tp = f", tp {args.tp}" if args.tp > 1 else ""
    print(f"{args.model} batch {args.batch}{tp}, context {args.context}: loads used before the next load of their block")
    print(f"{'times':>5}  load -> first use -> next load")
    for (load, use, nxt), n in serial_loads(sass).most_common(args.top):
        print(f"{n:>5}  {load} -> {use} -> {nxt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
