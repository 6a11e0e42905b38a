"""What `mpk serve` costs on the host alone: the server with every decode step replaced by a sleep.

    python scripts/serve_host_overhead.py STEP_MS [--port P] [--slots N]

serves the `tiny` preset on the CPU executor, but each window's steps only sleep STEP_MS (no GIL
held, as a GPU step) and give every slot one token; prompts are not prefilled. Load it with
`mpk bench-serve http://127.0.0.1:P --clients N --prompt-len 4 ...`: the time per output token
above STEP_MS is the host's (batcher, HTTP, streaming), and /metrics splits the engine's time.
"""

from __future__ import annotations

import argparse
import time

import uvicorn

from mpk import LLM
from mpk.execution import RunResult
from mpk.serve import create_app
from mpk.sim import CpuExecutor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step_ms", type=float, help="milliseconds each decode step sleeps")
    ap.add_argument("--port", type=int, default=8411)
    ap.add_argument("--slots", type=int, default=64, help="the server's --max-batch")
    args = ap.parse_args()

    def sleeping_run(self, num_steps, max_new_tokens=None, on_step=None, *, first_step=0, **_):
        tokens = [7] * self.tg.batch
        for s in range(num_steps):
            time.sleep(args.step_ms / 1e3)
            if on_step is not None and on_step(first_step + s, tokens):
                return RunResult([tokens] * (s + 1), s + 1, 0.0, True)
        return RunResult([tokens] * num_steps, num_steps, 0.0, False)

    CpuExecutor.run = sleeping_run
    llm = LLM("tiny", backend="sim", max_batch=args.slots, max_seq_len=1024, prefill=False)
    uvicorn.run(create_app(llm, "tiny", max_waiting=4 * args.slots), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
