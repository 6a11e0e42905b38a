#!/usr/bin/env bash
# One GPU-machine session: the GPU tests, `mpk bench` and `mpk bench-op` for the models the perf log tracks.
#   scripts/gpu_session.sh           # all three (~14 min on an H100): logs, then the three tables last
#   scripts/gpu_session.sh tests     # tests/gpu + codegen builds, table last (~5 min)
#   scripts/gpu_session.sh bench     # mpk bench over BENCH_ROWS (model:batch:context; default the decode table of
#                                    # docs/perf.md: qwen3-8b and llama-3.2-1b at 1 and 4, qwen3-0.6b at 1, qwen3-8b at
#                                    # 1 and 4 over 4096 cached tokens; ~12 min with torch.compile, so split the rows)
#   scripts/gpu_session.sh ops       # mpk bench-op: every task template alone, OPS_MODELS at batch 1 and 4 (~4 min)
#   scripts/gpu_session.sh tp        # 2+ GPUs: mpk bench --tp N (TP_SIZES, 2) of TP_MODELS at TP_BATCHES (1) beside one
#                                    # GPU, each profiled (~3 min at TP=2). On 4 or 8 GPUs: TP_SIZES="4 8"
#                                    # TP_MODELS="qwen3-8b qwen3-32b llama-3.1-70b" TP_BATCHES="1 8", and
#                                    # pytest tests/gpu/test_tensor_parallel_wide.py
#   scripts/gpu_session.sh ttft      # time to first token, 1 x PROMPT_LEN (2048) and 8 x 512 prompts: mpk vs batched PyTorch
#   scripts/gpu_session.sh prefill   # the persistent runtime's prefill: its templates alone (bench-op --prefill
#                                    # PROMPT_LEN), then time to first token of 1 x PROMPT_LEN, op by op vs task graphs (~4 min)
#   scripts/gpu_session.sh serve     # mpk serve SERVE_MODEL (qwen3-8b) under bench-serve: 1 client, then CLIENTS (64)
#                                    # for DURATION (300) s; PyTorch eager at batch CLIENTS beside it. A machine
#                                    # without fastapi/uvicorn can take them from ./.deps (pip install --target .deps).
# Bench knobs: BENCH_ROWS, STEPS (64), BACKENDS (all four), ACTIVATIONS (the CLI's default, float32), MPK_GEMV.
# bench-op knobs: OPS_MODELS (qwen3-8b llama-3.2-1b qwen3-0.6b), OPS (--op kinds, comma-separated), CONTEXT (4096),
# ACTIVATIONS.
# Logs and JSON go to $OUT when set (the device tool brings that folder back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1  # never NVLink multicast
out="${OUT:-$(mktemp -d)}"

run_tests() {
  scripts/gpu_check.sh > "$out/gpu_tests.log" 2>&1
}

# The rows of the decode table the project is judged by: model, batch, context (tokens already cached).
BENCH_ROWS=${BENCH_ROWS:-"qwen3-8b:1:0 qwen3-8b:4:0 llama-3.2-1b:1:0 llama-3.2-1b:4:0 qwen3-0.6b:1:0 qwen3-8b:1:4096 qwen3-8b:4:4096"}

run_bench() {
  local status=0 row model batch context name
  for row in $BENCH_ROWS; do
    IFS=: read -r model batch context <<< "$row"
    name="bench-$model-b$batch-c$context"
    python3 -m mpk.cli bench "$model" --batch "$batch" --context "$context" --steps "${STEPS:-64}" \
      --backends "${BACKENDS:-stream,mpk,eager,compile}" ${ACTIVATIONS:+--activations "$ACTIVATIONS"} --json \
      > "$out/$name.json" 2> "$out/$name.err" || { status=1; tail -3 "$out/$name.err"; }
  done
  return $status
}

run_ops() {
  local status=0
  for model in ${OPS_MODELS:-qwen3-8b llama-3.2-1b qwen3-0.6b}; do
    for batch in 1 4; do
      python3 -m mpk.cli bench-op "$model" --batch "$batch" ${OPS:+--op "$OPS"} ${CONTEXT:+--context "$CONTEXT"} \
        ${ACTIVATIONS:+--activations "$ACTIVATIONS"} --json \
        > "$out/ops-$model-b$batch.json" 2> "$out/ops-$model-b$batch.err" || { status=1; tail -3 "$out/ops-$model-b$batch.err"; }
    done
  done
  return $status
}

run_tp() {
  local status=0 model tp batch name
  for tp in ${TP_SIZES:-2}; do
    for model in ${TP_MODELS:-qwen3-8b llama-3.1-8b}; do
      for batch in ${TP_BATCHES:-1}; do
        name="bench-tp$tp-$model-b$batch"
        python3 -m mpk.cli bench "$model" --tp "$tp" --batch "$batch" --steps "${STEPS:-64}" --backends stream,mpk \
          --profile "$out/trace.json" --json > "$out/$name.json" 2> "$out/$name.err" \
          || { status=1; tail -3 "$out/$name.err"; }
        rm -f "$out/trace.json"  # the profile's summary (the allreduce's share) is in the JSON; the trace is large
      done
    done
  done
  return $status
}

run_ttft() {
  local status=0 batch len
  for shape in "1 ${PROMPT_LEN:-2048}" "8 512"; do
    read -r batch len <<< "$shape"
    python3 -m mpk.cli bench "${TTFT_MODEL:-qwen3-8b}" --batch "$batch" --prompt-len "$len" --backends mpk,eager \
      > "$out/ttft-b$batch-$len.txt" 2> "$out/ttft-b$batch-$len.err" \
      || { status=1; tail -3 "$out/ttft-b$batch-$len.err"; continue; }
    cat "$out/ttft-b$batch-$len.txt"
  done
  return $status
}

run_prefill() {
  local status=0 model="${TTFT_MODEL:-qwen3-8b}" len="${PROMPT_LEN:-2048}"
  python3 -m mpk.cli bench-op "$model" --prefill "$len" --steps 3 --repeats 2 --json \
    > "$out/ops-prefill-$model.json" 2> "$out/ops-prefill-$model.err" || { status=1; tail -3 "$out/ops-prefill-$model.err"; }
  python3 -m mpk.cli bench "$model" --prompt-len "$len" --backends mpk,mpk-graph,eager \
    > "$out/ttft-graph-$len.txt" 2> "$out/ttft-graph-$len.err" || { status=1; tail -3 "$out/ttft-graph-$len.err"; }
  cat "$out/ttft-graph-$len.txt"
  return $status
}

run_serve() {
  [ -d .deps ] && export PYTHONPATH="$PYTHONPATH:$PWD/.deps"
  local port=8123 model="${SERVE_MODEL:-qwen3-8b}" status=0
  python3 -m mpk.cli serve "$model" --max-batch "${MAX_BATCH:-64}" --max-seq-len 2048 --port $port > "$out/serve.log" 2>&1 &
  local server=$!
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
  python3 -m mpk.cli bench-serve "http://127.0.0.1:$port" --clients 1 --requests 4 --prompt-len 512 --output-len 256 \
    || status=1
  python3 -m mpk.cli bench-serve "http://127.0.0.1:$port" --clients "${CLIENTS:-64}" --duration "${DURATION:-300}" \
    --prompt-len 512 --output-len 256 || status=1
  curl -s "http://127.0.0.1:$port/metrics" | grep -E "^mpk_(engine_seconds|decode_|generation_tokens_total|kv_blocks)"
  kill $server; wait $server 2> /dev/null
  python3 -m mpk.cli bench "$model" --steps 64 --backends mpk || status=1
  python3 -m mpk.cli bench "$model" --batch "${CLIENTS:-64}" --context 640 --steps 16 --backends eager || status=1
  [ $status = 0 ] || tail -5 "$out/serve.log"
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

print_ops_tables() {
  python3 - "$out" <<'PY'
import glob, json, sys
from mpk.opbench.report import format_op_bench
for path in sorted(glob.glob(f"{sys.argv[1]}/ops-*.json")):
    try:
        print(format_op_bench(json.load(open(path))))
    except (ValueError, KeyError):
        print(f"{path}: no result")
PY
}

case "${1:-all}" in
  tests) run_tests; t=$?; print_test_table; exit $t ;;
  bench) run_bench; b=$?; print_bench_tables; exit $b ;;
  ops) run_ops; o=$?; print_ops_tables; exit $o ;;
  tp) run_tp; p=$?; print_bench_tables; exit $p ;;
  ttft) run_ttft; exit $? ;;
  prefill) run_prefill; r=$?; print_ops_tables; exit $r ;;
  serve) run_serve; exit $? ;;
  all)
    run_tests; t=$?
    run_bench; b=$?
    run_ops; o=$?
    echo; print_test_table; echo; print_bench_tables; echo; print_ops_tables
    exit $(( t || b || o )) ;;
  *) echo "usage: $0 [all|tests|bench|ops|tp|ttft|prefill|serve]" >&2; exit 2 ;;
esac
