"""mpk: compile the decode step of a transformer LM into one persistent GPU megakernel.

Data flow (each arrow is a module boundary):
    models -> graph -> compiler -> sim | codegen/runtime -> engine -> api -> cli

`from mpk import LLM, SamplingParams` loads the API (and torch) on first use, so `import mpk` stays light.
"""

from mpk.errors import MpkError

__all__ = ["LLM", "MpkError", "SamplingParams"]
__version__ = "0.1.0"

_API = ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput")


def __getattr__(name: str):
    if name in _API:
        from mpk import api

        return getattr(api, name)
    raise AttributeError(f"module 'mpk' has no attribute {name!r}")
