"""The host watchdog's diagnosis: from the per-SM progress words, who waits on what.

Each SM publishes (sequence number, task, step, event, state) in host-mapped memory whenever it
starts waiting or leaves. When the words stop changing, the earliest wait in topological order
(task ids are one) is the root cause; the rest follow from it.
"""

from __future__ import annotations

import numpy as np

from mpk.runtime.abi import Abi
from mpk.runtime.tables import polled_events
from mpk.taskgraph import TaskGraph


def stall_report(tg: TaskGraph, abi: Abi, words: list[np.ndarray], state: int, counters: list[list[int]] | None,
                 first_step: int) -> str:
    """One line naming up to four SMs in `state` (waiting, or aborted while waiting), earliest first.
    `words` and `counters` hold one entry per tensor-parallel rank. An SM aborted inside a task
    (event -1) was stuck there: it comes first, as the cause."""
    stuck = []
    for rank, w in enumerate(words):
        w = w.reshape(tg.num_sms, abi.kProgressWords)
        stuck += [(rank, sm, w[sm]) for sm in range(tg.num_sms) if w[sm, abi.kPrState] == state]
    stuck.sort(key=lambda s: (int(s[2][abi.kPrEvent]) >= 0, int(s[2][abi.kPrStep]), int(s[2][abi.kPrTask])))
    polled = polled_events(tg)
    parts = []
    for rank, sm, w in stuck[:4]:
        task, step, ev = (int(w[k]) for k in (abi.kPrTask, abi.kPrStep, abi.kPrEvent))
        where = f"rank {rank} SM {sm}" if tg.tp_size > 1 else f"SM {sm}"
        if ev < 0:
            parts.append(f"{where} was stuck inside {tg.describe_task(task)} in step {step}")
            continue
        e = tg.events[ev]
        need = e.target * (step - first_step + 1 - e.lag)
        have = f"{counters[rank][ev]}/{need}" if counters is not None else f"?/{need}"
        if polled[ev]:
            have = "its producers' tagged words of that step, not all there"
        parts.append(f"{where} waits in step {step} with {tg.describe_task(task)} on event {ev} ({have})")
    more = f" and {len(stuck) - 4} more SMs" if len(stuck) > 4 else ""
    return "; ".join(parts) + more if parts else "no SM reported a wait"
