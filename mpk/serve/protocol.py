"""The request bodies of OpenAI's completions and chat completions, as far as mpk serves them.

Types are strict (a string where a number belongs is a 400, not a guess), and a parameter the
server does not know is refused, so a client never silently gets something other than it asked for.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Parameters both endpoints share; top_k and ignore_eos are extensions (as vLLM has them)."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    # Accepted only at their "off" values: the engine cannot honour anything else yet.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # e.g. an assistant turn's "refusal": null
    role: str
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Union[str, dict, None] = None
    response_format: dict | None = None


def unsupported_parameter(req: _Sampling) -> str | None:
    """The first parameter set to something the engine cannot do yet, or None."""
    off = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "logprobs": False,
           "top_logprobs": 0, "echo": False, "best_of": 1, "suffix": "", "tools": [], "tool_choice": "none",
           "response_format": {"type": "text"}}
    for name, value in req:
        if name in off and value is not None and value != off[name]:
            return name
    return None
