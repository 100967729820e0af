"""Tokenizer and chat template with Hugging Face semantics, without transformers.

``Tokenizer`` wraps a ``tokenizers.Tokenizer`` (the Rust library behind every HF "fast"
tokenizer) and renders chat templates with jinja2 the way ``transformers`` does, so a prompt
built here tokenizes to exactly the ids a transformers user would send to the model.
``IncrementalDetokenizer`` turns a stream of sampled ids into text deltas for streaming.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return value["content"]
    raise ValueError(f"cannot read special token {value!r}: expected a string or a dict with 'content'")


def _as_id_list(value: Any) -> list[int]:
    """generation_config's eos_token_id is an int or a list of ints."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save or delete it") from None


def _named_templates(value: Any) -> dict[str, str]:
    """tokenizer_config's chat_template: one string, or a list of {"name", "template"} dicts."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list):
        return {item["name"]: item["template"] for item in value}
    raise ValueError(f"chat_template must be a string or a list of named templates, got {type(value)}")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` as in transformers' AssistantTracker.

    transformers uses the tag to mark assistant tokens for training masks; for serving it only
    has to render its body, but templates that use it must still parse.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes '<', '>', '&' and '\''; transformers replaces it with a
    # plain json.dumps so tool schemas reach the model verbatim. Do the same.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _check_unicode(text: Any) -> None:
    """ValueError saying where ``text`` is not valid Unicode: a lone surrogate, which UTF-8
    cannot encode, so no tokenizer can take it."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            at = error.start
            raise ValueError(f"the text is not valid Unicode: {ascii(text[at])} at character "
                             f"{at} is a lone surrogate; send UTF-8 text") from None


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled with the environment transformers uses (sandboxed, trimmed)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    """Text <-> ids plus the chat template, loaded from a Hugging Face model directory."""

    def __init__(self, backend: BackendTokenizer, *, special_tokens: Mapping[str, str | None] | None = None,
                 chat_templates: Mapping[str, str] | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None, generation_eos_ids: Iterable[int] = (),
                 name_or_path: str | None = None):
        """backend: the tokenizers.Tokenizer (tokenizer.json). special_tokens: bos/eos/unk/pad
        token strings. chat_templates: name -> jinja source ('default' is used unless another
        is asked for). add_bos_token / add_eos_token: None keeps tokenizer.json's post-processor;
        a bool rebuilds it like transformers does. generation_eos_ids: extra stop ids from
        generation_config.json."""
        self._backend = backend
        self.special_tokens = {k: (special_tokens or {}).get(k) for k in SPECIAL_TOKEN_KEYS}
        self.chat_templates = dict(chat_templates or {})
        self.name_or_path = name_or_path
        self._compiled: dict[str, jinja2.Template] = {}
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        eos = [self.eos_token_id] if self.eos_token_id is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos + list(generation_eos_ids)))
        """Every id that ends generation: the tokenizer's eos plus generation_config's."""

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Reads tokenizer.json, tokenizer_config.json, special_tokens_map.json,
        generation_config.json and chat_template.jinja (whichever exist) from a model directory."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {path}: duetjax reads only the fast-tokenizer format; save "
                "one with transformers' AutoTokenizer.from_pretrained(...).save_pretrained(dir)")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        special = {k: _token_text(config.get(k, special_map.get(k))) for k in SPECIAL_TOKEN_KEYS}

        templates = _named_templates(config.get("chat_template"))
        templates.update(_named_templates(_read_json(path / "chat_template.json").get("chat_template")))
        if (path / "chat_template.jinja").is_file():  # newer transformers save it separately
            templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        for extra in sorted((path / "additional_chat_templates").glob("*.jinja")):
            templates[extra.stem] = extra.read_text(encoding="utf-8")

        generation = _read_json(path / "generation_config.json")
        return cls(backend, special_tokens=special, chat_templates=templates,
                   add_bos_token=config.get("add_bos_token"), add_eos_token=config.get("add_eos_token"),
                   generation_eos_ids=_as_id_list(generation.get("eos_token_id")),
                   name_or_path=str(path))

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """What transformers' ``update_post_processor`` does for add_bos_token/add_eos_token."""
        bos, eos = self.special_tokens["bos_token"], self.special_tokens["eos_token"]
        if add_bos and bos is None:
            raise ValueError("add_bos_token is set but the tokenizer has no bos_token")
        if add_eos and eos is None:
            raise ValueError("add_eos_token is set but the tokenizer has no eos_token")
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        used = {t for t, on in ((bos, add_bos), (eos, add_eos)) if on}
        self._backend.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair),
            special_tokens=[(t, self._backend.token_to_id(t)) for t in used])

    # ---- ids -----------------------------------------------------------------------------

    @property
    def backend(self) -> BackendTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id`` as stored (e.g. 'Ġthe' for byte-level BPE,
        not the decoded ' the'); None for an id outside the vocabulary."""
        return self._backend.id_to_token(token_id)

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own eos; ``eos_token_ids`` is the full stop set."""
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (e.g. '<|im_end|>') map to
        their ids, as in transformers. ValueError for text that is not valid Unicode."""
        try:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            _check_unicode(text)  # (the backend's own message says only "must be str")
            raise

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """Source of the default chat template, or None (falsy) when the model has none."""
        return self.chat_templates.get("default")

    def _template(self, name: str | None, tools: Any) -> jinja2.Template:
        if not self.chat_templates:
            raise ValueError(
                f"the model at {self.name_or_path or '(in memory)'} has no chat template, so chat "
                "messages cannot be formatted: send a plain prompt (completions) instead, or add a "
                "'chat_template' to its tokenizer_config.json (or a chat_template.jinja file)")
        if name is None:
            name = "tool_use" if tools and "tool_use" in self.chat_templates else "default"
        if name not in self.chat_templates:
            raise ValueError(f"no chat template named {name!r}; this model has: "
                             f"{', '.join(sorted(self.chat_templates))}")
        if name not in self._compiled:
            self._compiled[name] = compile_chat_template(self.chat_templates[name])
        return self._compiled[name]

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None,
                            continue_final_message: bool = False, chat_template: str | None = None,
                            **kwargs: Any) -> str | list[int]:
        """The prompt for a conversation, rendered like ``transformers``' method of that name.

        Extra keyword arguments reach the template (e.g. ``enable_thinking=False``). The
        rendered text already holds bos when the template writes it, so tokenizing it adds no
        special tokens again. continue_final_message: end the prompt inside the last message
        (for prefilling the start of an answer) instead of closing it.
        """
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message are mutually exclusive")
        template = self._template(chat_template, tools)
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables.update(kwargs)
        rendered = template.render(messages=list(messages), tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **variables)
        if continue_final_message:
            rendered = self._cut_after_final_message(rendered, messages)
        if tokenize:
            return self.encode(rendered, add_special_tokens=False)
        return rendered

    @staticmethod
    def _cut_after_final_message(rendered: str, messages: Sequence[Mapping[str, Any]]) -> str:
        content = messages[-1].get("content") if messages else None
        if not isinstance(content, str):
            raise ValueError("continue_final_message needs a final message with string content")
        content = content.strip()
        at = rendered.rfind(content)
        if not content or at < 0:
            raise ValueError("continue_final_message: the final message's content does not appear "
                             "in the rendered chat (the template changes it)")
        return rendered[:at + len(content)]

    def incremental_detokenizer(self, prompt_ids: Sequence[int] = (),
                                skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        """A streaming detokenizer for one sequence; see ``IncrementalDetokenizer``."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Turns ids arriving one at a time into text deltas (vLLM's prefix/read-offset scheme).

    Each step decodes only a short window of recent ids: the text of the window before the
    new ids is subtracted from the text with them. When the newest ids end in an incomplete
    UTF-8 character (byte-level BPE splits multi-byte characters across tokens) the decode ends
    in U+FFFD and nothing is emitted until a later id completes it; ``flush`` emits whatever is
    left at the end, so the concatenated deltas equal ``decode(all generated ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        """prompt_ids: context before the first generated id (only its tail matters: it lets
        the first deltas decode with the spacing they have in context)."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = [int(i) for i in prompt_ids][-6:]
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._start = len(context)

    @property
    def generated_ids(self) -> list[int]:
        return self._ids[self._start:]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Feeds one id; returns the newly complete text (possibly '')."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text) \
                or not new_text.startswith(prefix_text):
            return ""  # incomplete character (or nothing new yet): wait for more ids
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text):]

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end); call once at the end."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text):] if new_text.startswith(prefix_text) else ""
