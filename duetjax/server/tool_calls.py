"""Tool calling for ``/v1/chat/completions``, as vLLM's ``--tool-call-parser`` does it.

The request side: which tools reach the chat template and whether the output is parsed
(``plan_tools``), and the chat history's earlier calls in the form templates expect
(``template_tool_calls``). The response side: ``ToolCallStream`` turns the growing text of one
choice into content deltas and whole calls; the non-streaming response runs it once on the
final text, so both paths split the same text the same way.

The calls are whatever the model writes (no constrained decoding), so tool_choice "required" or
a named function, which need the output forced into a call, are refused (400).
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from .errors import bad_request
from .protocol import ChatCompletionRequest, ChatMessage, DeltaToolCall, FunctionCall, ToolCall
from .tool_parsers import TOOL_PARSERS, ParsedCall, ToolParser


@dataclasses.dataclass(frozen=True)
class ToolCallConfig:
    """The server's tool-calling flags."""

    parser: str | None = None
    """``--tool-call-parser``: a name in TOOL_PARSERS; None: tool_choice "auto" is refused."""
    exclude_tools_when_tool_choice_none: bool = False
    """``--exclude-tools-when-tool-choice-none``: with tool_choice "none" the template gets no
    tools (by default it gets them, as in vLLM, and only parsing is off)."""

    def __post_init__(self) -> None:
        if self.parser is not None and self.parser not in TOOL_PARSERS:
            raise ValueError(f"unknown tool-call parser {self.parser!r}; choose one of "
                             f"{', '.join(sorted(TOOL_PARSERS))}")


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """What one request does with tools."""

    template_tools: list[dict[str, Any]] | None = None
    """The tools the chat template renders."""
    parser: ToolParser | None = None
    """Parses the output into calls; None: the text is all content."""
    parallel: bool = True
    """False (parallel_tool_calls=false): only the first call is kept."""


def plan_tools(request: ChatCompletionRequest, config: ToolCallConfig) -> ToolPlan:
    """The request's tool handling; a 400 when the server cannot do what it asks."""
    tools = [tool.template_dict() for tool in request.tools] if request.tools else None
    choice = request.effective_tool_choice
    if choice == "none":
        return ToolPlan(None if config.exclude_tools_when_tool_choice_none else tools)
    if choice != "auto":  # request.unsupported() answers these first
        raise bad_request(f"tool_choice {choice!r} is not supported by duetjax", "tool_choice")
    if config.parser is None:
        raise bad_request(
            'tool_choice "auto" (the default when tools are given) needs a tool-call parser: start '
            "the server with --tool-call-parser " + "|".join(sorted(TOOL_PARSERS)) +
            " (and --enable-auto-tool-choice, as vLLM spells it), or send tool_choice \"none\"",
            "tool_choice")
    return ToolPlan(tools, TOOL_PARSERS[config.parser](), request.parallel_tool_calls is not False)


def template_tool_calls(message: ChatMessage, index: int) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` with each ``function.arguments`` parsed into an
    object: OpenAI clients send a JSON string, and chat templates (Llama 3.1, Qwen, Hermes...)
    iterate over it or ``tojson`` it, which needs the object (vLLM parses it too)."""
    calls = []
    for j, call in enumerate(message.tool_calls or ()):
        arguments = call.function.arguments
        if isinstance(arguments, str):
            param = f"messages.{index}.tool_calls.{j}.function.arguments"
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError as error:
                raise bad_request(f"{param} is not valid JSON ({error}); send the arguments as "
                                  "a JSON object in a string, as the model's call returned them",
                                  param) from None
            if not isinstance(arguments, dict):
                raise bad_request(f"{param} must be a JSON object, got {type(arguments).__name__}",
                                  param)
        entry = call.model_dump(exclude_none=True)
        entry["function"] = {**entry["function"], "arguments": arguments}
        calls.append(entry)
    return calls


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """One choice's text, split into content and calls as it grows.

    ``step`` takes the text so far (safe to show: stop-string holdback already removed) and
    returns what to send now: new content and new whole calls. Content that is only whitespace
    is held back until non-whitespace content arrives or the text ends without a call, so a
    reply of only calls has ``content: null``, the same whether streamed or not.
    """

    def __init__(self, parser: ToolParser, parallel: bool = True):
        self.parser = parser
        self.parallel = parallel
        self.sent_content = 0
        """Characters of the content already returned."""
        self.calls: list[ToolCall] = []
        """The calls already returned."""
        self.content_started = False

    def step(self, text: str, final: bool) -> tuple[str, list[DeltaToolCall]]:
        segments = self.parser.scan(text, final)
        content = "".join(s for s in segments if isinstance(s, str))
        found = [s for s in segments if isinstance(s, ParsedCall)]
        if not self.parallel:
            found = found[:1]
        new_calls = []
        for call in found[len(self.calls):]:
            new = DeltaToolCall(index=len(self.calls), id=new_call_id(),
                                function=FunctionCall(name=call.name, arguments=call.arguments))
            self.calls.append(ToolCall(id=new.id, function=new.function))
            new_calls.append(new)
        if not self.content_started and (content.strip() or (final and not self.calls)):
            self.content_started = True
        delta = ""
        if self.content_started:
            delta = content[self.sent_content:]
            self.sent_content = len(content)
        return delta, new_calls


def extract_tool_calls(text: str, parser: ToolParser,
                       parallel: bool = True) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished text: what the stream of the same text adds up to."""
    stream = ToolCallStream(parser, parallel)
    content, _ = stream.step(text, final=True)
    return (content if stream.content_started else None), stream.calls
