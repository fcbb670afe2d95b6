"""Chat templates: a conversation as the text a chat model was trained on.

A template is the Jinja program a model ships (``tokenizer_config.json``'s ``chat_template`` in a Hugging
Face folder, ``tokenizer.chat_template`` in a GGUF file). It is rendered as transformers'
``apply_chat_template`` renders it: in a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``,
given ``messages``, ``add_generation_prompt``, the special tokens, a ``raise_exception`` function and a
``tojson`` filter; so the same template gives the same text.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from tansuo.errors import TansuoError

ROLES = ("system", "user", "assistant")


class ChatError(TansuoError):
    """A conversation a bundle cannot render: no template, a bad message, or a template that refuses it."""


@cache
def _compiled(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatError(f"the chat template refuses this conversation: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatError(f"the bundle's chat template does not compile: {e}") from e


def check_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content"}]`` with known roles and string contents, or a ChatError."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ChatError(
                f"message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': text}}, got {m!r}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """The text of ``messages`` under ``template`` (ending with the assistant's turn opened when
    ``add_generation_prompt``).

    Raises:
        ChatError: No template (the model is not a chat model), bad messages, or the template's refusal.
    """
    if not template:
        raise ChatError("this bundle has no chat template: it is not a chat model; generate from a prompt")
    from jinja2 import TemplateError

    try:
        return _compiled(template).render(
            messages=check_messages(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
    except TemplateError as e:
        raise ChatError(f"the chat template fails on this conversation: {e}") from e
