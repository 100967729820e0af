"""Structured outputs in the server: what a request asks the output to match, as the engine's
``StructuredOutputsParams`` (decoding constrained by llguidance, see structured_outputs.py).

Three sources, as vLLM's OpenAI server has them:
- ``response_format``: ``{"type": "json_object"}`` (any JSON object) or ``{"type":
  "json_schema", "json_schema": {"schema": ...}}`` (JSON matching the schema), on chat and on
  completions; ``{"type": "text"}`` constrains nothing.
- vLLM's extra ``structured_outputs``: ``json``, ``json_object``, ``regex``, ``choice`` or
  ``grammar``.
- chat's ``tool_choice``: a named function constrains the output to that function's
  ``parameters`` schema (the whole output is the call's arguments); ``"required"`` to a JSON
  array of ``{"name": ..., "parameters": ...}`` calls of the given tools. tool_calls.py reads
  the calls back out of the output.

At most one source per request: two would need both constraints at once, which the engine does
not do, so the request gets a 400 naming them.

With a reasoning parser the whole output is constrained, reasoning included (vLLM constrains
only what follows the reasoning); chat.py then leaves the reasoning parser out, since a
constrained output holds no ``<think>`` block.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

from ..structured_outputs import StructuredOutputsParams
from .errors import bad_request
from .protocol import ChatCompletionRequest, ChatTool, NamedToolChoice

ANY_OBJECT: dict[str, Any] = {"type": "object"}
"""The arguments of a function whose tool sends no ``parameters``."""
DEFINITION_KEYS = ("$defs", "definitions")
"""Where a schema keeps the subschemas its ``$ref``s point at (``#/$defs/...``)."""


@dataclasses.dataclass(frozen=True)
class ForcedToolChoice:
    """tool_choice "required" or a named function: the output is constrained to calls."""

    function: str | None
    """The named function; None: "required" (one or more calls of any of the tools)."""
    schema: dict[str, Any] = dataclasses.field(hash=False)
    """The JSON schema the output must match: the function's parameters, or, for "required",
    an array of ``{"name": ..., "parameters": ...}`` objects."""


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What one request's output must match, and which request field asked for it."""

    params: StructuredOutputsParams
    """What the engine constrains decoding to."""
    field: str
    """The request field it came from ("response_format", "structured_outputs" or
    "tool_choice"): the ``param`` of an error about it (e.g. a schema that does not compile)."""


def forced_tool_choice(request: ChatCompletionRequest) -> ForcedToolChoice | None:
    """The constraint of tool_choice "required" or a named function, else None. (The request's
    validators already checked that a named function is among the tools.)"""
    choice = request.effective_tool_choice
    tools = request.tools or []
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return ForcedToolChoice(tool.function.name, named_function_schema(tool))
    if choice == "required":
        return ForcedToolChoice(None, required_calls_schema(
            tools, parallel=request.parallel_tool_calls is not False))
    return None


def named_function_schema(tool: ChatTool) -> dict[str, Any]:
    """The output of a named tool_choice: the function's arguments (vLLM's schema)."""
    return tool.function.parameters or dict(ANY_OBJECT)


def required_calls_schema(tools: list[ChatTool], parallel: bool = True) -> dict[str, Any]:
    """The output of tool_choice "required": a JSON array of one or more calls (just one when
    ``parallel`` is false), each ``{"name": <a tool's name>, "parameters": <its arguments>}``.

    Each tool's ``$defs`` move to the array's root, where the ``#/$defs/...`` references in its
    parameters (written against the parameters' own root) then resolve; two tools defining one
    name differently cannot share the root, which is a 400.
    """
    definitions: dict[str, dict[str, Any]] = {}
    alternatives = []
    for tool in tools:
        parameters = copy.deepcopy(tool.function.parameters) or dict(ANY_OBJECT)
        for key in DEFINITION_KEYS:
            for name, definition in (parameters.pop(key, None) or {}).items():
                ref = f"{key}/{name}"
                if ref in definitions and definitions[ref] != definition:
                    raise bad_request(
                        f"tool_choice \"required\" puts every tool's schema in one; the tools "
                        f"define '{ref}' differently (in '{tool.function.name}' and an earlier "
                        "tool): rename one of them", param="tools")
                definitions[ref] = definition
        alternatives.append({
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, "parameters": parameters},
            "required": ["name", "parameters"],
            "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}
    if not parallel:
        schema["maxItems"] = 1
    for ref, definition in definitions.items():
        key, name = ref.split("/", 1)
        schema.setdefault(key, {})[name] = definition
    return schema


def asks_for_structured_output(request: Any) -> bool:
    """Whether ``response_format`` or ``structured_outputs`` constrains the output (cheap: no
    checks, for code that runs after ``requested_structured_outputs`` accepted the request)."""
    response_format = request.response_format
    return request.structured_outputs is not None or (
        response_format is not None and response_format.type != "text")


def requested_structured_outputs(request: Any) -> Constraint | None:
    """The constraint that ``response_format`` or ``structured_outputs`` asks for (both
    endpoints), else None; a 400 when both do or the fields do not make one."""
    response_format = request.response_format
    if response_format is not None and response_format.type == "text":
        response_format = None
    extra = request.structured_outputs
    if response_format is not None and extra is not None:
        raise bad_request(
            f"response_format {response_format.type!r} and structured_outputs both constrain the "
            "output, and only one constraint can apply; send one of them", param="response_format")
    if response_format is not None:
        if response_format.type == "json_object":
            fields: dict[str, Any] = {"json_object": True}
        else:
            assert response_format.json_schema is not None  # the protocol's validator checks it
            fields = {"json": response_format.json_schema.schema_}
        return Constraint(_params(fields, "response_format"), "response_format")
    if extra is not None:
        fields = {"json": extra.json_, "json_object": bool(extra.json_object),
                  "regex": extra.regex, "choice": extra.choice, "grammar": extra.grammar}
        return Constraint(_params(fields, "structured_outputs"), "structured_outputs")
    return None


def chat_constraint(request: ChatCompletionRequest,
                    forced: ForcedToolChoice | None) -> Constraint | None:
    """A chat request's constraint: its forced tool_choice's, or what response_format or
    structured_outputs asks for; a 400 when both would apply."""
    requested = requested_structured_outputs(request)
    if forced is None:
        return requested
    if requested is not None:
        which = "\"required\"" if forced.function is None else f"naming '{forced.function}'"
        raise bad_request(
            f"tool_choice {which} constrains the output to tool calls, so {requested.field} "
            f"cannot constrain it too; leave out {requested.field} or use tool_choice \"auto\"",
            param=requested.field)
    return Constraint(_params({"json": forced.schema}, "tool_choice"), "tool_choice")


def _params(fields: dict[str, Any], field: str) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as error:
        raise bad_request(f"{field}: {error}", param=field) from None
