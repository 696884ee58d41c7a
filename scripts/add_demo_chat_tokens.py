"""Gives the shipped demo model the Step-3 release's chat protocol, without retraining.

Adds the release's special tokens to ``checkpoints/demo/tokenizer.json`` (new ids after the
2048 trained BPE ids; the BPE itself is untouched, so every text still encodes as before),
writes ``tokenizer_config.json`` (bos/eos, ``add_bos_token``, the chat template in the
release's format) and ``generation_config.json`` (eos ids), and grows the checkpoint's
``embed_tokens`` and ``lm_head`` by one row per new token. Each new row is a copy of the
trained ``<|endoftext|>`` row: the model reads every new token as the document boundary it
was trained on, and emits them as rarely as it emits ``<|endoftext|>`` (so demo replies
usually run to ``max_new_tokens``). Idempotent: a second run changes nothing.

    python scripts/add_demo_chat_tokens.py [--demo-dir checkpoints/demo]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tokenizers

from step3_jax.checkpoints.safetensors_io import ShardWriter, index_checkpoint, read_tensor

BOS, EOS, BOT, EOT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|BOT|>", "<|EOT|>"
TOOL_TOKENS = (
    "<｜tool_calls_begin｜>",
    "<｜tool_calls_end｜>",
    "<｜tool_call_begin｜>",
    "<｜tool_call_end｜>",
    "<｜tool_sep｜>",
)
# (text, special): special tokens are dropped by decode(skip_special_tokens=True); the
# reasoning and tool-call markers are not, so they survive into the text users see.
NEW_TOKENS = (
    (BOS, True),
    (EOS, True),
    (BOT, True),
    (EOT, True),
    ("<im_patch>", True),
    ("<think>", False),
    ("</think>", False),
    *((t, False) for t in TOOL_TOKENS),
)

# The release's prompt format (as vLLM's Step-3 example prompts show it): BOS, the system
# text, then "<|BOT|>{role}\n {content} <|EOT|>" turns, and the generation prompt
# "<|BOT|>assistant\n<think>\n". Content is wrapped in single spaces, as the release's
# render macro does; tool calls use the steptml XML between the tool-call tokens.
CHAT_TEMPLATE = (
    # Literal text goes through {{ '...' }}: with trim_blocks/lstrip_blocks (transformers'
    # settings) and "-" whitespace control, a newline written next to a tag would be eaten.
    "{%- macro render_content(content) -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{ content }}"
    "{%- elif content is mapping -%}{{ content['text'] }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ('image', 'image_url') -%}{{ '<im_patch>' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro render_tool_calls(calls) -%}"
    "{{ '<｜tool_calls_begin｜>\\n' }}"
    "{%- for call in calls -%}"
    "{%- set f = call['function'] if call['function'] is defined else call -%}"
    "{%- set args = f['arguments'] if f['arguments'] is mapping else {} -%}"
    "{{ '<｜tool_call_begin｜>\\nfunction<｜tool_sep｜>'"
    " + '<steptml:invoke name=\"' + f['name'] + '\">' }}"
    "{%- for key, value in args.items() -%}"
    "{{ '<steptml:parameter name=\"' + key + '\">' + value | string + '</steptml:parameter>' }}"
    "{%- endfor -%}"
    "{{ '</steptml:invoke><｜tool_call_end｜>\\n' }}"
    "{%- endfor -%}"
    "{{ '<｜tool_calls_end｜>' }}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{{ ' ' + render_content(m['content']) + ' ' }}"
    "{%- endfor -%}"
    "{%- if tools -%}"
    "{{ '# Tools\\nYou may call tools to answer. Their schemas are in <tools></tools>: <tools>' }}"
    "{%- for tool in tools -%}{{ tool | tojson + '\\n' }}{%- endfor -%}"
    "{{ '</tools> Call them in this XML between the tool-call tokens: '"
    " + '<｜tool_calls_begin｜>\\n<｜tool_call_begin｜>\\nfunction<｜tool_sep｜>'"
    ' + \'<steptml:invoke name="NAME"><steptml:parameter name="ARG">VALUE\''
    " + '</steptml:parameter></steptml:invoke><｜tool_call_end｜>\\n<｜tool_calls_end｜> ' }}"
    "{%- endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{ '<|BOT|>' + m['role'] + '\\n ' + render_content(m['content']) + ' ' }}"
    "{%- if m['role'] == 'assistant' and m['tool_calls'] is defined and m['tool_calls'] -%}"
    "{{ render_tool_calls(m['tool_calls']) }}"
    "{%- endif -%}"
    "{{ '<|EOT|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|BOT|>assistant\\n<think>\\n' }}{%- endif -%}"
)


def add_tokens(folder: Path) -> list[int]:
    """Adds NEW_TOKENS to tokenizer.json; returns the new ids (empty if already there)."""
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    before = tok.get_vocab_size(with_added_tokens=True)
    if tok.token_to_id(BOT) is not None:
        return []
    for text, special in NEW_TOKENS:
        token = tokenizers.AddedToken(text, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    ids = [tok.token_to_id(t) for t, _ in NEW_TOKENS]
    assert ids == list(range(before, before + len(NEW_TOKENS))), ids
    tok.save(str(folder / "tokenizer.json"))
    return ids


def grow_checkpoint(folder: Path, vocab: int) -> None:
    """Appends copies of row 0 (``<|endoftext|>``) to embed_tokens and lm_head."""
    tensors = {n: read_tensor(i) for n, i in index_checkpoint(folder).items()}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = tensors[name]
        extra = np.repeat(t[:1], vocab - t.shape[0], axis=0)
        tensors[name] = np.concatenate([t, extra], axis=0)
    for old in folder.glob("model*.safetensors"):
        old.unlink()
    specs = [(n, t.dtype, t.shape) for n, t in tensors.items()]
    ShardWriter(folder, 4 * 2**30).write(specs, tensors.pop, {"producer": "step3_jax"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = vocab
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def write_configs(folder: Path, ids: dict[str, int]) -> None:
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    gen = {
        "bos_token_id": ids[BOS],
        # The release's eos, and the demo's trained document separator.
        "eos_token_id": [ids[EOS], ids["<|endoftext|>"]],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo-dir", type=Path, default=Path("checkpoints/demo"))
    args = p.parse_args(argv)
    new = add_tokens(args.demo_dir)
    tok = tokenizers.Tokenizer.from_file(str(args.demo_dir / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if new:
        grow_checkpoint(args.demo_dir, vocab)
    names = [t for t, _ in NEW_TOKENS] + ["<|endoftext|>"]
    write_configs(args.demo_dir, {t: tok.token_to_id(t) for t in names})
    print(json.dumps({"vocab_size": vocab, "new_ids": new}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
