"""Tokenizers: the shipped demo BPE and a user's own Step-3 ``tokenizer.json``.

Both are `tokenizers.Tokenizer` files wrapped in `Tokenizer`, which gives the small interface
the CLI and `step3_jax.generate` callers need: ``encode(str) -> list[int]``,
``decode(list[int]) -> str``, ``eos_id`` and ``vocab_size``.
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

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str | None = None):
        self.hf = tokenizer
        self.eos_token = eos_token
        self.eos_id: int | None = None
        if eos_token is not None:
            self.eos_id = tokenizer.token_to_id(eos_token)
            if self.eos_id is None:
                raise ValueError(f"eos_token={eos_token!r} is not in the tokenizer's vocabulary")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added (special) tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (e.g. eos) are dropped."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        """Writes the ``tokenizer.json``."""
        self.hf.save(str(path))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r})"


def _eos_from_config(path: Path) -> str | None:
    """The ``eos_token`` of a ``tokenizer_config.json`` beside ``path``, if there is one."""
    cfg_path = path.with_name("tokenizer_config.json")
    if not cfg_path.is_file():
        return None
    eos = json.loads(cfg_path.read_text(encoding="utf-8")).get("eos_token")
    if isinstance(eos, dict):  # AddedToken serialized as {"content": ..., ...}
        eos = eos.get("content")
    return eos


def load_tokenizer(path: str | Path, eos_token: str | None = None) -> Tokenizer:
    """Loads a ``tokenizer.json`` (the demo's, or a real Step-3 one supplied by the user).

    Args:
      path: a ``tokenizer.json`` file, or a directory holding one.
      eos_token: overrides the end-of-sequence token; by default it is read from a
        ``tokenizer_config.json`` next to the file, else the first of a few common spellings
        present in the vocabulary, else None.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    hf = tokenizers.Tokenizer.from_file(str(path))
    if eos_token is None:
        eos_token = _eos_from_config(path)
    if eos_token is None:
        vocab = hf.get_vocab(with_added_tokens=True)
        eos_token = next((t for t in _EOS_CANDIDATES if t in vocab), None)
    return Tokenizer(hf, eos_token)


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
