"""The GPU runtime: build the generated megakernel (nvcc, cached), load it, run it, stream tokens.

Modules: `build` (nvcc and the build cache), `abi` (the library's structs and constants), `tables`
(a graph's device tables), `megakernel` (one launch per GPU, token streaming), `watchdog` (stall diagnosis).
"""

from __future__ import annotations

from mpk.runtime.megakernel import Megakernel, cuda_device, rank_devices

__all__ = ["Megakernel", "cuda_device", "rank_devices"]
