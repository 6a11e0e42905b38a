#!/usr/bin/env bash
# GPU check: run the megakernel tests (tests/gpu) and the codegen/build tests on this machine's GPU,
# then print a short table. Needs nvcc, torch with CUDA, transformers; no network, no pip install.
#   scripts/gpu_check.sh [extra pytest args]
# MPK_DEBUG=1 builds the kernels with device asserts; MPK_CACHE_DIR picks the build cache.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1  # never NVLink multicast
export MPK_CACHE_DIR="${MPK_CACHE_DIR:-$(mktemp -d)/mpk-cache}"
report="$(mktemp)"
export MPK_GPU_REPORT="$report"

python3 - <<'PY'
import subprocess, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
else:
    print("GPU: none visible to torch")
print(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
PY

python3 -m pytest -q -rfEs --durations=12 tests/gpu tests/test_codegen.py "$@"
status=$?

python3 - "$report" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("\ncheck     case                   batch  result")
for r in rows:
    if r["check"] == "logits":
        res = (f"vs bf16 sim {r['vs_sim']:.1e} (max); vs fp32 ref {r['vs_fp32']:.1e} (L2), {r['vs_fp32_max']:.1e} (max); "
               f"bf16 sim vs fp32 {r['sim_vs_fp32']:.1e} (L2)")
    elif r["check"] == "preset":
        res = (f"vs fp32 ref {r['vs_fp32']:.1e} (L2), {r['vs_fp32_max']:.1e} (max); "
               f"{r['mismatches']} mismatches, {r['near_ties']} near-ties in {r['tokens']} tokens")
    elif r["check"] == "greedy":
        res = f"{r['mismatches']} mismatches, {r['near_ties']} near-ties in {r['tokens']} tokens"
    else:
        res = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                        if k not in ("check", "case", "batch"))
    if r["check"] in ("logits", "preset") and "vs_fp32_same_kv" in r:  # the float32 reference with the graph's cache
        res += f"; vs fp32 ref, same KV dtype {r['vs_fp32_same_kv']:.1e} (L2)"
    print(f"{r['check']:<9} {r['case']:<22} {r['batch']:>5}  {res}")
PY
rm -f "$report"
echo "pytest exit status: $status"
exit $status
