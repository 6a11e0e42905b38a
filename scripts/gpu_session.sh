#!/usr/bin/env bash
# One device-machine session: the GPU tests, then `mpk bench` for the models the perf log tracks.
#   scripts/gpu_session.sh tests     # tests/gpu + codegen builds, table last
#   scripts/gpu_session.sh bench     # mpk bench: qwen3-8b and llama-3.2-1b, batch 1 and 4
# Bench knobs: STEPS (64), BACKENDS (all four), ACTIVATIONS (the CLI's default, float32), MPK_GEMV.
# Logs and JSON go to $OUT when set (the device tool brings that folder back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-$(mktemp -d)}"
case "${1:-tests}" in
  tests)
    scripts/gpu_check.sh 2>&1 | tee "$out/gpu_tests.log"
    exit "${PIPESTATUS[0]}" ;;
  bench)
    status=0
    for model in qwen3-8b llama-3.2-1b; do
      for batch in 1 4; do
        python3 -m mpk.cli bench "$model" --batch "$batch" --steps "${STEPS:-64}" --backends "${BACKENDS:-stream,mpk,eager,compile}" \
          ${ACTIVATIONS:+--activations "$ACTIVATIONS"} --json \
          > "$out/bench-$model-b$batch.json" 2> "$out/bench-$model-b$batch.err" || { status=1; tail -3 "$out/bench-$model-b$batch.err"; }
      done
    done
    python3 - "$out" <<'PY'
import glob, json, sys
from mpk.bench import format_bench
for path in sorted(glob.glob(f"{sys.argv[1]}/bench-*.json")):
    try:
        print(format_bench(json.load(open(path))))
    except (ValueError, KeyError):
        print(f"{path}: no result")
PY
    exit $status ;;
esac
