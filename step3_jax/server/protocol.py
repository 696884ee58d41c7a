"""OpenAI-compatible request bodies (pydantic) and their mapping to `SamplingParams`.

Supported: the sampling fields step3_jax implements (max_tokens, temperature, top_p, stop,
seed, n=1, stream, stream_options.include_usage) plus the common extensions ``top_k``,
``ignore_eos`` and ``stop_token_ids``. Fields step3_jax cannot honour (n > 1, logprobs, echo,
nonzero penalties, tools) are rejected with a 400 naming the field instead of being ignored.
Unknown fields are ignored, as OpenAI-compatible servers do.

Chat content is a string or a list of OpenAI content parts: ``{"type": "text", "text": ...}``
and ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (a Step3-VL
model; the URL is checked and decoded by `step3_jax.server.images`).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from step3_jax.engine import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop_token_ids=tuple(self.stop_token_ids),
            stop=tuple(self.stop or ()),
            ignore_eos=self.ignore_eos,
            seed=self.seed,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None
    best_of: int = Field(default=1, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if len(v) == 0:
            raise ValueError("prompt is empty")
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("a batch of prompts is not supported: send one per request")
            return v[0]
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; every image gets the
    # release's full layout (global view + crops), as vLLM serves Step3-VL


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def template_content(self) -> str | list[dict]:
        """The content as the chat template sees it: image parts become ``{"type":
        "image_url"}`` (the template writes one ``<im_patch>`` marker each; the data stays
        out of the template)."""
        if isinstance(self.content, str):
            return self.content
        if all(isinstance(p, TextPart) for p in self.content):
            return "".join(p.text for p in self.content)
        return [
            {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": p.type}
            for p in self.content
        ]

    def image_urls(self, index: int) -> list[tuple[str, str]]:
        """``(url, param)`` of each image part, ``param`` naming its field in the request."""
        if isinstance(self.content, str):
            return []
        return [
            (p.image_url.url, f"messages[{index}].content[{j}].image_url.url")
            for j, p in enumerate(self.content)
            if isinstance(p, ImagePart)
        ]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Literal[False] | None = None
    tools: None = None

    def image_urls(self) -> list[tuple[str, str]]:
        """Every image part's ``(url, param)``, in message order (the template's order)."""
        return [u for i, m in enumerate(self.messages) for u in m.image_urls(i)]

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        params = super().sampling_params(default_max_tokens)
        if self.max_completion_tokens is not None and self.max_tokens is None:
            return dataclasses.replace(params, max_tokens=self.max_completion_tokens)
        return params


__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ImagePart",
    "TextPart",
]
