"""Chat as vLLM users get it: the release's chat template, its stop tokens, streamed replies.

* `render_chat`: the tokenizer's ``chat_template`` (tokenizer_config.json, chat_template.json
  or .jinja) rendered with jinja2's `ImmutableSandboxedEnvironment`, configured as transformers'
  ``apply_chat_template`` configures it (trim_blocks, lstrip_blocks, loop controls, a
  ``tojson`` that does not HTML-escape, ``raise_exception``, ``strftime_now``) and given the
  same variables (``messages``, ``tools``, ``add_generation_prompt``, ``bos_token``,
  ``eos_token``, extra keyword arguments). The template writes the BOS itself, so the prompt is
  encoded without adding another.
* `stop_ids`: every ``eos_token_id`` of generation_config.json, the tokenizer's eos, and the
  template's end-of-turn token (found by rendering a probe turn: Step-3's ``<|EOT|>``).
* `chat_generate`: one assistant reply through `step3_jax.decode.generate`, streamed to an
  ``on_text`` callback. `generate` runs its whole decode loop on device and has no per-token
  hook, so the reply is produced in chunks (a short first chunk for a fast first token): each
  chunk re-prefills prompt + reply so far, which costs little next to decoding on the models
  this runs on a CPU, and every chunk shares one compiled decode loop (fixed cache length).
  With a `step3_jax.vision.Step3VLModel` and ``images=``, the image parts of the messages
  (rendered as ``<im_patch>``) are expanded and the vision tower runs once per call; every
  chunk reuses the features (`step3_jax.vision.generate.generate_prepared`).
  Output is decoded WITHOUT skipping special tokens: the reasoning block (``<think>`` ...
  ``</think>``) and tool-call tokens reach the caller verbatim; only the stop token is cut.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from step3_jax.sampling import check_max_tokens

THINK_END = "</think>"  # vLLM's step3 reasoning parser: text before it is reasoning
_PROBE = "\u2063probe-reply\u2063"  # a reply text no template rewrites (invisible separators)
# Content part types the release's template renders (text, and an <im_patch> per image part);
# any other part would vanish from the prompt without a word.
PART_TYPES = ("text", "image", "image_url")


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or rendering it failed (the message says why)."""


# ----------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja2's own tojson HTML-escapes (<, >, &, '), which would mangle tool schemas.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat_template does not parse: {e}") from e


def check_messages(messages) -> list[dict]:
    """Validates OpenAI-style ``[{"role": ..., "content": ...}, ...]``; returns plain dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a mapping with a 'role', got {m!r}")
        if not isinstance(m["role"], str) or not m["role"]:
            raise ValueError(f"messages[{i}]['role'] must be a non-empty str, got {m['role']!r}")
        content = m.get("content")
        if not (content is None or isinstance(content, (str, list, Mapping))):
            raise ValueError(
                f"messages[{i}]['content'] must be a str, a list of parts or None, "
                f"got {type(content).__name__}"
            )
        if isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"messages[{i}]['content'][{j}]")
        out.append(dict(m))
    return out


def _check_part(part, name: str) -> None:
    if not isinstance(part, Mapping) or part.get("type") not in PART_TYPES:
        raise ValueError(
            f"{name} must be a mapping with 'type' in {PART_TYPES}, got {part!r} "
            "(text goes in {'type': 'text', 'text': ...})"
        )
    if part["type"] == "text" and not isinstance(part.get("text"), str):
        raise ValueError(f"{name}['text'] must be a str, got {part.get('text')!r}")


def render_chat(
    tokenizer,
    messages: Sequence[Mapping],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping] | None = None,
    chat_template: str | None = None,
    **template_kwargs,
) -> str:
    """The prompt text of ``messages`` under the tokenizer's chat template.

    ``chat_template`` overrides the tokenizer's. Extra keyword arguments reach the template
    as variables, as with transformers' ``apply_chat_template``.
    """
    import jinja2

    source = chat_template or getattr(tokenizer, "chat_template", None)
    if not source:
        raise ChatTemplateError(
            "the tokenizer has no chat_template (tokenizer_config.json 'chat_template', "
            "chat_template.json or chat_template.jinja); pass chat_template="
        )
    variables = {
        "bos_token": getattr(tokenizer, "bos_token", None) or "",
        "eos_token": getattr(tokenizer, "eos_token", None) or "",
        **template_kwargs,
        "messages": check_messages(messages),
        "tools": list(tools) if tools else None,
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return _compile(source).render(**variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat_template failed to render: {e}") from e


def end_of_turn_id(tokenizer, chat_template: str | None = None) -> int | None:
    """The added token the template closes an assistant turn with (Step-3: ``<|EOT|>``).

    Renders a probe conversation and takes the first token after the assistant's text, if
    it is an added (special) token; None if the template closes turns with plain text or
    refuses to render the probe.
    """
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = render_chat(
            tokenizer, probe, add_generation_prompt=False, chat_template=chat_template
        )
    except ChatTemplateError:  # a template that refuses the probe (e.g. wants a system turn)
        return None
    if _PROBE not in text:
        return None
    tail = text.split(_PROBE, 1)[1].lstrip()
    ids = tokenizer.encode(tail) if tail else []
    added = tokenizer.hf.get_added_tokens_decoder()
    return ids[0] if ids and ids[0] in added else None


def stop_ids(tokenizer, chat_template: str | None = None) -> tuple[int, ...]:
    """Ids that end a reply: every eos (tokenizer + generation_config.json) and the
    template's end-of-turn token."""
    ids = list(tokenizer.eos_ids)
    eot = end_of_turn_id(tokenizer, chat_template)
    if eot is not None:
        ids.append(eot)
    return tuple(dict.fromkeys(ids))


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning, content)`` as vLLM's step3 reasoning parser splits a reply: everything
    before ``</think>`` is reasoning (the prompt already opened ``<think>``); without it, the
    whole text is still reasoning in progress, returned as ``(text, "")``."""
    if THINK_END not in text:
        return text, ""
    reasoning, content = text.split(THINK_END, 1)
    return reasoning, content


# ----------------------------------------------------------------------------- generation
class _StreamDecoder:
    """Incremental detokenization: emits only text that no later token can change (a
    byte-level BPE may end mid-character, which decodes to U+FFFD until completed)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        new, self.sent = text[len(self.sent) :], text
        return new


@dataclasses.dataclass
class ChatResult:
    text: str  # the reply as decoded (reasoning and tool-call tokens kept), stop token cut
    token_ids: list[int]  # the reply's ids, stop token excluded
    finish_reason: str  # "stop" (a stop id) or "length" (max_new_tokens or the context)
    prompt_tokens: int
    first_token_seconds: float  # from the call to the first text handed to on_text
    seconds: float

    @property
    def reasoning_and_content(self) -> tuple[str | None, str]:
        return split_reasoning(self.text)


def _pow2(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _prompt_generator(model, tokenizer, ids: list[int], images):
    """``(prompt ids, gen)``: ``gen(prompts, n, **sampling)`` continues the prompt.

    A `Step3VLModel` expands each ``<im_patch>`` of ``ids`` to its image's layout and runs
    the vision tower here, once; ``gen`` then only prefills with those features (a reply
    token that happens to be ``<im_patch>`` keeps its text embedding). A text model gets
    `step3_jax.decode.generate`."""
    from step3_jax.decode import generate

    if getattr(model, "vision_config", None) is None:
        if images is not None and (not isinstance(images, (list, tuple)) or images):
            raise ValueError(
                "images= needs a Step3-VL model (step3_jax.checkpoints.load_hf_vl); this "
                "model is text-only"
            )
        return ids, functools.partial(generate, model)
    from step3_jax.vision.generate import generate_prepared, prepare
    from step3_jax.vision.preprocess import ImageSpecialTokens, as_image_list

    special = ImageSpecialTokens.from_tokenizer(tokenizer)
    (expanded,), features = prepare(model, [ids], [as_image_list(images)], special)

    def gen(prompts, n, **kwargs):
        return generate_prepared(
            model, prompts, features, n, image_lengths=[len(expanded)], **kwargs
        )

    return expanded, gen


def chat_generate(
    model,
    tokenizer,
    messages: Sequence[Mapping],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 0.9,
    seed: int = 0,
    tools: Sequence[Mapping] | None = None,
    on_text: Callable[[str], None] | None = None,
    first_chunk: int = 4,
    chunk: int = 16,
    max_cache_len: int | None = None,
    chat_template: str | None = None,
    images: Sequence | None = None,
    **template_kwargs,
) -> ChatResult:
    """One assistant reply to ``messages``, streamed to ``on_text`` as it is produced.

    The prompt is the chat template with the generation prompt (Step-3: ``<|BOT|>assistant\\n
    <think>\\n``); generation stops on `stop_ids` or after ``max_new_tokens`` (fewer if the
    context ``max_position_embeddings`` is reached). Sampling as `step3_jax.decode.generate`
    (``temperature=0``: greedy, equal to one unchunked `generate` call).
    ``max_cache_len`` fixes the KV-cache length (default: the prompt + reply rounded up to a
    power of two); a REPL passes one value for the whole conversation so the decode loop
    compiles once.

    ``images`` (a `step3_jax.vision.Step3VLModel` only): the conversation's images in order,
    one per image content part (``{"type": "image"}`` / ``{"type": "image_url"}``, which the
    template renders as ``<im_patch>``); paths, bytes, PIL images or uint8 arrays (one bare
    image: a list of one). They are preprocessed and run through the vision tower ONCE;
    every chunk reuses the features.
    ``prompt_tokens`` counts the image tokens.
    """

    # As `step3_jax.decode.generate` checks it, but first: a bad value must not read as a
    # conversation too long for a reply (the budget check below).
    check_max_tokens(max_new_tokens)
    if first_chunk < 1 or chunk < 1:
        raise ValueError(f"first_chunk and chunk must be >= 1, got {first_chunk}, {chunk}")
    t0 = time.perf_counter()
    prompt = render_chat(
        tokenizer, messages, tools=tools, chat_template=chat_template, **template_kwargs
    )
    ids = tokenizer.encode(prompt)  # the template wrote the BOS
    ids, gen = _prompt_generator(model, tokenizer, ids, images)
    limit = model.config.max_position_embeddings
    if max_cache_len is not None and not 0 < max_cache_len <= limit:
        raise ValueError(f"max_cache_len={max_cache_len} must be in [1, {limit}]")
    room = max_cache_len or limit
    budget = min(int(max_new_tokens), room - len(ids))
    if budget < 1:
        raise ValueError(
            f"the conversation is {len(ids)} tokens: no room for a reply within "
            f"{room} tokens (max_cache_len={max_cache_len}, max_position_embeddings={limit}); "
            "start a new conversation"
        )
    stops = stop_ids(tokenizer, chat_template)
    # One cache length for the whole reply: every chunk reuses one compiled decode loop.
    cache_len = max_cache_len or min(limit, _pow2(len(ids) + budget, 64))
    stream, out, first, reason = _StreamDecoder(tokenizer), [], None, "length"
    while len(out) < budget:
        n = min(first_chunk if not out else chunk, budget - len(out))
        res = gen(
            [ids + out],
            n,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_tokens=stops,
            seed=seed + len(out),  # a fresh key per chunk: chunks do not repeat draws
            max_cache_len=cache_len,
        )
        out += res.tokens[0]
        text = stream.push(res.tokens[0])
        if text and first is None:
            first = time.perf_counter() - t0
        if text and on_text is not None:
            on_text(text)
        if res.finish_reasons[0] == "stop":
            reason = "stop"
            break
    rest = stream.flush()
    if rest and on_text is not None:
        on_text(rest)
    total = time.perf_counter() - t0
    return ChatResult(stream.sent, out, reason, len(ids), total if first is None else first, total)


__all__ = [
    "ChatResult",
    "ChatTemplateError",
    "chat_generate",
    "check_messages",
    "end_of_turn_id",
    "render_chat",
    "split_reasoning",
    "stop_ids",
]
