"""Chat messages -> prompt text, through the checkpoint's chat template (tokenizer_config.json)."""

from __future__ import annotations

from mpk.errors import MpkError


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt for the assistant's next reply, as transformers' apply_chat_template renders it."""
    if not tokenizer.chat_template:
        raise MpkError("the checkpoint's tokenizer_config.json has no chat_template, so it cannot chat")
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise MpkError('chat messages are dicts with "role" and "content"')
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MpkError("chat templates need jinja2 (pip install jinja2)") from None

    def raise_exception(message):
        raise MpkError(f"the chat template refuses these messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    decode = tokenizer.backend.id_to_token
    bos = decode(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else ""
    eos = decode(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else ""
    try:
        return env.from_string(tokenizer.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    except jinja2.TemplateError as e:
        raise MpkError(f"the checkpoint's chat template does not render ({e})") from None
