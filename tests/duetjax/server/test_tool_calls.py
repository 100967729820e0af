"""Tool calling: the parsers on texts, the response and the stream on scripted engine outputs
(streamed == non-streamed), and tools through the real server's chat template."""
from __future__ import annotations

import asyncio
import json
import random
from types import SimpleNamespace
from typing import NamedTuple

import httpx
import pytest

from duetjax.outputs import CompletionOutput, RequestMetrics, RequestOutput
from duetjax.sampling_params import SamplingParams
from duetjax.serve import parse_args
from duetjax.server.chat import ChatCompletions
from duetjax.server.protocol import ChatCompletionRequest
from duetjax.server.serving import Choice, Prompt, Serving
from duetjax.server.tool_calls import (ToolCallConfig, ToolCallStream, ToolPlan,
                                       extract_tool_calls, plan_tools)
from duetjax.server.tool_parsers import (HermesToolParser, Llama3JsonToolParser, ParsedCall,
                                         json_object_end)

from .conftest import API_KEY

HERMES = HermesToolParser()
LLAMA = Llama3JsonToolParser()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def call(name: str, **arguments) -> tuple[str, dict]:
    return name, arguments


def parse(parser, text: str):
    """(content, [(name, arguments as an object)]) as the non-streaming response has them."""
    content, calls = extract_tool_calls(text, parser)
    return content, [(c.function.name, json.loads(c.function.arguments)) for c in calls]


HERMES_CASES = [
    # (id, text, content, calls)
    ("one", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [call("get_weather", city="Paris")]),
    ("several", '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
                '<tool_call>{"name": "b", "arguments": {"n": 2}}</tool_call>',
     None, [call("a"), call("b", n=2)]),
    ("content-around", 'Let me look.\n<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>'
                       ' Done.', "Let me look.\n Done.", [call("a", x=1)]),
    ("nested", '<tool_call>{"name": "q", "arguments": {"filter": {"and": [{"k": "v"}, '
               '{"s": "a } brace"}]}, "n": null}}</tool_call>',
     None, [("q", {"filter": {"and": [{"k": "v"}, {"s": "a } brace"}]}, "n": None})]),
    ("unicode", '<tool_call>{"name": "traduire", "arguments": {"texte": "日本語 é 🙂"}}</tool_call>',
     None, [call("traduire", texte="日本語 é 🙂")]),
    ("malformed", 'x <tool_call>{"name": "a", "arguments": {</tool_call> y',
     'x <tool_call>{"name": "a", "arguments": {</tool_call> y', []),
    ("no-name", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
     []),
    ("one-bad-one-good", '<tool_call>nope</tool_call><tool_call>{"name": "b"}</tool_call>',
     "<tool_call>nope</tool_call>", [call("b")]),
    ("unclosed-at-the-end", 'Hi <tool_call>{"name": "a", "arguments": {"x": "y"}}',
     "Hi ", [call("a", x="y")]),
    ("unclosed-invalid", "<tool_call>{\"name\": ", "<tool_call>{\"name\": ", []),
    ("arguments-as-a-string", '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>',
     None, [call("a", x=1)]),
    ("partial-marker-is-content", "text <tool_ca", "text <tool_ca", []),
    ("no-calls", "just text", "just text", []),
    ("empty", "", "", []),
]

LLAMA_CASES = [
    ("one", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [call("get_weather", city="Paris")]),
    ("python-tag", '<|python_tag|>{"name": "a", "parameters": {"x": 1}}', None, [call("a", x=1)]),
    ("several", '{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"n": 2}}', None,
     [call("a"), call("b", n=2)]),
    ("several-after-tag", '<|python_tag|>{"name": "a", "parameters": {}};{"name": "b", '
                          '"parameters": {}};', None, [call("a"), call("b")]),
    ("content-around", 'Checking. <|python_tag|>{"name": "a", "parameters": {}} then more',
     "Checking.  then more", [call("a")]),
    ("nested", '{"name": "q", "parameters": {"f": {"l": [1, {"s": "}{;"}]}}}', None,
     [("q", {"f": {"l": [1, {"s": "}{;"}]}})]),
    ("unicode", '{"name": "ñ", "parameters": {"t": "日本語 \\u00e9"}}', None, [call("ñ", t="日本語 é")]),
    ("malformed", '{"name": "a", "parameters": {x}}', '{"name": "a", "parameters": {x}}', []),
    ("bad-second", '{"name": "a", "parameters": {}}; {oops} tail', "; {oops} tail", [call("a")]),
    ("brace-in-prose-is-content", 'Use {"name": "a"} like this', 'Use {"name": "a"} like this', []),
    ("tag-with-code", "<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
    ("unclosed", '{"name": "a", "parameters": {', '{"name": "a", "parameters": {', []),
    ("whitespace", "  \n", "  \n", []),
]


@pytest.mark.parametrize("text,content,calls", [c[1:] for c in HERMES_CASES],
                         ids=[c[0] for c in HERMES_CASES])
def test_hermes_parser(text, content, calls):
    assert parse(HERMES, text) == (content, calls)


@pytest.mark.parametrize("text,content,calls", [c[1:] for c in LLAMA_CASES],
                         ids=[c[0] for c in LLAMA_CASES])
def test_llama3_json_parser(text, content, calls):
    assert parse(LLAMA, text) == (content, calls)


def test_call_arguments_are_json_strings_keeping_unicode():
    segments = HERMES.scan('<tool_call>{"name": "f", "arguments": {"é": [1, 2]}}</tool_call>',
                           final=True)
    assert [s for s in segments if s] == [ParsedCall("f", '{"é": [1, 2]}')]


def test_json_object_end():
    text = '{"a": {"b": "}\\"{"}} tail'
    assert json_object_end(text, 0) == text.index(" tail")
    assert json_object_end('{"a": "}', 0) is None
    assert json_object_end('{"a": "\\', 0) is None


def test_parallel_tool_calls_false_keeps_the_first():
    text = '<tool_call>{"name": "a"}</tool_call><tool_call>{"name": "b"}</tool_call>'
    content, calls = extract_tool_calls(text, HERMES, parallel=False)
    assert content is None and [c.function.name for c in calls] == ["a"]


def streamed(parser, text: str, cuts: list[int]):
    """Content and calls sent by a ToolCallStream fed the prefixes of ``text`` ending at
    ``cuts`` (then the whole text, final)."""
    stream = ToolCallStream(parser)
    content, calls = "", []
    for end in [*cuts, len(text)]:
        delta, new = stream.step(text[:end], final=end == len(text))
        content += delta
        calls += new
    assert [c.index for c in calls] == list(range(len(calls)))
    return (content if stream.content_started else None,
            [(c.function.name, json.loads(c.function.arguments)) for c in calls])


def stream_cuts(text: str) -> list[list[int]]:
    """Where a streamed text is cut into chunks: after every character, and 5 random splits."""
    rng = random.Random(len(text))
    return [list(range(len(text)))] + [
        sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1))) for _ in range(5)]


@pytest.mark.parametrize("parser,text", [(HERMES, c[1]) for c in HERMES_CASES]
                         + [(LLAMA, c[1]) for c in LLAMA_CASES],
                         ids=[f"hermes-{c[0]}" for c in HERMES_CASES]
                         + [f"llama3_json-{c[0]}" for c in LLAMA_CASES])
def test_streaming_any_split_equals_the_whole_text(parser, text):
    whole = parse(parser, text)
    for cuts in stream_cuts(text):
        assert streamed(parser, text, cuts) == whole


def test_stream_sends_content_before_the_call_is_complete_and_holds_back_a_partial_marker():
    stream = ToolCallStream(HERMES)
    assert stream.step("Let me check <tool", final=False) == ("Let me check ", [])
    assert stream.step('Let me check <tool_call>{"name": "a"', final=False) == ("", [])
    delta, calls = stream.step('Let me check <tool_call>{"name": "a"}</tool_call>', final=False)
    assert delta == "" and [c.function.name for c in calls] == ["a"]


# ---- the response and the stream of ChatCompletions, on scripted engine outputs -------------

class ScriptedStream:
    """Stands in for an engine request's RequestStream: yields the given outputs."""

    def __init__(self, request_id: str, outputs: list[RequestOutput]):
        self.request_id = request_id
        self.outputs = outputs
        self.finished = False
        self.failed = False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for output in self.outputs:
            self.finished = output.finished
            yield output


def outputs_of(texts: list[str], finish_reason: str, stop_reason=None) -> list[RequestOutput]:
    """One RequestOutput per text (a token per character), the last one finished."""
    result = []
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        completion = CompletionOutput(0, text, list(range(len(text) + 1)),
                                      finish_reason if last else None, stop_reason if last else None)
        result.append(RequestOutput("r", None, [1, 2, 3], [completion], last, RequestMetrics(0.0)))
    return result


def chat_completions() -> ChatCompletions:
    engine = SimpleNamespace(tokenizer=None, abort=lambda request_id: None)
    metrics = SimpleNamespace(observe=lambda output, arrival, failed=False: None)
    return ChatCompletions(Serving(engine, "m", metrics), ToolCallConfig("hermes"))


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                                 **fields)


class Streamed(NamedTuple):
    """The SSE deltas of one choice, summed."""

    reasoning: str
    content: str
    calls: list[dict]
    """Every tool-call delta, in order."""
    finishes: list[str]
    """Every finish reason sent."""


def answer_both_ways(chat: ChatCompletions, req: ChatCompletionRequest,
                     outputs: list[RequestOutput], params: SamplingParams | None = None
                     ) -> tuple[dict, Streamed]:
    """A scripted engine output answered whole and streamed: (the non-streaming choice, what
    the stream sent)."""
    plan = plan_tools(req, chat.tool_config)
    prompt = Prompt([1, 2, 3])
    done = Choice(0, prompt, ScriptedStream("r", outputs), last=outputs[-1])
    body = chat.response(req, "id", [done], plan).model_dump()["choices"][0]

    async def stream() -> list[str]:
        choice = Choice(0, prompt, ScriptedStream("r", outputs))
        return [c async for c in chat.stream(req, "id", [choice], 0.0, params or SamplingParams(), plan)]

    events = asyncio.run(stream())
    assert events[-1] == "data: [DONE]\n\n"
    sent = Streamed("", "", [], [])
    for event in events[:-1]:
        [choice] = json.loads(event[len("data: "):])["choices"]
        delta = choice["delta"]
        sent = Streamed(sent.reasoning + (delta.get("reasoning_content") or ""),
                        sent.content + (delta.get("content") or ""),
                        sent.calls + (delta.get("tool_calls") or []),
                        sent.finishes + ([choice["finish_reason"]] if choice["finish_reason"] else []))
    return body, sent


def run_both(outputs: list[RequestOutput], params: SamplingParams, **fields):
    """(non-streaming choice, (content, tool-call deltas, finish reasons) from the stream)."""
    body, sent = answer_both_ways(chat_completions(), request(**fields), outputs, params)
    return body, (sent.content, sent.calls, sent.finishes)


def without_ids(calls):
    return [{k: v for k, v in c.items() if k not in ("id", "index")} for c in calls]


SCRIPT = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
          '</tool_call>')


@pytest.mark.parametrize("step", [1, 3, 17, len(SCRIPT)])
def test_streamed_equals_non_streamed(step):
    texts = [SCRIPT[:end] for end in range(step, len(SCRIPT), step)] + [SCRIPT]
    body, (content, calls, finishes) = run_both(outputs_of(texts, "stop"), SamplingParams(),
                                                stream=True)
    message = body["message"]
    assert message["content"] == content == "I will check.\n\n"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"] * 2
    assert json.loads(message["tool_calls"][1]["function"]["arguments"]) == {"city": "Oslo"}
    assert all(c["id"].startswith("call_") and c["type"] == "function"
               for c in message["tool_calls"] + calls)
    assert [c["index"] for c in calls] == [0, 1]
    assert without_ids(calls) == without_ids(message["tool_calls"])
    assert body["finish_reason"] == "tool_calls" and finishes == ["tool_calls"]


def test_stream_with_a_stop_string_cut_at_the_end():
    """The stop string '</tool_call>' ends generation: intermediate texts hold part of it,
    the final text does not (the call is then unclosed, and still parsed)."""
    final = 'Hi <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}'
    texts = [final[:10], final[:30], final + "</tool_", final]  # the last: cut at the stop string
    body, (content, calls, finishes) = run_both(
        outputs_of(texts, "stop", "</tool_call>"), SamplingParams(stop=["</tool_call>"]),
        stream=True)
    assert body["message"]["content"] == content == "Hi "
    assert without_ids(calls) == without_ids(body["message"]["tool_calls"])
    assert finishes == ["tool_calls"] and body["stop_reason"] == "</tool_call>"


def test_cut_off_keeps_length_and_only_calls_gives_null_content():
    text = '<tool_call>{"name": "a"}</tool_call>\n<tool_call>{"name": "b", "argu'
    body, (content, calls, finishes) = run_both(outputs_of([text[:20], text], "length"),
                                                SamplingParams(), stream=True)
    assert body["finish_reason"] == "length" and finishes == ["length"]
    assert [c["function"]["name"] for c in body["message"]["tool_calls"]] == ["a"]
    assert body["message"]["content"] == content == '\n<tool_call>{"name": "b", "argu'


def test_no_calls_is_plain_content_without_tool_calls():
    body, (content, calls, finishes) = run_both(outputs_of(["a <b", "a <b>"], "stop"),
                                                SamplingParams(), stream=True)
    assert body["message"] == {"role": "assistant", "content": "a <b>"}  # no tool_calls key
    assert content == "a <b>" and calls == [] and finishes == ["stop"]


def test_tool_choice_none_parses_nothing():
    body, (content, calls, _) = run_both(outputs_of([SCRIPT], "stop"), SamplingParams(),
                                         stream=True, tool_choice="none")
    assert body["message"]["content"] == content == SCRIPT and calls == []
    assert body["finish_reason"] == "stop"


def test_plan_tools():
    tools = [WEATHER]
    plan = plan_tools(request(), ToolCallConfig("llama3_json"))
    assert plan.parser.name == "llama3_json" and plan.template_tools == tools and plan.parallel
    assert not plan_tools(request(parallel_tool_calls=False), ToolCallConfig("hermes")).parallel
    none = request(tool_choice="none")
    assert plan_tools(none, ToolCallConfig()) == ToolPlan(tools)
    assert plan_tools(none, ToolCallConfig(exclude_tools_when_tool_choice_none=True)) == ToolPlan()
    assert plan_tools(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]),
                      ToolCallConfig("hermes")) == ToolPlan()
    with pytest.raises(Exception, match="--tool-call-parser"):
        plan_tools(request(), ToolCallConfig())
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        ToolCallConfig("mistral")


def test_cli_flags():
    args = parse_args(["--tool-call-parser", "llama3_json", "--enable-auto-tool-choice"])
    assert args.tool_call_parser == "llama3_json" and not args.exclude_tools_when_tool_choice_none
    assert parse_args([]).tool_call_parser is None
    with pytest.raises(SystemExit):
        parse_args(["--enable-auto-tool-choice"])
    with pytest.raises(SystemExit):
        parse_args(["--tool-call-parser", "nope"])


# ---- the real server (tiny model, --tool-call-parser hermes) --------------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
HISTORY = MESSAGES + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30, headers=AUTH) as client:
        yield client


def rendered(http, **body) -> tuple[int, str]:
    counted = http.post("/tokenize", json=body).json()
    return counted["count"], http.post("/detokenize", json={"tokens": counted["tokens"]}).json()["prompt"]


def test_tools_reach_the_chat_template(http):
    count, text = rendered(http, messages=MESSAGES, tools=[WEATHER])
    assert '{"type": "function", "function": {"name": "get_weather"' in text
    plain, _ = rendered(http, messages=MESSAGES)
    assert count > plain
    for choice in ("auto", "none", None):
        body = {"messages": MESSAGES, "tools": [WEATHER], "max_tokens": 1}
        if choice:
            body["tool_choice"] = choice
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == count  # "none" renders them too


def test_history_with_tool_calls_and_tool_results(http, client):
    _, text = rendered(http, messages=HISTORY, tools=[WEATHER])
    # the arguments string reached the template as an object (tojson of a string would quote it)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<|im_start|>tool\nsunny<|im_end|>" in text
    small = {"type": "function", "function": {"name": "get_weather"}}  # 256-token context
    response = client.chat.completions.create(model="tiny-chat", messages=HISTORY, tools=[small],
                                              max_tokens=3, extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"


def test_auto_on_the_real_server_streamed_and_not(client):
    """The random model writes no calls: its text comes back as content, both ways."""
    kwargs = dict(model="tiny-chat", messages=MESSAGES, tools=[WEATHER], tool_choice="auto",
                  max_tokens=8, temperature=0, logit_bias={"65": 100},
                  extra_body={"ignore_eos": True})
    message = client.chat.completions.create(**kwargs).choices[0].message
    assert message.content == "A" * 8 and message.tool_calls is None
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "A" * 8
    assert all(c.choices[0].delta.tool_calls is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
