#!/usr/bin/env bash
# Package revisions of mpk as trees for scripts/ab_bench.sh, on a machine with the git history.
#   scripts/ab_trees.sh NAME=REV ...     # e.g. main=HEAD new=my-branch; REV "." is the working tree
# Each tree is DIR/NAME (DIR = $AB_TREES, default .bench/trees) with mpk/, tests/ and scripts/; keep
# DIR out of git (.git/info/exclude) and carry it to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${AB_TREES:-.bench/trees}
for spec in "$@"; do
  name=${spec%%=*} rev=${spec#*=}
  [[ "$spec" == *=* && -n "$name" ]] || { echo "ab_trees: expected NAME=REV, not '$spec'" >&2; exit 2; }
  rm -rf "${dir:?}/$name" && mkdir -p "$dir/$name"
  if [ "$rev" = . ]; then
    cp -r mpk tests scripts "$dir/$name/"
    find "$dir/$name" -name __pycache__ -prune -exec rm -rf {} +
  else
    git archive "$rev" mpk tests scripts | tar -x -C "$dir/$name"
  fi
  echo "$name: $rev -> $dir/$name"
done
