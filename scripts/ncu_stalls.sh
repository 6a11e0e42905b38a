#!/usr/bin/env bash
# Where the megakernel's warps stall, from the hardware counters (Nsight Compute; it reads them on
# Firecracker hosts only, see the device notes):
#   scripts/ncu_stalls.sh MODEL [BATCH [STEPS]]     # e.g. scripts/ncu_stalls.sh qwen3-8b 1 16
# Profiles the second mpk_kernel launch of `mpk bench MODEL --backends mpk` (the first is the
# warm-up) with the clocks left alone, replaying the whole application (the kernel's host-mapped
# flags and counters would not survive a kernel replay), and prints the warp-state section: the
# stall reasons per issued instruction (and, from the SourceCounters section, the sampled stalls per
# SASS instruction: `ncu -i REPORT --page source --csv --print-source sass`). "No Instruction" is the instruction cache, "Long Scoreboard"
# global and local memory, "Barrier" __syncthreads, "Membar" fences, "Sleeping" the event polls'
# back-off. The report lands in $OUT (or a temporary folder) as ncu-MODEL-bB.ncu-rep.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1  # never NVLink multicast
model=${1:?usage: scripts/ncu_stalls.sh MODEL [BATCH [STEPS]]} batch=${2:-1} steps=${3:-16}
out=${OUT:-$(mktemp -d)}
report="$out/ncu-$model-b$batch"
ncu --clock-control none --replay-mode application --kernel-name regex:mpk_kernel --launch-skip 1 --launch-count 1 \
  --section WarpStateStats --section SchedulerStats --section LaunchStats --section SourceCounters \
  --import-source yes --export "$report" --force-overwrite \
  python3 -m mpk.cli bench "$model" --batch "$batch" --steps "$steps" --backends mpk --quiet
ncu -i "$report.ncu-rep" --page details --print-details all
