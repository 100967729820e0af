"""Reasoning parsers: split a thinking model's output into its reasoning and its answer (vLLM's
``--reasoning-parser``), for ``reasoning_content`` in /v1/chat/completions.

Same contract as the tool-call parsers (tool_parsers.py): ``scan(text, final)`` returns the
*decided* (reasoning, content) of ``text``; with ``final=False`` the text may still grow, so a
partial marker at the end (``</thi``) is held back. The decided reasoning and content of a
prefix are prefixes of those of the whole text, so streaming sends only what is new and adds up
to the non-streaming split. The tool-call parser then runs on the content only.
"""
from __future__ import annotations

import abc
from typing import ClassVar

from .tool_parsers import decided_end

START = "<think>"
END = "</think>"


class ReasoningParser(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def scan(self, text: str, final: bool) -> tuple[str, str]:
        """The decided (reasoning, content) of ``text``; with ``final`` all of it is decided."""


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: the reasoning is between ``<think>`` and ``</think>``; an output without
    ``<think>`` (enable_thinking=false) is all content. A ``<think>`` not closed by the end
    (cut off) leaves the rest as reasoning."""

    name = "qwen3"

    def scan(self, text: str, final: bool) -> tuple[str, str]:
        start = text.find(START)
        if start < 0:
            return "", text[:decided_end(text, START, 0, final)]
        body = start + len(START)
        end = text.find(END, body)
        if end < 0:
            return text[body:decided_end(text, END, body, final)], text[:start]
        return text[body:end], text[:start] + text[end + len(END):]


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1: the chat template opens ``<think>`` in the prompt, so the output starts in
    the reasoning (a ``<think>`` the model writes first anyway is dropped); everything up to
    ``</think>`` is reasoning, and without ``</think>`` by the end, everything is."""

    name = "deepseek_r1"

    def scan(self, text: str, final: bool) -> tuple[str, str]:
        body = 0
        if text.startswith(START):
            body = len(START)
        elif not final and START.startswith(text):  # may still become <think>
            return "", ""
        end = text.find(END, body)
        if end < 0:
            return text[body:decided_end(text, END, body, final)], ""
        return text[body:end], text[end + len(END):]


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    p.name: p for p in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)}


def reasoning_parser(name: str | None) -> ReasoningParser | None:
    if name is None:
        return None
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of "
                         f"{', '.join(sorted(REASONING_PARSERS))}")
    return REASONING_PARSERS[name]()


class ReasoningStream:
    """One choice's text, split into reasoning and content as it grows. ``step`` returns the new
    reasoning and the decided content so far (for the tool-call stream, which sends its own
    deltas); ``content_delta`` sends that content when there is no tool-call parser."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.sent_reasoning = 0
        self.sent_content = 0

    def step(self, text: str, final: bool) -> tuple[str, str]:
        reasoning, content = self.parser.scan(text, final)
        delta = reasoning[self.sent_reasoning:]
        self.sent_reasoning = len(reasoning)
        return delta, content

    def content_delta(self, content: str) -> str:
        delta = content[self.sent_content:]
        self.sent_content = len(content)
        return delta


def extract_reasoning(text: str, parser: ReasoningParser) -> tuple[str | None, str]:
    """(reasoning or None when empty, content) of a finished text."""
    reasoning, content = parser.scan(text, final=True)
    return reasoning or None, content
