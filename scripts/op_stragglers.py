"""Are an op's slowest tasks on the same SMs every time, or on different ones by chance?

    mpk bench MODEL --batch B --steps 12 --backends mpk --profile trace.json
    python3 scripts/op_stragglers.py trace.json

Per GEMV op kind, from the trace's task spans: each queue's task time over its op instance's median,
averaged over every layer and step (the slowest queues and the spread of those averages); how the
averages of even and odd steps correlate (near 1: the same SMs are slow every time); and how far the
last task of an op instance ends after its median one. A tail that is chance can only be taken off by
balancing at run time; a systematic one also by sizing tiles per SM.
"""

import collections
import json
import statistics as st
import sys


def main(path: str) -> None:
    spans = [e for e in json.load(open(path))["traceEvents"] if e.get("ph") == "X" and e.get("cat") != "wait"]
    by_instance = collections.defaultdict(list)
    for e in spans:
        by_instance[(e["name"], e["args"]["step"])].append(e)
    for kind in sorted({e["cat"] for e in spans}):
        ratios = collections.defaultdict(lambda: ([], []))  # queue -> ratios on even steps, on odd steps
        last_queues, tails, excess = collections.Counter(), [], []
        for (_, step), tasks in by_instance.items():
            if tasks[0]["cat"] != kind or len(tasks) < 64:  # the GEMVs and the LM head: a task per SM
                continue
            median = st.median(e["dur"] for e in tasks)
            for e in tasks:
                ratios[e["tid"]][step % 2].append(e["dur"] / median)
            ends = sorted(e["ts"] + e["dur"] for e in tasks)
            tails.append(ends[-1] - ends[len(ends) // 2])
            last = max(tasks, key=lambda e: e["ts"] + e["dur"])
            last_queues[last["tid"]] += 1
            excess.append(last["dur"] - median)
        if not tails:
            continue
        both = [q for q, (even, odd) in ratios.items() if even and odd]
        corr = st.correlation([st.mean(ratios[q][0]) for q in both], [st.mean(ratios[q][1]) for q in both]) \
            if len(both) > 2 else float("nan")
        means = sorted((st.mean(ratios[q][0] + ratios[q][1]), q) for q in ratios)
        print(f"{kind}: {len(tails)} op instances on {len(means)} queues; a queue's mean time / median: "
              f"min {means[0][0]:.3f}, p10 {means[len(means) // 10][0]:.3f}, p90 {means[9 * len(means) // 10][0]:.3f}, "
              f"max {means[-1][0]:.3f}; even/odd-step correlation {corr:.2f}")
        print(f"  last end - median end {st.median(tails):.2f} us (median over instances); the last task's time - "
              f"median {st.median(excess):.2f} us; queues most often last: {last_queues.most_common(6)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
