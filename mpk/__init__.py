"""mpk: compile the decode step of a transformer LM into one persistent GPU megakernel.

Data flow (each arrow is a module boundary):
    models -> graph -> compiler -> sim | codegen/runtime -> engine -> cli
"""

from mpk.errors import MpkError

__all__ = ["MpkError"]
__version__ = "0.1.0"
