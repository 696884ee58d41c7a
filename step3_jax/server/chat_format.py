"""Chat messages -> prompt text: the one function the server calls (swap it for the release's
chat template in `step3_jax.chat` once that lands).

A tokenizer that carries a Jinja ``chat_template`` (the Hugging Face convention, e.g. read from
``tokenizer_config.json``) is rendered with jinja2 in a sandbox. Otherwise (the demo model has
no chat template) a plain transcript::

    System: <text>

    User: <text>

    Assistant:

with ``"\\nUser:"`` added as a stop string so the model does not write the user's next turn.
"""

from __future__ import annotations

PLAIN_STOP = "\nUser:"
_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def format_chat(messages: list[dict], tokenizer) -> tuple[str, tuple[str, ...]]:
    """``(prompt text, extra stop strings)`` for ``messages`` ([{"role", "content"}])."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(template).render(
            messages=messages,
            add_generation_prompt=True,
            eos_token=getattr(tokenizer, "eos_token", None) or "",
            bos_token=getattr(tokenizer, "bos_token", None) or "",
        )
        return text, ()
    turns = [f"{_ROLE_NAMES[m['role']]}: {m['content']}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"]), (PLAIN_STOP,)


__all__ = ["PLAIN_STOP", "format_chat"]
