"""Tool-call parsers: find the function calls a model wrote in its text (vLLM's
``--tool-call-parser``).

A parser splits generated text into *segments*, each either plain text (content) or a
``ParsedCall``. One method serves both the non-streaming and the streaming path:
``scan(text, final)``. With ``final=False`` the text may still grow, so a parser returns only
the segments it has *decided* (text that may still turn out to be part of a call, such as
``<tool_ca`` at the end or an unclosed call, is left out). The contract that makes streaming
equal to non-streaming: the decided segments of a prefix are a prefix of the segments of the
whole text (the last content segment may grow). Streaming then only sends what is new.

Anything that looks like a call but does not parse (bad JSON, no "name") stays content,
markers included, so nothing the model wrote is lost.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import re
from typing import Any, ClassVar, Union


@dataclasses.dataclass(frozen=True)
class ParsedCall:
    """One function call found in the text."""

    name: str
    arguments: str
    """A JSON object, as a string (what OpenAI sends in ``function.arguments``)."""


Segment = Union[str, ParsedCall]


class ToolParser(abc.ABC):
    """Finds the tool calls of one model family's output format."""

    name: ClassVar[str]

    @abc.abstractmethod
    def scan(self, text: str, final: bool) -> list[Segment]:
        """The decided segments of ``text`` in order; with ``final`` the whole text is decided."""


def call_from_json(source: str) -> ParsedCall | None:
    """A call from ``{"name": ..., "arguments" | "parameters": {...}}``, or None when
    ``source`` is not such an object (the caller then keeps the text as content)."""
    try:
        value = json.loads(source)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments: Any = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def partial_marker_length(text: str, marker: str, start: int = 0) -> int:
    """Length of the longest end of ``text[start:]`` that is a proper prefix of ``marker``:
    characters that may become the marker once more text arrives."""
    for k in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def decided_end(text: str, marker: str, start: int, final: bool) -> int:
    """Where the decided part of ``text[start:]`` (holding no ``marker``) ends: all of it
    when ``final``, else up to a partial ``marker`` at its end."""
    return len(text) if final else len(text) - partial_marker_length(text, marker, start)


_STRUCTURE = re.compile(r'[{}"]')
_IN_STRING = re.compile(r'["\\]')


def json_object_end(text: str, start: int) -> int | None:
    """The index after the ``}`` that closes the object opening at ``text[start]`` (a ``{``),
    or None while it is not closed yet. Braces inside strings do not count; whether the object
    is valid JSON is for ``json.loads`` to say."""
    depth = 0
    at = start
    while True:
        match = _STRUCTURE.search(text, at)
        if match is None:
            return None
        at = match.end()
        char = match.group()
        if char == '"':
            while True:
                match = _IN_STRING.search(text, at)
                if match is None:
                    return None
                at = match.end() + (1 if match.group() == "\\" else 0)
                if match.group() == '"':
                    break
        elif char == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return at


class HermesToolParser(ToolParser):
    """Hermes / Qwen2.5 / Qwen3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    blocks anywhere in the text, any number of them. A block still open at the end of the
    text (the model stopped before ``</tool_call>``, e.g. on a stop string) is parsed too."""

    name = "hermes"
    START = "<tool_call>"
    END = "</tool_call>"

    def scan(self, text: str, final: bool) -> list[Segment]:
        segments: list[Segment] = []
        at = 0
        while True:
            start = text.find(self.START, at)
            if start < 0:
                segments.append(text[at:decided_end(text, self.START, at, final)])
                return segments
            segments.append(text[at:start])
            body = start + len(self.START)
            end = text.find(self.END, body)
            if end < 0:  # open: a call only once the text is complete
                if final:
                    segments.append(call_from_json(text[body:].strip()) or text[start:])
                return segments
            at = end + len(self.END)
            segments.append(call_from_json(text[body:end].strip()) or text[start:at])


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1 / 3.2 JSON tool calls: ``{"name": ..., "parameters": {...}}`` objects (or
    "arguments"), several separated by ``;``, at the start of the text or after
    ``<|python_tag|>``. Text after the last object is content. (``<|python_tag|>`` is a special
    token: with the default skip_special_tokens it is not in the text, and the calls then start
    the text.) A ``{`` elsewhere in prose is not taken for a call."""

    name = "llama3_json"
    TAG = "<|python_tag|>"
    _SPACE = re.compile(r"\s*")

    def _skip_space(self, text: str, at: int) -> int:
        return self._SPACE.match(text, at).end()

    def scan(self, text: str, final: bool) -> list[Segment]:
        segments: list[Segment] = []
        first = self._skip_space(text, 0)
        if first == len(text):  # nothing but whitespace yet: content either way
            return [text]
        at = 0
        region = first if text[first] == "{" else None  # where a run of calls may begin
        while True:
            if region is None:
                tag = text.find(self.TAG, at)
                if tag < 0:
                    segments.append(text[at:decided_end(text, self.TAG, at, final)])
                    return segments
                segments.append(text[at:tag])
                at, region = tag, tag + len(self.TAG)
            # text[at:region] is the tag (or leading whitespace); a run of calls may follow
            calls, after, decided = self._calls(text, region, final)
            lead = text[at:region]  # the tag, or whitespace before a leading '{'
            if not decided:  # whitespace is content either way; the tag waits for the verdict
                segments.append(lead if lead.isspace() else "")
                segments.extend(calls)
                return segments
            if not calls or lead.isspace():  # no call after all: the tag is content
                segments.append(lead)
            segments.extend(calls)
            at, region = after, None

    def _calls(self, text: str, start: int, final: bool) -> tuple[list[ParsedCall], int, bool]:
        """The calls from ``start`` on: (calls, where the content after them begins, whether
        the run of calls has ended). While undecided, the calls found so far are complete."""
        calls: list[ParsedCall] = []
        end = start  # after the last call (and for the first, the start)
        while True:
            begin = self._skip_space(text, end)
            if calls:  # another call needs a ';' first
                if begin == len(text):
                    return calls, end, final
                if text[begin] != ";":
                    return calls, end, True
                begin = self._skip_space(text, begin + 1)
            if begin == len(text):
                if final and calls:  # a trailing ';' belongs to the calls
                    return calls, len(text), True
                return calls, end, final
            if text[begin] != "{":
                return calls, end, True
            close = json_object_end(text, begin)
            if close is None:
                return calls, end, final
            call = call_from_json(text[begin:close])
            if call is None:
                return calls, end, True
            calls.append(call)
            end = close


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser)}
"""``--tool-call-parser`` names."""
