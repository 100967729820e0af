"""Typed request and response bodies of the OpenAI wire format (the subset duetjax serves).

Requests reject unknown fields (``extra="forbid"``) so a typo or an unsupported OpenAI option
is answered with a 400 that names it, rather than silently ignored. Range checks live here so
pydantic's messages name the field: every number has the range ``SamplingParams`` documents
(integers bounded by what the device's int32 holds), no string may hold a lone surrogate and no
number may be NaN or infinite, anywhere in a body (``_Body``). Token ids are checked against the
vocabulary where it is known (``Serving.check_token_ids``). Options that the wire format has but
duetjax does not implement are checked in ``unsupported()`` and answered with a 400 that says so.
Tool calling follows OpenAI's shapes (``tools``, ``tool_choice``, ``message.tool_calls``);
what the server does with them is in ``tool_calls.py``. Structured outputs (``response_format``,
vLLM's ``structured_outputs``) become the engine's ``StructuredOutputsParams`` in
``structured.py``.
"""
from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any, Literal, NoReturn

from pydantic import (BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationInfo,
                      field_validator, model_serializer, model_validator)
from pydantic_core import PydanticCustomError

from ..sampling_params import (FLOAT32_MAX, INT32_MAX, LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS,
                               MAX_LOGPROBS, REPETITION_PENALTY_RANGE)

TokenIds = Annotated[list[StrictInt], Field(min_length=1)]
"""A prompt's ids: checked against the vocabulary by the server, with a message saying so."""
TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
MaxTokens = Annotated[int, Field(ge=1, le=INT32_MAX)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_json_values(data: Any) -> None:
    """Raises a validation error naming where ``data`` holds a string (or key) that is not
    valid Unicode (a lone surrogate: JSON's \\ud800 escape spells one, UTF-8 cannot encode it,
    so neither a tokenizer nor a response could take it) or a number that is not finite
    (Python's json reads NaN and Infinity, which are not JSON). Paths are built only for
    containers, so a long list of numbers costs one pass."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    while stack:
        path, container = stack.pop()
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in items:
            if isinstance(key, str) and not _is_unicode(key):
                _reject(path + (key,), "is a key that is not valid Unicode (it holds a lone "
                                       "surrogate); send UTF-8 text")
            if isinstance(value, str):
                if not _is_unicode(value):
                    _reject(path + (key,), "is not valid Unicode (it holds a lone surrogate, "
                                           f"{_first_surrogate(value)}); send UTF-8 text")
            elif isinstance(value, float):
                if not math.isfinite(value):
                    _reject(path + (key,), f"is {json.dumps(value)}, which is not a JSON number "
                                           "(NaN and Infinity are not JSON); send a finite number")
            elif isinstance(value, (dict, list)):
                stack.append((path + (key,), value))


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_surrogate(text: str) -> str:
    at = next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)
    return f"{ascii(text[at])} at character {at}"


def _reject(path: tuple[Any, ...], problem: str) -> NoReturn:
    field = ".".join(str(p).encode("utf-8", "backslashreplace").decode() for p in path)
    raise PydanticCustomError("invalid_json_value", "'{field}' {problem}",
                              {"field": field, "problem": problem})


class _Body(_Request):
    """A whole request body: its strings and numbers are checked before its fields."""

    @model_validator(mode="before")
    @classmethod
    def _valid_json_values(cls, data: Any) -> Any:
        if isinstance(data, (dict, list)):
            check_json_values(data)
        return data


class StreamOptions(_Request):
    include_usage: bool = False
    """Send one last chunk with token usage before ``[DONE]``."""
    continuous_usage_stats: bool = False
    """vLLM's: every chunk carries the usage so far (prompt, completion tokens so far, total)."""


class JsonSchemaFormat(_Request):
    """``response_format.json_schema`` (OpenAI's shape)."""

    name: Annotated[StrictStr, Field(min_length=1)]
    """The format's name (OpenAI requires it; it does not change the output)."""
    description: StrictStr | None = None
    """Accepted and ignored (what the format is for)."""
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    """The JSON schema the output must match (``schema`` on the wire; the Python name would
    shadow pydantic's ``BaseModel.schema``)."""
    strict: bool | None = None
    """Accepted; the output is always held to the schema (decoding is constrained)."""


class ResponseFormat(_Request):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    """With type "json_schema": the schema (and its name)."""

    @model_validator(mode="after")
    def _json_schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("type 'json_schema' needs 'json_schema': {'name': ..., "
                                 "'schema': {...}} (the JSON schema the output must match)")
            if self.json_schema.schema_ is None:
                raise ValueError("json_schema needs 'schema': the JSON schema the output must "
                                 "match (an object)")
        elif self.json_schema is not None:
            raise ValueError(f"json_schema goes with type 'json_schema', not {self.type!r}; "
                             "set type to 'json_schema' or leave json_schema out")
        return self


class StructuredOutputsRequest(_Request):
    """vLLM's extra ``structured_outputs``: what the output must match, exactly one field."""

    json_: dict[str, Any] | StrictStr | None = Field(default=None, alias="json")
    """A JSON schema (an object, or its JSON text); ``json`` on the wire (the Python name would
    shadow pydantic's ``BaseModel.json``)."""
    json_object: bool | None = None
    """True: the output is one JSON object, of any shape."""
    regex: StrictStr | None = None
    """A regular expression the whole output matches."""
    choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    """The output is exactly one of these strings."""
    grammar: StrictStr | None = None
    """A Lark (or GBNF) grammar the output follows."""


class _SamplingFields(_Body):
    """Fields shared by both endpoints, with OpenAI's names and vLLM's extras."""

    model: str | None = None
    """The served model name; None: the one model this server serves."""
    temperature: Annotated[float, Field(ge=0.0, le=FLOAT32_MAX)] | None = None
    """Below 1e-5: greedy (vLLM's rule)."""
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    """Extra (vLLM): keep the k most likely tokens; -1 or 0 disables; a k at least the
    vocabulary's size keeps every token."""
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Extra (vLLM): drop tokens below min_p times the top token's probability."""
    n: Annotated[int, Field(ge=1, le=64)] = 1
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[TokenId] | None = None
    """Extra (vLLM): token ids that end generation."""
    seed: Annotated[int, Field(ge=0, lt=2**32)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0
    """Extra (vLLM): EOS and stop token ids are ignored until this many tokens exist."""
    ignore_eos: bool = False
    """Extra (vLLM): keep generating past EOS (benchmarks)."""
    skip_special_tokens: bool = True
    """Extra (vLLM): leave special tokens out of the text."""
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(ge=REPETITION_PENALTY_RANGE[0],
                                               le=REPETITION_PENALTY_RANGE[1])] | None = None
    """Extra (vLLM): divide positive logits of tokens in the prompt or output by it, multiply
    negative ones; 1 disables."""
    logit_bias: dict[str, float] | None = None
    """{token id (as a string): bias in [-100, 100]} added to the logits (at most 300)."""
    user: str | None = None
    """Accepted and ignored (OpenAI's end-user id)."""
    response_format: ResponseFormat | None = None
    """{"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}: decoding is
    constrained to JSON (vLLM takes it on completions too); {"type": "text"}: no constraint."""
    structured_outputs: StructuredOutputsRequest | None = None
    """Extra (vLLM): constrain the output to a JSON schema, a regex, choices or a grammar; not
    together with a JSON response_format."""
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """Extra (vLLM): return ``prompt_logprobs``, per prompt token after the first its logprob
    and the N most likely tokens there (not with stream=true, as vLLM)."""

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_not_streamed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("stream"):
            raise ValueError("prompt_logprobs are not available with stream=true; leave one out")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_entries(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries are allowed, got {len(value)}")
        for key, bias in value.items():
            if not (key.isascii() and key.isdigit() and int(key) <= INT32_MAX):
                raise ValueError(f"keys must be token ids (integers in [0, {INT32_MAX}]), "
                                 f"got {key[:20]!r}")
            if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
                raise ValueError(f"biases must be in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], "
                                 f"got {bias} for token {key}")
        return value

    def token_logit_bias(self) -> dict[int, float] | None:
        """``logit_bias`` keyed by int token ids."""
        return None if self.logit_bias is None else {int(k): v for k, v in self.logit_bias.items()}

    def unsupported(self) -> str | None:
        """A message naming a requested option duetjax does not implement, else None."""
        if self.stream_options is not None and not self.stream:
            return "stream_options is only allowed with stream=true"
        return None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1)]
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    echo: bool = False
    """Prepend the prompt to the returned text (and its tokens to the logprobs)."""
    max_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = 16
    """Left out: the model's max_new_tokens if it sets one, else 16. None: the model's
    max_new_tokens, else up to the end of the context window. 0 (with echo): no new tokens,
    only the prompt and, with logprobs, its logprobs (what log-likelihood evaluations send)."""
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """Return the log-probabilities of each generated token and of the N most likely (with
    echo, of each prompt token after the first too)."""
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=64)] | None = None
    """Accepted when it equals n (one sequence per choice)."""

    @field_validator("max_tokens")
    @classmethod
    def _no_new_tokens_only_with_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value == 0 and not info.data.get("echo"):  # (echo is validated first)
            raise ValueError("max_tokens must be >= 1, or 0 with echo=true (the prompt only, "
                             "e.g. for its logprobs)")
        return value

    @property
    def generates(self) -> bool:
        """New tokens are returned (max_tokens 0 with echo returns the prompt only)."""
        return self.max_tokens != 0

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """The prompt logprobs the engine computes: ``prompt_logprobs``, and with echo and
        logprobs the N alternatives the echoed prompt tokens need."""
        wanted = [n for n in (self.prompt_logprobs, self.logprobs if self.echo else None)
                  if n is not None]
        return max(wanted, default=None)

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix (insertion) is not supported by duetjax; leave it out"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of other than n is not supported by duetjax; leave it out"
        return super().unsupported()


class ContentPart(BaseModel):
    """A part of a message's content; only ``{"type": "text", "text": ...}`` is served."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCallParam(BaseModel):
    """The function an earlier assistant message called (in the chat history)."""

    model_config = ConfigDict(extra="allow")
    name: StrictStr
    arguments: StrictStr | dict[str, Any] = ""
    """OpenAI sends a JSON string; the server hands templates the parsed object."""


class ToolCallParam(BaseModel):
    """One entry of an assistant message's ``tool_calls`` (in the chat history)."""

    model_config = ConfigDict(extra="allow")
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessage(BaseModel):
    """One message; extra keys (name, ...) reach the chat template as is."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallParam] | None = None
    """An assistant message's calls (content is then usually null)."""
    tool_call_id: StrictStr | None = None
    """A tool message: the id of the call it answers."""

    def text(self) -> str:
        """The content as one string; raises ValueError for non-text parts (images, audio)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type '{part.type}' are not supported by "
                                 "duetjax (it serves text models); send text parts only")
        return "".join(part.text or "" for part in self.content)


class FunctionDefinition(_Request):
    name: Annotated[StrictStr, Field(min_length=1)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    """The arguments' JSON schema: reaches the chat template as is; enforced (decoding
    constrained to it) only with tool_choice "required" or naming this function."""
    strict: bool | None = None
    """Accepted and ignored: the schema is enforced exactly when tool_choice forces a call."""


class ChatTool(_Request):
    """One entry of ``tools``: ``{"type": "function", "function": {...}}``."""

    type: Literal["function"]
    function: FunctionDefinition

    def template_dict(self) -> dict[str, Any]:
        """The tool as chat templates read it (OpenAI's shape, without unset keys)."""
        function = {k: v for k, v in self.function.model_dump().items() if v is not None}
        return {"type": self.type, "function": function}


class NamedFunction(_Request):
    name: StrictStr


class NamedToolChoice(_Request):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: NamedFunction


def check_tools(tools: list[ChatTool] | None) -> None:
    """Raises ValueError when two tools share a name (a call could not say which it means)."""
    seen: set[str] = set()
    for tool in tools or ():
        if tool.function.name in seen:
            raise ValueError(f"tool names must be unique; '{tool.function.name}' appears twice")
        seen.add(tool.function.name)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    """Deprecated by OpenAI in favour of max_completion_tokens; None: the model's
    max_new_tokens if it sets one, else to the context end."""
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    """Extra (vLLM): end the prompt with the assistant turn's header."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra (vLLM): more variables for the chat template."""
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """None: "auto" when tools are given, else "none" (OpenAI's default). "required" and a named
    function constrain the output to calls (structured.py)."""
    parallel_tool_calls: bool | None = None
    """False: at most one call (the first the model writes; with "required", the output is
    constrained to one)."""

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionRequest:
        check_tools(self.tools)
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools: send the functions the model may call in "
                             "'tools', or leave tool_choice out")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if all(tool.function.name != name for tool in self.tools or ()):
                raise ValueError(f"tool_choice names the function '{name}', which is not in tools")
        return self

    @property
    def effective_tool_choice(self) -> Literal["none", "auto", "required"] | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- responses --------------------------------------------------------------------------------

class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob``: one token's entry in ``prompt_logprobs`` (keyed by its id)."""

    logprob: float
    rank: int | None = None
    """1 for the most likely token; None for a prompt token below the N alternatives."""
    decoded_token: str


PromptLogprobs = list[dict[int, PromptLogprob] | None]
"""vLLM's ``prompt_logprobs``: None for the first prompt token, then per prompt token
{token id: its entry} for it and the N most likely tokens there."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    """With the extra ``prompt_logprobs`` (vLLM's)."""


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """A JSON object as a string."""


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    """The function part of a ``DeltaToolCall``."""

    name: str | None = None
    """In a call's first piece only."""
    arguments: str | None = None
    """More of the arguments' JSON text."""


class DeltaToolCall(BaseModel):
    """A call, or a piece of one, in a stream chunk: the first piece carries the id, type and
    name, later pieces only more ``arguments`` (OpenAI clients join them by ``index``). Parsed
    calls come whole, in one piece; a named tool_choice streams its arguments in pieces."""

    index: int
    """Position among the choice's calls."""
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        data["function"] = {k: v for k, v in data["function"].items() if v is not None}
        return {k: v for k, v in data.items() if v is not None}


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    """The model's thinking, with ``--reasoning-parser`` (vLLM's field)."""
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_no_tool_calls(self, handler: Any) -> dict[str, Any]:
        """``tool_calls`` only when the model called tools, as OpenAI answers; likewise
        ``reasoning_content`` only when there is some."""
        data = handler(self)
        for key in ("reasoning_content", "tool_calls"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None
    """With the extra ``prompt_logprobs`` (vLLM's: one prompt, so here, not per choice)."""


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        """A delta carries only what changed: ``{}`` in the last chunk, as OpenAI sends."""
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's): a prompt, or chat messages rendered by the chat template."""

    model: str | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: list[ChatTool] | None = None
    """With messages: the tools, rendered by the chat template as chat completions do."""
    add_generation_prompt: bool = True
    """With messages: end with the assistant turn's header, as chat completions do."""
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool | None = None
    """Add the tokens the tokenizer adds (BOS for most models). Default: yes for a prompt, as
    completions do; no for messages, whose chat template writes them."""
    return_token_strs: bool = False
    """Also return each token's vocabulary entry."""

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either 'prompt' (a string) or 'messages' (a chat), not both")
        if self.tools is not None and self.messages is None:
            raise ValueError("tools go with 'messages' (the chat template renders them)")
        check_tools(self.tools)
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's)."""

    model: str | None = None
    tokens: list[StrictInt]
    """Checked against the vocabulary by the server."""


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "duetjax"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo

