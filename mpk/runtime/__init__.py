"""The GPU runtime: build the generated megakernel (nvcc, cached), load it, run it, stream tokens.

Modules: `mpk.runtime.build` (nvcc and the build cache), `mpk.runtime.megakernel` (launch, token
streaming, watchdog).
"""

from __future__ import annotations

from mpk.runtime.megakernel import Megakernel, RunResult, allocate, cuda_device


def build_kernel(tg, arch: str | None = None, debug: bool | None = None):
    """Generate and build (or find in the cache) the megakernel of TaskGraph `tg`; returns the .so path."""
    from mpk.codegen import generate_source
    from mpk.runtime.build import DEFAULT_ARCH, build

    return build(generate_source(tg), arch or DEFAULT_ARCH, debug)


__all__ = ["Megakernel", "RunResult", "allocate", "build_kernel", "cuda_device"]
