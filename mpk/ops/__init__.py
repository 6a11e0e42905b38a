"""The fused decode op kinds, by name: each module's OpKind subclasses register themselves."""

import importlib
import pkgutil

from mpk.ops.base import REGISTRY, Cuda, OpKind, Operand, TileTask

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

OP_KINDS: dict[str, OpKind] = REGISTRY

__all__ = ["OP_KINDS", "Cuda", "OpKind", "Operand", "TileTask"]
