#!/usr/bin/env bash
# One GPU-machine session: the GPU tests and `mpk bench` for the models the perf log tracks.
#   scripts/gpu_session.sh           # both (~10 min on an H100): test log, bench, then both tables last
#   scripts/gpu_session.sh tests     # tests/gpu + codegen builds, table last (~5 min)
#   scripts/gpu_session.sh bench     # mpk bench: qwen3-8b and llama-3.2-1b, batch 1 and 4 (~6 min)
# Bench knobs: STEPS (64), BACKENDS (all four), ACTIVATIONS (the CLI's default, float32), MPK_GEMV.
# Logs and JSON go to $OUT when set (the device tool brings that folder back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-$(mktemp -d)}"

run_tests() {
  scripts/gpu_check.sh > "$out/gpu_tests.log" 2>&1
}

run_bench() {
  local status=0
  for model in qwen3-8b llama-3.2-1b; do
    for batch in 1 4; do
      python3 -m mpk.cli bench "$model" --batch "$batch" --steps "${STEPS:-64}" --backends "${BACKENDS:-stream,mpk,eager,compile}" \
        ${ACTIVATIONS:+--activations "$ACTIVATIONS"} --json \
        > "$out/bench-$model-b$batch.json" 2> "$out/bench-$model-b$batch.err" || { status=1; tail -3 "$out/bench-$model-b$batch.err"; }
    done
  done
  return $status
}

print_test_table() {  # gpu_check.sh ends with the table and the pytest status
  grep -E "FAILED|ERROR|passed|failed" "$out/gpu_tests.log" | tail -8
  sed -n '/^check /,$p' "$out/gpu_tests.log"
}

print_bench_tables() {
  python3 - "$out" <<'PY'
import glob, json, sys
from mpk.bench import format_bench
for path in sorted(glob.glob(f"{sys.argv[1]}/bench-*.json")):
    try:
        print(format_bench(json.load(open(path))))
    except (ValueError, KeyError):
        print(f"{path}: no result")
PY
}

case "${1:-all}" in
  tests) run_tests; t=$?; print_test_table; exit $t ;;
  bench) run_bench; b=$?; print_bench_tables; exit $b ;;
  all)
    run_tests; t=$?
    run_bench; b=$?
    echo; print_test_table; echo; print_bench_tables
    exit $(( t || b )) ;;
  *) echo "usage: $0 [all|tests|bench]" >&2; exit 2 ;;
esac
