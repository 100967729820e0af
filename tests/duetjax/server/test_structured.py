"""Structured outputs in the server: request fields to ``StructuredOutputsParams``, the tool
schemas of tool_choice "required" and a named function (checked with llguidance on the tiny
model's tokenizer), reading the calls back (streamed == non-streamed, on scripted outputs), and
the whole path through the real server."""
from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
from pydantic import ValidationError

from duetjax.sampling_params import SamplingParams
from duetjax.server.chat import ChatCompletions
from duetjax.server.errors import APIError
from duetjax.server.protocol import ChatCompletionRequest, CompletionRequest
from duetjax.server.reasoning import reasoning_parser
from duetjax.server.structured import (chat_constraint, forced_tool_choice,
                                       requested_structured_outputs, required_calls_schema)
from duetjax.server.tool_calls import (NamedCallStream, RequiredCallsStream, ToolCallConfig,
                                       finished_calls, plan_tools, required_calls)
from duetjax.structured_outputs import GrammarCompiler, StructuredOutputsParams

from .conftest import API_KEY, TINY_SERVER_ARGS
from .helpers import TINY_CHAT_LLAMA, ServerProcess
from .test_tool_calls import answer_both_ways, chat_completions, outputs_of

MESSAGES = [{"role": "user", "content": "hi"}]
FLAG = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
        "additionalProperties": False}
"""A small bounded schema: ``{"a": true|false}``, a dozen tokens at most without whitespace."""
SET_FLAG = {"type": "function", "function": {"name": "set_flag", "parameters": FLAG}}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters
NAMED = {"type": "function", "function": {"name": "set_flag"}}
NO_WHITESPACE = {str(ord(c)): -100 for c in " \n\t\r"}
"""logit_bias that keeps the random model from filling a JSON output with whitespace (which
the JSON grammar allows), so bounded schemas finish within a few tokens (one token a byte)."""


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MESSAGES, **fields)


def params_of(request) -> StructuredOutputsParams | None:
    constraint = requested_structured_outputs(request)
    return None if constraint is None else constraint.params


# ---- the request fields -----------------------------------------------------------------------

def test_response_format_maps_to_structured_outputs():
    assert params_of(chat()) is None
    assert params_of(chat(response_format={"type": "text"})) is None
    assert params_of(chat(response_format={"type": "json_object"})) == StructuredOutputsParams(
        json_object=True)
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    body = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert params_of(chat(response_format=body)).json == schema
    constraint = requested_structured_outputs(CompletionRequest(prompt="p", response_format=body))
    assert constraint.params.json == schema and constraint.field == "response_format"


@pytest.mark.parametrize("extra,expected", [
    ({"json": FLAG}, StructuredOutputsParams(json=FLAG)),
    ({"json": json.dumps(FLAG)}, StructuredOutputsParams(json=FLAG)),
    ({"json_object": True}, StructuredOutputsParams(json_object=True)),
    ({"regex": "[ab]+"}, StructuredOutputsParams(regex="[ab]+")),
    ({"choice": ["yes", "no"]}, StructuredOutputsParams(choice=["yes", "no"])),
    ({"grammar": 'start: "a" | "b"'}, StructuredOutputsParams(grammar='start: "a" | "b"')),
])
def test_vllm_structured_outputs_on_both_endpoints(extra, expected):
    for request in (chat(structured_outputs=extra),
                    CompletionRequest(prompt="p", structured_outputs=extra)):
        constraint = requested_structured_outputs(request)
        assert constraint.params == expected and constraint.field == "structured_outputs"
        sampling = SamplingParams(structured_outputs=constraint.params)
        assert sampling.structured_outputs == expected


@pytest.mark.parametrize("fields,words", [
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "response_format 'json_object' and structured_outputs both"),
    ({"structured_outputs": {}}, "exactly one of json"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "got regex, choice"),
    ({"structured_outputs": {"json": "{not json"}}, "not a valid JSON schema"),
])
def test_conflicting_or_empty_constraints_are_400s(fields, words):
    with pytest.raises(APIError) as error:
        requested_structured_outputs(chat(**fields))
    assert error.value.status == 400 and words in error.value.message
    assert error.value.param in ("response_format", "structured_outputs")


@pytest.mark.parametrize("response_format,words", [
    ({"type": "json_schema"}, "needs 'json_schema'"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema needs 'schema'"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
    ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, "goes with type"),
    ({"type": "structural_tag"}, "type"),
])
def test_malformed_response_format_is_a_validation_error(response_format, words):
    with pytest.raises(ValidationError, match=words):
        chat(response_format=response_format)


def test_unknown_structured_outputs_field_is_a_validation_error():
    with pytest.raises(ValidationError, match="whitespace_pattern"):
        chat(structured_outputs={"json": {}, "whitespace_pattern": " "})
    with pytest.raises(ValidationError, match="choice"):
        chat(structured_outputs={"choice": []})


# ---- tool_choice "required" and a named function ----------------------------------------------

def test_named_function_is_its_parameters_schema():
    forced = forced_tool_choice(chat(tools=[PING, SET_FLAG], tool_choice=NAMED))
    assert forced.function == "set_flag" and forced.schema == FLAG
    ping = forced_tool_choice(chat(tools=[PING], tool_choice={"type": "function",
                                                              "function": {"name": "ping"}}))
    assert ping.schema == {"type": "object"}
    assert forced_tool_choice(chat(tools=[PING], tool_choice="auto")) is None
    assert forced_tool_choice(chat(tools=[PING], tool_choice="none")) is None


def test_required_is_an_array_of_named_calls():
    forced = forced_tool_choice(chat(tools=[SET_FLAG, PING], tool_choice="required"))
    assert forced.function is None
    assert forced.schema == {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": "set_flag"}, "parameters": FLAG},
         "required": ["name", "parameters"], "additionalProperties": False},
        {"type": "object", "properties": {"name": {"const": "ping"},
                                          "parameters": {"type": "object"}},
         "required": ["name", "parameters"], "additionalProperties": False}]}}
    single = forced_tool_choice(chat(tools=[PING], tool_choice="required",
                                     parallel_tool_calls=False))
    assert single.schema["maxItems"] == 1


def test_required_moves_each_tools_defs_to_the_root():
    color = {"type": "object", "properties": {"c": {"$ref": "#/$defs/Color"}},
             "$defs": {"Color": {"enum": ["red", "blue"]}}}
    tool = {"type": "function", "function": {"name": "paint", "parameters": color}}
    request = chat(tools=[tool, SET_FLAG], tool_choice="required")
    schema = forced_tool_choice(request).schema
    assert schema["$defs"] == {"Color": {"enum": ["red", "blue"]}}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    assert "$defs" in request.tools[0].function.parameters  # the request is left as it was
    other = {"type": "function", "function": {"name": "other", "parameters": {
        "type": "object", "$defs": {"Color": {"enum": ["green"]}}}}}
    with pytest.raises(APIError, match="define '\\$defs/Color' differently"):
        required_calls_schema(ChatCompletionRequest(
            messages=MESSAGES, tools=[tool, other]).tools)


def test_forced_tool_choice_plans_and_constrains_without_a_parser():
    request = chat(tools=[SET_FLAG], tool_choice=NAMED)
    plan = plan_tools(request, ToolCallConfig())  # no --tool-call-parser needed
    assert plan.parser is None and plan.forced.function == "set_flag"
    assert plan.template_tools == [SET_FLAG]  # the tools still reach the chat template
    constraint = chat_constraint(request, plan.forced)
    assert constraint.params == StructuredOutputsParams(json=FLAG)
    assert constraint.field == "tool_choice"
    both = chat(tools=[SET_FLAG], tool_choice="required", response_format={"type": "json_object"})
    with pytest.raises(APIError, match="leave out response_format"):
        chat_constraint(both, plan_tools(both, ToolCallConfig()).forced)


@pytest.fixture(scope="module")
def grammars(tiny_chat_dir) -> GrammarCompiler:
    """llguidance on the tiny chat model's tokenizer: one token a byte (ids 0..255)."""
    return GrammarCompiler((tiny_chat_dir / "tokenizer.json").read_text(),
                           TINY_CHAT_LLAMA["vocab_size"], [TINY_CHAT_LLAMA["eos_token_id"]])


def accepts(grammars: GrammarCompiler, schema: dict, text: str) -> bool:
    matcher = grammars.matcher(StructuredOutputsParams(json=schema))
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()


def test_the_tool_schemas_compile_and_hold_the_output_to_the_calls(grammars):
    required = forced_tool_choice(chat(tools=[SET_FLAG, PING], tool_choice="required")).schema
    assert accepts(grammars, required, '[{"name": "set_flag", "parameters": {"a": true}}]')
    assert accepts(grammars, required, '[{"name":"ping","parameters":{"x":[1]}},'
                                       '{"name":"set_flag","parameters":{"a":false}}]')
    assert not accepts(grammars, required, "[]")
    assert not accepts(grammars, required, '[{"name": "nope", "parameters": {}}]')
    assert not accepts(grammars, required, '[{"name": "set_flag", "parameters": {"a": 1}}]')
    assert not accepts(grammars, required, '[{"name": "ping"}]')
    assert not accepts(grammars, required,
                       '[{"name": "ping", "parameters": {}, "arguments": {}}]')
    single = forced_tool_choice(chat(tools=[PING], tool_choice="required",
                                     parallel_tool_calls=False)).schema
    assert accepts(grammars, single, '[{"name":"ping","parameters":{}}]')
    assert not accepts(grammars, single,
                       '[{"name":"ping","parameters":{}},{"name":"ping","parameters":{}}]')
    named = forced_tool_choice(chat(tools=[SET_FLAG], tool_choice=NAMED)).schema
    assert accepts(grammars, named, '{"a": false}')
    assert not accepts(grammars, named, '{"a": false, "b": 1}')


# ---- reading the calls back -------------------------------------------------------------------

def test_required_calls():
    assert required_calls('[{"name": "a", "parameters": {"x": "é"}}, {"name": "b", '
                          '"parameters": {}}]') == [("a", '{"x": "é"}'), ("b", "{}")]
    assert required_calls('[{"name": "a", "parameters": {"x"') is None  # cut off
    assert required_calls("[]") is None
    assert required_calls('{"name": "a", "parameters": {}}') is None
    assert required_calls('[{"name": "a", "parameters": []}]') is None


def test_named_call_stream_sends_the_arguments_in_pieces():
    stream = NamedCallStream("set_flag")
    assert stream.step("", final=False) == ("", [])
    _, [first] = stream.step('{"a', final=False)
    assert first.model_dump() == {"index": 0, "id": first.id, "type": "function",
                                  "function": {"name": "set_flag", "arguments": '{"a'}}
    _, [second] = stream.step('{"a": true}', final=True)
    assert second.model_dump() == {"index": 0, "function": {"arguments": '": true}'}}
    assert stream.calls[0].function.arguments == '{"a": true}' and not stream.ends_in_tool_calls


def test_finished_named_and_required_outputs():
    content, [call] = finished_calls(NamedCallStream("f"), '{"a": true}')
    assert content is None and call.function.name == "f"
    assert call.function.arguments == '{"a": true}' and call.id.startswith("call_")
    assert finished_calls(NamedCallStream("f"), '{"a": tr') == ('{"a": tr', [])
    stream = RequiredCallsStream()
    content, calls = finished_calls(stream, '[{"name": "f", "parameters": {"a": true}}]')
    assert content is None and stream.ends_in_tool_calls
    assert [(c.function.name, c.function.arguments) for c in calls] == [("f", '{"a": true}')]
    stream = RequiredCallsStream()
    assert finished_calls(stream, '[{"name": "f", "para') == ('[{"name": "f", "para', [])
    assert not stream.ends_in_tool_calls


def run_both(texts: list[str], finish_reason: str = "stop", **fields):
    """(non-streaming choice, (content, tool-call deltas, finish reasons) summed over the SSE
    chunks) of one scripted output (``texts``: its text as it grows) for a chat request."""
    body, sent = answer_both_ways(chat_completions(), chat(stream=True, **fields),
                                  outputs_of(texts, finish_reason))
    return body, (sent.content, sent.calls, sent.finishes)


NAMED_TEXT = '{"a": true}'
REQUIRED_TEXT = ('[{"name": "set_flag", "parameters": {"a": true}}, '
                 '{"name": "ping", "parameters": {}}]')


def pieces(text: str, step: int) -> list[str]:
    return [text[:end] for end in range(step, len(text), step)] + [text]


@pytest.mark.parametrize("step", [1, 4, len(NAMED_TEXT)])
def test_named_choice_streamed_equals_non_streamed(step):
    body, (content, calls, finishes) = run_both(pieces(NAMED_TEXT, step), tools=[SET_FLAG],
                                                tool_choice=NAMED)
    message = body["message"]
    assert message["content"] is None and content == ""
    [call] = message["tool_calls"]
    assert call["function"] == {"name": "set_flag", "arguments": NAMED_TEXT}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"]["name"] == "set_flag"
    assert all(c["index"] == 0 and "name" not in c["function"] and "id" not in c
               for c in calls[1:])
    assert "".join(c["function"]["arguments"] for c in calls) == NAMED_TEXT
    assert body["finish_reason"] == "stop" and finishes == ["stop"]  # as vLLM: not "tool_calls"


@pytest.mark.parametrize("step", [1, 7, len(REQUIRED_TEXT)])
def test_required_streamed_equals_non_streamed(step):
    body, (content, calls, finishes) = run_both(pieces(REQUIRED_TEXT, step),
                                                tools=[SET_FLAG, PING], tool_choice="required")
    message = body["message"]
    assert message["content"] is None and content == ""
    expected = [{"name": "set_flag", "arguments": '{"a": true}'},
                {"name": "ping", "arguments": "{}"}]
    assert [c["function"] for c in message["tool_calls"]] == expected
    assert [c["function"] for c in calls] == expected and [c["index"] for c in calls] == [0, 1]
    assert body["finish_reason"] == "tool_calls" and finishes == ["tool_calls"]


def test_cut_off_required_output_is_content_with_length():
    text = REQUIRED_TEXT[:30]
    body, (content, calls, finishes) = run_both(pieces(text, 5), "length",
                                                tools=[SET_FLAG, PING], tool_choice="required")
    assert body["message"] == {"role": "assistant", "content": text} and content == text
    assert calls == [] and body["finish_reason"] == "length" and finishes == ["length"]


def test_cut_off_named_output_is_content_unless_already_streamed():
    text = NAMED_TEXT[:5]
    body, (content, calls, finishes) = run_both([text[:2], text], "length", tools=[SET_FLAG],
                                                tool_choice=NAMED)
    assert body["message"] == {"role": "assistant", "content": text}
    assert body["finish_reason"] == "length" and finishes == ["length"]
    # the stream had sent '{"' as arguments before the cut: it goes on with arguments
    assert "".join(c["function"]["arguments"] for c in calls) == text and content == ""


def test_constrained_output_skips_the_reasoning_parser():
    chat_api = ChatCompletions(chat_completions().serving, ToolCallConfig("hermes"),
                               reasoning_parser("deepseek_r1"))
    plain = chat()
    assert chat_api.reasoning_for(plain, plan_tools(plain, chat_api.tool_config)) is not None
    for request in (chat(response_format={"type": "json_object"}),
                    chat(structured_outputs={"choice": ["a"]}),
                    chat(tools=[SET_FLAG], tool_choice=NAMED),
                    chat(tools=[SET_FLAG], tool_choice="required")):
        assert chat_api.reasoning_for(request, plan_tools(request, chat_api.tool_config)) is None


# ---- the real server (tiny random model; the engine constrains decoding) ----------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 48, "temperature": 0,
        "logit_bias": NO_WHITESPACE}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as client:
        yield client


def post(http, path: str, **body) -> dict:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def is_flag(value) -> bool:
    """``value`` matches FLAG."""
    return isinstance(value, dict) and set(value) == {"a"} and isinstance(value["a"], bool)


def check_flag_text(text: str, finish_reason: str) -> None:
    """A random model may not finish within max_tokens: a complete output is valid and ends
    with "stop", else it was cut ("length")."""
    if finish_reason == "stop":
        assert is_flag(json.loads(text)), text
    else:
        assert finish_reason == "length", finish_reason


def test_response_format_json_schema(http):
    fmt = {"type": "json_schema", "json_schema": {"name": "flag", "schema": FLAG}}
    body = post(http, "/v1/chat/completions", **{**CHAT, "temperature": 1.0},
                response_format=fmt, n=2, seed=1)
    for choice in body["choices"]:
        check_flag_text(choice["message"]["content"], choice["finish_reason"])
    assert any(c["finish_reason"] == "stop" for c in body["choices"])


def test_response_format_enum_schema_finishes(http):
    fmt = {"type": "json_schema", "json_schema": {"name": "color",
                                                  "schema": {"enum": ["red", "green"]}}}
    [choice] = post(http, "/v1/chat/completions", **CHAT, response_format=fmt)["choices"]
    assert json.loads(choice["message"]["content"]) in ("red", "green")
    assert choice["finish_reason"] == "stop"


def test_response_format_json_object(http):
    [choice] = post(http, "/v1/chat/completions", **CHAT,
                    response_format={"type": "json_object"})["choices"]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["finish_reason"] == "length" and choice["message"]["content"][0] == "{"


def test_structured_outputs_choice_and_regex_on_both_endpoints(http):
    choices = ["yes", "no", "maybe"]
    body = post(http, "/v1/chat/completions", **CHAT, structured_outputs={"choice": choices})
    assert body["choices"][0]["message"]["content"] in choices
    assert body["choices"][0]["finish_reason"] == "stop"
    body = post(http, "/v1/completions", model="tiny-chat", prompt="Answer:", max_tokens=16,
                n=3, seed=3, structured_outputs={"choice": choices})
    assert all(c["text"] in choices and c["finish_reason"] == "stop" for c in body["choices"])
    body = post(http, "/v1/completions", model="tiny-chat", prompt="Code:", max_tokens=16,
                structured_outputs={"regex": "[ab]{3}-[0-9]"})
    [choice] = body["choices"]
    assert len(choice["text"]) == 5 and set(choice["text"][:3]) <= {"a", "b"}
    assert choice["text"][3] == "-" and choice["text"][4].isdigit()
    assert choice["finish_reason"] == "stop"


def test_completions_response_format(http):
    fmt = {"type": "json_schema", "json_schema": {"name": "flag", "schema": FLAG}}
    body = post(http, "/v1/completions", model="tiny-chat", prompt="{", max_tokens=48,
                temperature=0, logit_bias=NO_WHITESPACE, response_format=fmt)
    check_flag_text(body["choices"][0]["text"], body["choices"][0]["finish_reason"])


def test_streamed_structured_output(http):
    body = {**CHAT, "stream": True, "structured_outputs": {"choice": ["alpha", "beta"]}}
    text, finishes = "", []
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                [choice] = json.loads(line[len("data: "):])["choices"]
                text += choice["delta"].get("content") or ""
                finishes += [choice["finish_reason"]] if choice["finish_reason"] else []
    assert text in ("alpha", "beta") and finishes == ["stop"]


@pytest.fixture(scope="module")
def tools_server(tiny_chat_dir, tmp_path_factory):
    """The tiny chat model with a 1024-token context (the shared server's 256 tokens, one a
    byte, hold no prompt with these tools in it), started without --tool-call-parser: forced
    tool choices need none."""
    directory = tmp_path_factory.mktemp("tiny-chat-1k")
    shutil.copytree(tiny_chat_dir, directory, dirs_exist_ok=True)
    (directory / "config.json").write_text(json.dumps(
        {**TINY_CHAT_LLAMA, "max_position_embeddings": 1024}))
    i = TINY_SERVER_ARGS.index("--tool-call-parser")
    args = TINY_SERVER_ARGS[:i] + TINY_SERVER_ARGS[i + 2:]
    process = ServerProcess("--model", str(directory), *args, "--api-key", API_KEY)
    yield process
    assert process.terminate() == 0, process.output[-3000:]


@pytest.fixture(scope="module")
def tools_http(tools_server):
    with httpx.Client(base_url=tools_server.url, timeout=120, headers=AUTH) as client:
        yield client


def test_named_tool_choice(tools_server, tools_http):
    http = tools_http
    body = post(http, "/v1/chat/completions", **CHAT, tools=[SET_FLAG, PING], tool_choice=NAMED)
    [choice] = body["choices"]
    message = choice["message"]
    if choice["finish_reason"] == "length" and message["content"] is not None:
        return  # cut off before the arguments were complete: the raw text, as content
    assert choice["finish_reason"] == "stop" and message["content"] is None
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "set_flag"
    assert is_flag(json.loads(call["function"]["arguments"]))
    # the OpenAI client reads it, streamed too
    client = openai.OpenAI(base_url=tools_server.base_url, api_key=API_KEY, max_retries=0)
    kwargs = dict(model="tiny-chat", messages=MESSAGES, tools=[SET_FLAG, PING], max_tokens=48,
                  tool_choice=NAMED, temperature=0, logit_bias=NO_WHITESPACE)
    streamed = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [d for c in streamed for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "set_flag"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert arguments == call["function"]["arguments"]  # greedy: the same output
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_required_tool_choice(tools_http):
    http = tools_http
    body = post(http, "/v1/chat/completions", **{**CHAT, "max_tokens": 96},
                tools=[SET_FLAG, PING], tool_choice="required", parallel_tool_calls=False)
    [choice] = body["choices"]
    message = choice["message"]
    if choice["finish_reason"] == "length":
        assert message["content"] is not None and message["content"][0] == "["
        return
    assert choice["finish_reason"] == "tool_calls" and message["content"] is None
    [call] = message["tool_calls"]
    name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
    assert name in ("set_flag", "ping") and isinstance(arguments, dict)
    assert name == "ping" or is_flag(arguments)


def assert_400(response: httpx.Response, words: str, param: str | None = None) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("path,fields,words,param", [
    ("/v1/chat/completions",
     {"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "structured outputs", "response_format"),
    ("/v1/completions", {"structured_outputs": {"regex": "(unclosed"}}, "structured outputs",
     "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"grammar": "start: undefined_rule"}},
     "structured outputs", "structured_outputs"),
    ("/v1/chat/completions",
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
         "properties": {"x": {"type": "nonsense"}}}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}, "max_tokens": 4},
     "structured outputs", "tool_choice"),
])
def test_a_constraint_that_does_not_compile_is_a_400(http, path, fields, words, param):
    base = CHAT if path.endswith("chat/completions") else {"model": "tiny-chat", "prompt": "x"}
    assert_400(http.post(path, json={**base, **fields}), words, param)
    assert http.get("/health").status_code == 200
