"""The one table of element types: names as the TaskGraph spells them, their size, torch and CUDA types.

A TaskGraph names every tensor's dtype explicitly ("bfloat16", "float32", ...); everything that
needs a size, a torch dtype or a device type looks it up here.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpk.errors import MpkError


@dataclass(frozen=True)
class DType:
    name: str  # as in TensorSpec.dtype, and torch's attribute name
    bytes: int
    cuda: str  # the element type in mpk/csrc

    @property
    def torch(self):
        import torch  # lazy: the table is needed by code that never touches a tensor

        return getattr(torch, self.name)


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("bfloat16", 2, "bf16"),
    DType("float16", 2, "half"),
    DType("float32", 4, "float"),
    DType("int64", 8, "long long"),
)}

WEIGHT_DTYPES = ("bfloat16", "float16", "float32")


def dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise MpkError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def torch_dtype(name: str):
    return dtype(name).torch


def dtype_name(torch_dtype) -> str:
    """The table's name of a torch dtype (torch.bfloat16 -> "bfloat16")."""
    name = str(torch_dtype).removeprefix("torch.")
    dtype(name)
    return name
