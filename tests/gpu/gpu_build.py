"""The module-level skip every GPU test module that builds a megakernel starts with."""

import pytest
import torch

from mpk.errors import MpkError


def require_gpu_build() -> None:
    """Skip the calling test module unless a CUDA GPU and nvcc (to build the kernel) are present."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
    from mpk.runtime.build import find_nvcc

    try:
        find_nvcc()
    except MpkError as e:
        pytest.skip(str(e), allow_module_level=True)
