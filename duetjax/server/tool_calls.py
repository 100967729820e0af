"""Tool calling for ``/v1/chat/completions``, as vLLM's ``--tool-call-parser`` does it.

The request side: which tools reach the chat template and whether the output is parsed
(``plan_tools``), and the chat history's earlier calls in the form templates expect
(``template_tool_calls``). The response side: ``ToolCallStream`` turns the growing text of one
choice into content deltas and whole calls; the non-streaming response runs it once on the
final text, so both paths split the same text the same way.

With tool_choice "auto" the calls are whatever the model writes, found by the parser. With
"required" or a named function the output is constrained to calls (structured.py has the
schemas) and read back without a parser: ``NamedCallStream`` (the whole output is the named
function's arguments) and ``RequiredCallsStream`` (a JSON array of calls). All three streams
answer ``step(text, final) -> (content delta, new calls)``.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, Protocol

from .errors import bad_request
from .protocol import (ChatCompletionRequest, ChatMessage, DeltaFunctionCall, DeltaToolCall,
                       FunctionCall, ToolCall)
from .structured import ForcedToolChoice, forced_tool_choice
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
    forced: ForcedToolChoice | None = None
    """tool_choice "required" or a named function: the output is constrained to calls (no
    parser needed)."""

    def call_stream(self) -> CallStream | None:
        """A fresh reader of one choice's calls; None: the text is all content."""
        if self.forced is not None:
            if self.forced.function is not None:
                return NamedCallStream(self.forced.function)
            return RequiredCallsStream()
        if self.parser is not None:
            return ToolCallStream(self.parser, self.parallel)
        return None


def plan_tools(request: ChatCompletionRequest, config: ToolCallConfig) -> ToolPlan:
    """The request's tool handling; a 400 when the server cannot do what it asks."""
    tools = [tool.template_dict() for tool in request.tools] if request.tools else None
    choice = request.effective_tool_choice
    if choice == "none":
        return ToolPlan(None if config.exclude_tools_when_tool_choice_none else tools)
    if choice != "auto":  # "required" or a named function: constrained, no parser needed
        return ToolPlan(tools, parallel=request.parallel_tool_calls is not False,
                        forced=forced_tool_choice(request))
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


class CallStream(Protocol):
    """Reads one choice's calls out of its growing text."""

    calls: list[ToolCall]
    """The calls returned so far."""
    content_started: bool
    """Some of the text was returned as content (else the message's content is null)."""

    def step(self, text: str, final: bool) -> tuple[str, list[DeltaToolCall]]:
        """What to send for ``text`` (the text so far; ``final``: all of it): new content and
        new calls or pieces of calls."""

    @property
    def ends_in_tool_calls(self) -> bool:
        """A finished ("stop") output answers finish_reason "tool_calls" rather than "stop"."""


def whole_call(index: int, name: str, arguments: str) -> tuple[ToolCall, DeltaToolCall]:
    """A new call, and the stream delta that carries all of it."""
    call = ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=arguments))
    return call, DeltaToolCall(index=index, id=call.id, type="function",
                               function=DeltaFunctionCall(name=name, arguments=arguments))


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
        for found_call in found[len(self.calls):]:
            call, delta = whole_call(len(self.calls), found_call.name, found_call.arguments)
            self.calls.append(call)
            new_calls.append(delta)
        if not self.content_started and (content.strip() or (final and not self.calls)):
            self.content_started = True
        delta = ""
        if self.content_started:
            delta = content[self.sent_content:]
            self.sent_content = len(content)
        return delta, new_calls

    @property
    def ends_in_tool_calls(self) -> bool:
        return bool(self.calls)


class NamedCallStream:
    """tool_choice naming a function: the whole output is that function's arguments (decoding
    is constrained to its parameters schema). They stream as they grow, as one call whose first
    piece carries the id, type and name. An output that is not complete JSON when it ends (cut
    off by max_tokens, or by a stop string) is content instead, unless some of it was already
    streamed as arguments: a stream cannot take them back, and its finish_reason ("length")
    then says the arguments are incomplete."""

    ends_in_tool_calls = False
    """vLLM answers a named function's call with the output's own finish_reason ("stop")."""

    def __init__(self, name: str):
        self.name = name
        self.calls: list[ToolCall] = []
        self.content_started = False
        self.sent = 0
        """Characters of the text already returned (as arguments or as content)."""

    def step(self, text: str, final: bool) -> tuple[str, list[DeltaToolCall]]:
        if not self.calls and final and not is_json(text):
            self.content_started = True
        piece = text[self.sent:]
        self.sent = len(text)
        if self.content_started:
            return piece, []
        if not piece:
            return "", []
        if not self.calls:
            call, delta = whole_call(0, self.name, piece)
            self.calls.append(call)
            return "", [delta]
        self.calls[0].function.arguments += piece
        return "", [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=piece))]


class RequiredCallsStream:
    """tool_choice "required": the output is a JSON array of ``{"name": ..., "parameters":
    {...}}`` (decoding is constrained to it, at most one element with parallel_tool_calls
    false). The calls are read when the output is complete and sent whole then: streaming each
    element as it closes would send calls that an output cut off later (max_tokens) could not
    take back, where the non-streamed answer for such an output is its raw text as content."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.content_started = False

    @property
    def ends_in_tool_calls(self) -> bool:
        return bool(self.calls)

    def step(self, text: str, final: bool) -> tuple[str, list[DeltaToolCall]]:
        if not final:
            return "", []
        found = required_calls(text)
        if found is None:
            self.content_started = True
            return text, []
        deltas = []
        for name, arguments in found:
            call, delta = whole_call(len(self.calls), name, arguments)
            self.calls.append(call)
            deltas.append(delta)
        return "", deltas


def required_calls(text: str) -> list[tuple[str, str]] | None:
    """(name, arguments as JSON text) of each call in a "required" output, or None when the
    text is not such an array (cut off)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list) or not value:
        return None
    calls = []
    for item in value:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                and isinstance(item.get("parameters"), dict)):
            return None
        calls.append((item["name"], json.dumps(item["parameters"], ensure_ascii=False)))
    return calls


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def finished_calls(stream: CallStream, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished text: what ``stream`` fed all of it at once sends (and so
    what streaming the same text adds up to). Content is None when none was returned."""
    content, _ = stream.step(text, final=True)
    return (content if stream.content_started else None), stream.calls


def extract_tool_calls(text: str, parser: ToolParser,
                       parallel: bool = True) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished text: what the stream of the same text adds up to."""
    return finished_calls(ToolCallStream(parser, parallel), text)
