#!/usr/bin/env bash
# A/B step times of trees made by scripts/ab_trees.sh, on one GPU, then a table (scripts/ab_table.py).
#   scripts/ab_bench.sh GPU "ROW ..." "TREE ..." [FIRST_REP [LAST_REP]]
# ROW is model:batch:steps[:context]; TREE is a tree's name, or NAME@KEY=VALUE[,KEY=VALUE...] to build
# that tree with those environment variables set (build knobs such as MPK_GEMV=simt). For each rep
# and row every tree runs once, one `mpk bench --backends mpk --json` process each, in turn, the order
# reversed on even reps; run reps 1 and 2 on two GPUs at once to alternate there too. JSON lands in
# $OUT/ab (OUT defaults to .bench/out).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1  # never NVLink multicast
gpu=$1 rows=$2 trees=$3 first=${4:-1} last=${5:-${4:-1}}
dir=${AB_TREES:-.bench/trees} out=${OUT:-.bench/out}/ab
[[ $dir = /* ]] || dir=$PWD/$dir
[[ $out = /* ]] || out=$PWD/$out
mkdir -p "$out"
for rep in $(seq "$first" "$last"); do
  order=$trees
  [ $((rep % 2)) = 0 ] && order=$(tr ' ' '\n' <<< "$trees" | tac | tr '\n' ' ')
  for row in $rows; do
    IFS=: read -r model batch steps context <<< "$row"
    for spec in $order; do
      tree=${spec%%@*} knob=()
      [ "$spec" != "$tree" ] && IFS=, read -ra knob <<< "${spec#*@}"
      json="$out/${spec//[^A-Za-z0-9_-]/_}.$model.b$batch.s$steps.c${context:-0}.g$gpu.r$rep.json"  # names the device tool returns
      (cd "$dir/$tree" && env "${knob[@]}" CUDA_VISIBLE_DEVICES="$gpu" timeout 300 python3 -m mpk.cli bench "$model" \
        --batch "$batch" --steps "$steps" --context "${context:-0}" --backends mpk --json > "$json" 2> "$json.err") \
        || { echo "ab_bench: $spec $row failed:"; tail -2 "$json.err"; }
    done
  done
done
