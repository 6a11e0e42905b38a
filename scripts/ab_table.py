"""The table of scripts/ab_bench.sh's runs: one line per row, one column per tree, every run's ms per step.

    python3 scripts/ab_table.py DIR      # DIR: $OUT/ab
"""

import collections
import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    runs = collections.defaultdict(list)
    for path in sorted(Path(folder).glob("*.json")):
        tree, rest = path.name.split(".", 1)
        row = rest.rsplit(".g", 1)[0]
        try:
            result = json.loads(path.read_text())
        except ValueError:
            continue  # a run that failed wrote no JSON; its .err says why
        ms = [r["ms_per_step"] for r in result["rows"] if r["name"] == "mpk"]
        if ms:
            runs[row, tree].append(ms[0])
    rows = sorted({r for r, _ in runs})
    trees = sorted({t for _, t in runs})
    width = max([len(t) for t in trees] + [16]) + 2
    print("ms per step".ljust(36) + "".join(t.rjust(width) for t in trees))
    for row in rows:
        cells = (", ".join(f"{v:.3f}" for v in sorted(runs[row, t])) if (row, t) in runs else "-" for t in trees)
        print(row.ljust(36) + "".join(c.rjust(width) for c in cells))


if __name__ == "__main__":
    main(sys.argv[1])
