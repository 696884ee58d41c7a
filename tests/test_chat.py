"""Chat as vLLM users get it: the release-format template (rendered by a sandboxed jinja2),
BOS handling, stop ids, streaming replies, and the `step3-jax chat` REPL, on the demo model."""

from __future__ import annotations

import io
import json
import re

import pytest

from step3_jax import chat
from step3_jax.chat import ChatTemplateError, chat_generate, render_chat, stop_ids
from step3_jax.checkpoints import Tokenizer, load_demo, load_tokenizer
from step3_jax.checkpoints.demo import DEMO_DIR
from step3_jax.decode import generate

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SYSTEM = {"role": "system", "content": "You are Emma Woodhouse."}
USER = {"role": "user", "content": "Who is Mr. Knightley?"}
# The REPL's cache length for the demo (its whole context): every generation test uses it, so
# the whole file compiles one greedy decode loop.
CACHE = 1024
GREEDY = dict(temperature=0.0, max_cache_len=CACHE)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_DIR)


@pytest.fixture(scope="module")
def demo():
    return load_demo()


# ----------------------------------------------------------------------------- rendering
def test_generation_prompt_in_the_release_format(tok):
    # vLLM's Step-3 example prompt: BOS, system text, <|BOT|>user turn, then the assistant
    # turn opened with the reasoning block.
    assert render_chat(tok, [SYSTEM, USER]) == (
        f"{BOS} You are Emma Woodhouse. <|BOT|>user\n Who is Mr. Knightley? <|EOT|>"
        "<|BOT|>assistant\n<think>\n"
    )


def test_same_prompt_as_vllms_step3_example(tok):
    """vLLM's offline vision-language example builds Step-3 prompts by hand; the demo's
    template renders the identical string from messages."""
    q = "What is in the image?"
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
    ]
    vllm_prompt = (
        "<｜begin▁of▁sentence｜> You are a helpful assistant. <|BOT|>user\n "
        f"<im_patch>{q} <|EOT|><|BOT|>assistant\n<think>\n"
    )
    assert render_chat(tok, msgs) == vllm_prompt


def test_multi_turn_with_reasoning_tool_calls_and_results(tok):
    msgs = [
        USER,
        {
            "role": "assistant",
            "content": "<think>the Highbury neighbour</think>Let me look.",
            "tool_calls": [
                {"type": "function", "function": {"name": "lookup", "arguments": {"who": "K"}}}
            ],
        },
        {"role": "tool", "content": "George Knightley, of Donwell Abbey"},
        {"role": "user", "content": "Thanks."},
    ]
    assert render_chat(tok, msgs, add_generation_prompt=False) == (
        f"{BOS}<|BOT|>user\n Who is Mr. Knightley? <|EOT|>"
        "<|BOT|>assistant\n <think>the Highbury neighbour</think>Let me look. "
        "<｜tool_calls_begin｜>\n<｜tool_call_begin｜>\nfunction<｜tool_sep｜>"
        '<steptml:invoke name="lookup"><steptml:parameter name="who">K</steptml:parameter>'
        "</steptml:invoke><｜tool_call_end｜>\n<｜tool_calls_end｜><|EOT|>"
        "<|BOT|>tool\n George Knightley, of Donwell Abbey <|EOT|>"
        "<|BOT|>user\n Thanks. <|EOT|>"
    )


def test_tools_schema_is_json_not_html_escaped(tok):
    tools = [{"type": "function", "function": {"name": "cmp", "description": "a < b & 'c'"}}]
    text = render_chat(tok, [USER], tools=tools)
    assert json.dumps(tools[0], ensure_ascii=False) in text  # jinja2's tojson would escape <&'
    assert text.startswith(f"{BOS}# Tools\n") and text.endswith("<|BOT|>assistant\n<think>\n")


def test_constructs_release_templates_use(tok):
    """Release-style templates rely on transformers' environment: ``namespace``,
    ``tojson(ensure_ascii=False)``, ``is defined`` defaults, loop controls, a macro whose body
    keeps its surrounding spaces, and the special tokens as variables."""
    template = (
        "{% macro body(c) %} {% if c is string %}{{- c }}{% endif %} {% endmacro %}"
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
        "{% endif %}{{ bos_token }}{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m.role }}:{{ body(m.content) }}|{% endfor %}"
        "{{ tools[0] | tojson(ensure_ascii=False) }}#{{ ns.n }}{{ eos_token }}"
    )
    msgs = [{"role": "skip", "content": "x"}, {"role": "user", "content": "Émma"}]
    text = render_chat(tok, msgs, tools=[{"name": "é<"}], chat_template=template)
    assert text == f'{BOS}user: Émma |{{"name": "é<"}}#1{EOS}'


def test_content_parts_and_image_placeholder(tok):
    msg = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}
    assert render_chat(tok, [msg]) == (
        f"{BOS}<|BOT|>user\n <im_patch>Describe. <|EOT|><|BOT|>assistant\n<think>\n"
    )


def test_template_runs_sandboxed_and_immutable(tok):
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match="unsafe|access"):
        render_chat(tok, [USER], chat_template=escape)
    with pytest.raises(ChatTemplateError):
        render_chat(tok, [USER], chat_template="{{ messages.append({'role': 'x'}) }}")
    with pytest.raises(ChatTemplateError, match="only user turns"):
        render_chat(tok, [USER], chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat(tok, [USER], chat_template="{% if %}")


def test_missing_template_and_bad_messages_are_clear(tok):
    no_template = Tokenizer(tok.hf, tok.eos_token, bos_token=tok.bos_token)
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        render_chat(no_template, [USER])
    for bad, match in [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        ([{"content": "x"}], r"messages\[0\] must be a mapping with a 'role'"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            render_chat(tok, bad)


@pytest.mark.parametrize(
    "part",
    ["Who is Emma?", {"text": "Who is Emma?"}, {"type": "input_text", "text": "Who is Emma?"}],
)
def test_content_parts_the_template_would_drop_are_refused(tok, part):
    # The template renders only text and image parts: these would leave an empty user turn.
    msgs = [USER, {"role": "user", "content": [{"type": "text", "text": "Hi. "}, part]}]
    match = r"messages\[1\]\['content'\]\[1\] must be a mapping with 'type' in \('text', 'image', "
    with pytest.raises(ValueError, match=match + r"'image_url'\), got " + re.escape(repr(part))):
        render_chat(tok, msgs)


def test_text_part_without_text_is_refused(tok):
    msgs = [{"role": "user", "content": [{"type": "text", "content": "Who is Emma?"}]}]
    with pytest.raises(
        ValueError, match=r"messages\[0\]\['content'\]\[0\]\['text'\] must be a str"
    ):
        render_chat(tok, msgs)
    url = {"type": "image_url", "image_url": {"url": "data:,"}}
    msgs = [{"role": "user", "content": [url, {"type": "text", "text": "Describe."}]}]
    assert "\n <im_patch>Describe. <|EOT|>" in render_chat(tok, msgs)


# ----------------------------------------------------------------------------- tokens
def test_bos_once_and_special_tokens_are_single_ids(tok):
    ids = tok.encode(render_chat(tok, [USER]))
    assert ids[0] == tok.bos_id == 2048 and ids.count(tok.bos_id) == 1
    assert ids[1] == tok.hf.token_to_id("<|BOT|>") and ids[-2:] == [
        tok.hf.token_to_id("<think>"),
        tok.encode("\n")[0],
    ]
    # tokenizer_config: add_bos_token true -> plain prompts get one BOS, never two.
    assert tok.encode("Emma", add_bos=True) == [2048, *tok.encode("Emma")]
    assert tok.encode(BOS + "Emma", add_bos=True) == [2048, *tok.encode("Emma")]
    assert tok.encode("Emma") == tok.encode("Emma", add_bos=False)


def test_stop_ids_are_every_eos_plus_the_end_of_turn(tok):
    eot = tok.hf.token_to_id("<|EOT|>")
    assert tok.eos_id == tok.hf.token_to_id(EOS)
    assert stop_ids(tok) == (tok.hf.token_to_id(EOS), 0, eot)  # generation_config: [EOS, 0]
    assert chat.end_of_turn_id(tok) == eot
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert chat.end_of_turn_id(tok, plain) is None  # turns closed by plain text
    picky = "{{ raise_exception('a system turn first') if messages[0].role != 'system' }}"
    assert chat.end_of_turn_id(tok, picky) is None


def test_reasoning_and_tool_tokens_survive_decoding(tok):
    text = "<think>why</think>so <｜tool_calls_begin｜><｜tool_call_begin｜>"
    ids = tok.encode(text)
    assert tok.hf.token_to_id("</think>") in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == text  # not special: kept even when specials are skipped
    assert chat.split_reasoning("a</think>b") == ("a", "b")
    assert chat.split_reasoning("still thinking") == ("still thinking", "")


# ----------------------------------------------------------------------------- generation
def test_chunked_streaming_greedy_equals_one_generate_call(demo):
    model, tok = demo
    msgs = [SYSTEM, USER]
    pieces = []
    res = chat_generate(
        model, tok, msgs, max_new_tokens=13, first_chunk=3, chunk=4, on_text=pieces.append,
        **GREEDY,
    )  # fmt: skip
    ids = tok.encode(render_chat(tok, msgs))
    ref = generate(model, [ids], 13, stop_tokens=stop_ids(tok), top_p=0.9, max_cache_len=CACHE)
    assert res.token_ids == ref.tokens[0] and res.finish_reason == ref.finish_reasons[0]
    assert "".join(pieces) == res.text == tok.decode(res.token_ids, skip_special_tokens=False)
    assert res.prompt_tokens == len(ids) and len(pieces) >= 3  # streamed in several pieces
    assert 0 < res.first_token_seconds <= res.seconds


@pytest.mark.parametrize("at", [1, 3, 6], ids=["mid-first-chunk", "chunk-boundary", "later"])
def test_generation_stops_on_a_generation_config_eos(demo, at):
    model, tok = demo
    free = chat_generate(model, tok, [USER], max_new_tokens=10, first_chunk=3, **GREEDY)
    stop = free.token_ids[at]
    assert stop not in free.token_ids[:at]  # (the greedy text has no repeat this early)
    stopper = Tokenizer(
        tok.hf,
        tok.eos_token,
        bos_token=tok.bos_token,
        chat_template=tok.chat_template,
        generation_eos_ids=(stop,),
    )
    assert stop in stop_ids(stopper)
    res = chat_generate(model, stopper, [USER], max_new_tokens=10, first_chunk=3, **GREEDY)
    assert res.finish_reason == "stop" and res.token_ids == free.token_ids[:at]


def test_conversation_longer_than_the_context_is_refused(demo):
    model, tok = demo
    long = {"role": "user", "content": "Emma " * model.config.max_position_embeddings}
    with pytest.raises(ValueError, match="no room for a reply"):
        chat_generate(model, tok, [long], max_new_tokens=4)
    short = {"role": "user", "content": "Emma " * 40}
    with pytest.raises(ValueError, match="no room for a reply within 32 tokens"):
        chat_generate(model, tok, [short], max_new_tokens=4, max_cache_len=32)


@pytest.mark.parametrize("n", [0, -3, 2.7, True, "8"])
def test_max_new_tokens_must_be_a_positive_integer(demo, n):
    model, tok = demo
    with pytest.raises(ValueError, match=rf"max_new_tokens must be an integer >= 1, got {n!r}"):
        chat_generate(model, tok, [USER], max_new_tokens=n)


def test_cli_chat_repl_is_multi_turn(monkeypatch):
    from step3_jax import cli

    seen = []
    real = chat.chat_generate

    def spy(model, tok, messages, **kw):
        seen.append([dict(m) for m in messages])
        return real(model, tok, messages, **kw)

    monkeypatch.setattr(chat, "chat_generate", spy)
    args = cli.build_parser().parse_args(
        [
            "chat",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--no-compile-cache",
            "--system",
            "Be brief.",
        ]
    )
    stdin = io.StringIO("Who is Mr. Knightley?\n\nAnd Emma?\n/reset\nHello\n/exit\nnever read\n")
    out, err = io.StringIO(), io.StringIO()
    assert cli.cmd_chat(args, stdin=stdin, stdout=out, stderr=err) == 0
    assert out.getvalue().count("assistant> ") == 3
    turns = [s for s in seen if s[-1]["content"] != "Hello." or len(s) > 2]  # drop the warm-up
    assert [len(s) for s in turns] == [2, 4, 2]  # system+user; +reply+user; after /reset
    assert turns[1][2]["role"] == "assistant" and turns[1][2]["content"]
    assert turns[2] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    assert "conversation cleared" in err.getvalue()


def test_tokenizer_files_are_read_where_transformers_looks(tmp_path, tok):
    tok.save(tmp_path / "tokenizer.json")
    cfg = {"bos_token": {"content": BOS}, "eos_token": EOS, "add_bos_token": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "A"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    t = load_tokenizer(tmp_path)
    assert (t.chat_template, t.bos_id, t.eos_ids) == ("A", 2048, (2049, 0))
    assert t.encode("Emma", add_bos=True) == t.encode("Emma")  # add_bos_token: false
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": named}))
    assert load_tokenizer(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "B"}))
    assert load_tokenizer(tmp_path).chat_template == "B"  # the release keeps it here
    (tmp_path / "chat_template.jinja").write_text("C")
    assert load_tokenizer(tmp_path).chat_template == "C"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 99999]}))
    with pytest.raises(ValueError, match=r"eos_token_id \[99999\]"):
        load_tokenizer(tmp_path)
