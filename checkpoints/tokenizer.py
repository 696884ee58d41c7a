"""Tokenizers: the shipped demo BPE and a user's own Step-3 ``tokenizer.json``.

Both are `tokenizers.Tokenizer` files wrapped in `Tokenizer`, which gives the small interface
the CLI and `step3_jax.generate` callers need: ``encode(str) -> list[int]``,
``decode(list[int]) -> str``, ``eos_id`` and ``vocab_size``.

`load_tokenizer` also reads the files a Hugging Face release ships beside ``tokenizer.json``,
as transformers and vLLM do: ``tokenizer_config.json`` (``bos_token``, ``eos_token``,
``add_bos_token``, ``chat_template``), ``chat_template.json`` / ``chat_template.jinja`` (the
Step-3 release keeps its template there) and ``generation_config.json`` (every
``eos_token_id``: generation stops on each). `step3_jax.chat` renders the template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

EOS_TOKEN = "<|endoftext|>"  # the demo tokenizer's only special token (id 0)
# End-of-sequence spellings tried, in order, when a tokenizer.json comes without a
# tokenizer_config.json naming its eos_token.
_EOS_CANDIDATES = (EOS_TOKEN, "<｜end▁of▁sentence｜>", "</s>", "<|im_end|>", "<eos>")


class Tokenizer:
    """A `tokenizers.Tokenizer` with the text <-> id-list interface step3_jax uses.

    Args:
      tokenizer: the wrapped Hugging Face ``tokenizers.Tokenizer``.
      eos_token: the end-of-sequence token's text, or None if the vocabulary has none.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        eos_token: str | None = None,
        *,
        bos_token: str | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        generation_eos_ids: Sequence[int] = (),
    ):
        self.hf = tokenizer
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = self._id_of(eos_token, "eos_token")
        self.bos_id = self._id_of(bos_token, "bos_token")
        self.add_bos_token = bool(add_bos_token) and self.bos_id is not None
        self.chat_template = chat_template
        bad = [i for i in generation_eos_ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(
                f"generation_config eos_token_id {bad} lies outside the tokenizer's ids "
                f"[0, {self.vocab_size})"
            )
        self.generation_eos_ids = tuple(int(i) for i in generation_eos_ids)

    def _id_of(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        token_id = self.hf.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{what}={token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every end-of-sequence id: ``eos_token`` and generation_config's ``eos_token_id``."""
        ids = ([self.eos_id] if self.eos_id is not None else []) + list(self.generation_eos_ids)
        return tuple(dict.fromkeys(ids))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added (special) tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in ``text`` (``<|BOT|>``) are parsed
        as their ids. ``add_bos``: prepend ``bos_id`` when tokenizer_config's
        ``add_bos_token`` asks for it and ``text`` does not already start with it (a rendered
        chat template writes its own BOS)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos_token and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (e.g. eos) are dropped unless
        ``skip_special_tokens=False`` (chat output keeps reasoning and tool-call tokens)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        """Writes the ``tokenizer.json``."""
        self.hf.save(str(path))

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r}, "
            f"bos_token={self.bos_token!r}, chat_template={self.chat_template is not None})"
        )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialized as {"content": ..., ...}
        return value.get("content")
    return value


def _chat_template(folder: Path, config: dict) -> str | None:
    """The chat template, from where transformers looks: ``chat_template.jinja``, then
    ``chat_template.json``, then ``tokenizer_config.json``'s ``chat_template``."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    template = template or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


def _generation_eos_ids(folder: Path) -> list[int]:
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    if eos is None:
        return []
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]


def load_tokenizer(path: str | Path, eos_token: str | None = None) -> Tokenizer:
    """Loads a ``tokenizer.json`` (the demo's, or a real Step-3 one supplied by the user).

    Args:
      path: a ``tokenizer.json`` file, or a directory holding one.
      eos_token: overrides the end-of-sequence token; by default it is read from a
        ``tokenizer_config.json`` next to the file, else the first of a few common spellings
        present in the vocabulary, else None.

    BOS, ``add_bos_token`` and the chat template come from the files beside it (see the
    module docstring); so do the extra stop ids of ``generation_config.json``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    hf = tokenizers.Tokenizer.from_file(str(path))
    config = _read_json(path.with_name("tokenizer_config.json"))
    if eos_token is None:
        eos_token = _token_text(config.get("eos_token"))
    if eos_token is None:
        vocab = hf.get_vocab(with_added_tokens=True)
        eos_token = next((t for t in _EOS_CANDIDATES if t in vocab), None)
    return Tokenizer(
        hf,
        eos_token,
        bos_token=_token_text(config.get("bos_token")),
        add_bos_token=bool(config.get("add_bos_token", False)),
        chat_template=_chat_template(path.parent, config),
        generation_eos_ids=_generation_eos_ids(path.parent),
    )


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE (GPT-2 style pre-tokenizer, ``EOS_TOKEN`` as id 0).

    Byte-level means every string encodes (no unknown token) and decode inverts encode.
    """
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + eos + merges), got {vocab_size}")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, EOS_TOKEN)


__all__ = ["EOS_TOKEN", "Tokenizer", "load_tokenizer", "train_bpe"]
