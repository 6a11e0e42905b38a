"""Registers, spills and code size of a model's megakernel, from ptxas, without a GPU (as `mpk build`
compiles it).

    python3 scripts/ptxas_report.py MODEL [--batch B] [--tp N] [--arch sm_90a]

Build knobs in the environment (MPK_GEMV, MPK_HEAD_KB, ...) apply as in any build. A change that
makes the kernel spill, or spill more, is worth a look before it goes to a GPU. The code size (the
kernel's .text section) needs cuobjdump on the PATH; the kernel is several times an SM's
instruction cache (docs/perf.md).
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
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
    args = ap.parse_args()
    cfg = resolve_model(args.model).cfg
    tg = compile_model(cfg, batch=args.batch, max_seq_len=64, num_sms=args.num_sms, tp_size=args.tp, verify=False)
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / "kernel.cu"
        cu.write_text(generate_source(tg))
        flags = [f for f in nvcc_flags(args.arch, False) if f != "-shared"]
        obj = Path(tmp) / "kernel.o"
        proc = subprocess.run([find_nvcc(), *flags, "-Xptxas", "-v", "-c", str(cu), "-o", str(obj)],
                              capture_output=True, text=True)
        code = code_bytes(obj) if proc.returncode == 0 else {}
    out = proc.stdout + proc.stderr
    if proc.returncode:
        print(out[-3000:], file=sys.stderr)
        return 1
    for name, body in re.findall(r"Compiling entry function '(\w+)'.*?\n(.*?)(?=ptxas info    : Compiling|\Z)", out, re.S):
        regs = re.search(r"Used (\d+) registers", body)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        size = f", {code[name] // 1024} KB of code" if name in code else ""
        print(f"{args.model} batch {args.batch}{f' tp {args.tp}' if args.tp > 1 else ''} {name}: "
              f"{regs.group(1) if regs else '?'} registers, spills {spill.group(1)} B stored / {spill.group(2)} B loaded"
              f"{size}" if spill else name)
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
