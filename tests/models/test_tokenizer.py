"""Tokenizer and chat template, on the embedded SmolLM2 (converted once per test session)."""
from __future__ import annotations

import json
import shutil

import jinja2
import pytest

from models.tokenizer import Tokenizer

CHATML_SYSTEM_USER = (
    "<|im_start|>system\nYou are a pirate.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
)
ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.\n\nNew paragraph\twith a tab.",
    "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "Emoji 😀🎉👩‍💻🇫🇷 and symbols ∑∫√ — “quotes”",
    "Digits 0123456789, 3.14159, 2024-11-21, 1,000,000",
    "    leading and trailing spaces    ",
    "def f(x):\n    return x ** 2  # code\n",
]


@pytest.fixture(scope="module")
def tok(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_text_that_is_not_unicode_is_a_clear_error(tok):
    # JSON's "\ud800" escape reaches Python as a lone surrogate, which UTF-8 cannot encode.
    with pytest.raises(ValueError, match=r"not valid Unicode: '\\ud800' at character 1 is a lone surrogate"):
        tok.encode("a\ud800b")


def test_digits_are_split_one_per_token(tok):
    ids = tok.encode("x 1234567890", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[-10:] == list("1234567890")
    assert tok.backend.pre_tokenizer.pre_tokenize_str("ab12")[1:] == [("1", (2, 3)), ("2", (3, 4))]


def test_special_tokens(tok):
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert (tok.bos_token_id, tok.pad_token_id, tok.vocab_size) == (im_start, im_end, 49152)
    assert im_end in tok.eos_token_ids
    assert tok.encode("<|im_end|>") == [im_end]  # written specials map to their ids
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # SmolLM2 adds no bos
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_chat_template_system_and_user(tok):
    messages = [{"role": "system", "content": "You are a pirate."},
                {"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == CHATML_SYSTEM_USER
    assert tok.apply_chat_template(messages) == CHATML_SYSTEM_USER + "<|im_start|>assistant\n"


def test_chat_template_inserts_default_system_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenized_chat_adds_no_second_bos(tok):
    messages = [{"role": "user", "content": "Hi"}]
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert ids == tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    tail = tok.encode("<|im_start|>assistant\n")
    assert ids[-len(tail):] == tail


def test_continue_final_message(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello the"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nHello the")


def test_incremental_detokenizer_matches_full_decode(tok):
    text = "Grüße aus Köln! 日本語 😀🎉👩‍💻 — fin."
    ids = tok.encode(text, add_special_tokens=False)
    # The test needs a character split across tokens: some id alone decodes to U+FFFD.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = tok.incremental_detokenizer()
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    assert detok.generated_ids == ids


def test_incremental_detokenizer_skips_special_tokens(tok):
    ids = tok.encode("Paris.<|im_end|>", add_special_tokens=False)
    detok = tok.incremental_detokenizer()
    assert "".join(detok.add(i) for i in ids) + detok.flush() == "Paris."
    detok = tok.incremental_detokenizer(skip_special_tokens=False)
    assert detok.add_many(ids) + detok.flush() == "Paris.<|im_end|>"


def _variant_dir(smollm2_dir, tmp_path, config: dict, generation: dict | None = None):
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_from_dir_reads_hf_variants(smollm2_dir, tmp_path):
    config = {
        "bos_token": {"content": "<|im_start|>", "lstrip": False, "special": True},  # AddedToken dict
        "eos_token": "<|endoftext|>",
        "add_bos_token": True,
        "chat_template": [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
                          {"name": "tool_use", "template": "T{{ tools | tojson }}"}],
    }
    tok = Tokenizer.from_dir(_variant_dir(smollm2_dir, tmp_path, config, {"eos_token_id": [2, 0, 7]}))
    assert tok.eos_token_ids == (0, 2, 7)  # tokenizer eos first, then generation_config's
    assert tok.encode("hi")[0] == tok.bos_token_id == 1
    assert tok.encode("hi", add_special_tokens=False)[0] != 1
    messages = [{"role": "user", "content": "x<y>"}]
    assert tok.apply_chat_template(messages) == "Dx<y>"
    tools = [{"name": "f", "description": "a<b & c"}]
    assert tok.apply_chat_template(messages, tools=tools) == 'T[{"name": "f", "description": "a<b & c"}]'
    (tmp_path / "chat_template.jinja").write_text("J{{ bos_token }}{{ eos_token }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(messages) == "J<|im_start|><|endoftext|>"


def test_template_helpers(smollm2_dir, tmp_path):
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
        "|{{ strftime_now('%Y') | length }}|{{ flag }}"
        "{% if messages | length > 3 %}{{ raise_exception('too many: ' ~ messages | length) }}{% endif %}"
    )
    tok = Tokenizer.from_dir(_variant_dir(smollm2_dir, tmp_path, {"chat_template": template}))
    messages = [{"role": "user", "content": c} for c in "abc"]
    assert tok.apply_chat_template(messages, flag="on") == "ab|4|on"
    with pytest.raises(jinja2.exceptions.TemplateError, match="too many: 6"):
        tok.apply_chat_template(messages * 2)


def test_missing_chat_template_is_a_clear_error(smollm2_dir, tmp_path):
    tok = Tokenizer.from_dir(_variant_dir(smollm2_dir, tmp_path, {"eos_token": "<|im_end|>"}))
    assert not tok.chat_template
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_id_to_token_gives_the_vocabulary_entry_and_none_past_it(tok):
    ids = tok.encode(" the", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == ["Ġthe"]  # the stored piece, not " the"
    assert tok.id_to_token(tok.token_to_id("<|im_end|>")) == "<|im_end|>"
    assert tok.id_to_token(tok.vocab_size) is None
