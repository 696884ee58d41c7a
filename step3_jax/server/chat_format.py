"""Chat messages -> prompt: the one function the server calls, on `step3_jax.chat`.

A tokenizer with a chat template (the release's, or the demo's in the release format) is
rendered by `step3_jax.chat.render_chat` (jinja2's sandbox, as transformers does), and the reply
stops on every eos id plus the template's end-of-turn token (`step3_jax.chat.stop_ids`), as
`step3-jax chat` does. A tokenizer without one gets a plain transcript::

    System: <text>

    User: <text>

    Assistant:

with ``"\\nUser:"`` as a stop string so the model does not write the user's next turn.

Image content parts become one ``<im_patch>`` marker each where they stand, as the release's
template writes them; the engine expands each marker to its image's placeholder layout
(`step3_jax.vision.preprocess.expand_prompt`).
"""

from __future__ import annotations

import dataclasses

from step3_jax import chat
from step3_jax.vision.preprocess import SPECIAL_TOKEN_NAMES

PLAIN_STOP = "\nUser:"
IMAGE_MARKER = SPECIAL_TOKEN_NAMES["image"]
_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    token_ids: list[int]
    stop: tuple[str, ...] = ()  # extra stop strings
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids (end of turn)


def format_chat(messages: list[dict], tokenizer) -> ChatPrompt:
    """The prompt ids and extra stops for ``messages`` ([{"role", "content"}])."""
    if getattr(tokenizer, "chat_template", None):
        text = chat.render_chat(tokenizer, messages)
        return ChatPrompt(tokenizer.encode(text, add_bos=True), (), chat.stop_ids(tokenizer))
    chat.check_messages(messages)
    turns = [
        f"{_ROLE_NAMES.get(m['role'], m['role'].title())}: {_plain(m['content'])}" for m in messages
    ]
    text = "\n\n".join([*turns, "Assistant:"])
    return ChatPrompt(tokenizer.encode(text), (PLAIN_STOP,), ())


def _plain(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.get("text", "") if p.get("type") == "text" else IMAGE_MARKER for p in content)


__all__ = ["PLAIN_STOP", "ChatPrompt", "format_chat"]
