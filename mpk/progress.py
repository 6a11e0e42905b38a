"""Progress on stderr for the phases of a run that take seconds: loading weights, compiling, nvcc, generating.

A phase that ends within SHOW_AFTER_S shows nothing. On a terminal a longer one shows a tqdm bar
(a running clock when its size is unknown); when stderr is not a terminal it prints one line as
it ends instead, so logs get no carriage returns. Off until the CLI turns it on, so library
callers stay silent.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

SHOW_AFTER_S = 2.0
TICK_S = 0.25  # how often a shown clock or bar is redrawn while nothing else updates it

_enabled = False


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


class Phase:
    """One phase: `update(n)` as work is done (when its `total` is known)."""

    def __init__(self, desc: str, total: float | None = None, unit: str = "", unit_scale: bool = False):
        self.desc, self.unit, self.unit_scale, self.n = desc, unit, unit_scale, 0
        self._start = time.monotonic()
        self._bar = self._ticker = None
        self.closed = False
        if not _enabled or not sys.stderr.isatty():
            return
        from tqdm import tqdm

        fmt = None if total else "{desc} [{elapsed}]"
        # miniters=0: every update(0) from the ticker may redraw (tqdm still waits for `delay` first).
        self._bar = tqdm(total=total, desc=desc, unit=unit or "it", unit_scale=unit_scale, delay=SHOW_AFTER_S,
                         miniters=0, bar_format=fmt, file=sys.stderr, dynamic_ncols=True, leave=True)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """End the phase (a second call does nothing)."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._stop.set()
            self._ticker.join()
            self._bar.close()
            self._bar = None
            return
        seconds = time.monotonic() - self._start
        if _enabled and seconds >= SHOW_AFTER_S:
            print(f"mpk: {self.desc}: {seconds:.1f} s{self._rate(seconds)}", file=sys.stderr, flush=True)

    def _rate(self, seconds: float) -> str:
        if not (self.unit and self.n):
            return ""
        if self.unit_scale:
            from tqdm import tqdm

            return f", {tqdm.format_sizeof(self.n / seconds, self.unit, 1024)}/s"
        return f", {self.n / seconds:.1f} {self.unit}/s"

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            self._bar.update(0)


@contextmanager
def phase(desc: str, total: float | None = None, unit: str = "", unit_scale: bool = False):
    p = Phase(desc, total, unit, unit_scale)
    try:
        yield p
    finally:
        p.close()
