"""Bad input and overload get a 4xx with an OpenAI error body, and the server stays healthy."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from duetjax import SamplingParams
from duetjax.async_engine import AsyncEngine, EngineStats
from duetjax.server import create_app
from duetjax.server.serving import Serving

from ..test_engine import break_detokenizers
from .conftest import API_KEY, MAX_BODY_BYTES

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny-chat", "prompt": "hi", "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def tool_history(arguments: str) -> list[dict]:
    """A chat whose assistant turn called a tool with ``arguments``."""
    return [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]


CASES = [
    # (id, path, body (dict, or raw bytes), expected status, words the message must contain)
    ("malformed-json", "/v1/chat/completions", b'{"messages": [', 400, "not valid JSON"),
    ("not-an-object", "/v1/completions", b'[1, 2]', 400, "JSON object"),
    ("missing-messages", "/v1/chat/completions", {"model": "tiny-chat"}, 400, "'messages' is required"),
    ("missing-prompt", "/v1/completions", {"max_tokens": 3}, 400, "'prompt' is required"),
    ("wrong-type", "/v1/completions", {**COMPLETION, "max_tokens": "ten"}, 400, "max_tokens"),
    ("wrong-prompt-type", "/v1/completions", {**COMPLETION, "prompt": 42}, 400, "prompt"),
    ("bad-role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]},
     400, "role"),
    ("unknown-field", "/v1/completions", {**COMPLETION, "max_token": 3}, 400, "unknown field 'max_token'"),
    ("temperature", "/v1/completions", {**COMPLETION, "temperature": -0.5}, 400, "temperature"),
    ("top-p", "/v1/chat/completions", {**CHAT, "top_p": 1.5}, 400, "top_p"),
    ("top-k", "/v1/completions", {**COMPLETION, "top_k": -3}, 400, "top_k"),
    ("min-p", "/v1/completions", {**COMPLETION, "min_p": 2}, 400, "min_p"),
    ("n", "/v1/completions", {**COMPLETION, "n": 0}, 400, "'n'"),
    ("max-tokens", "/v1/completions", {**COMPLETION, "max_tokens": 0}, 400,
     "max_tokens must be >= 1, or 0 with echo=true"),
    ("max-tokens-negative", "/v1/completions", {**COMPLETION, "max_tokens": -1}, 400, "max_tokens"),
    ("logprobs", "/v1/completions", {**COMPLETION, "logprobs": 50}, 400, "logprobs"),
    ("top-logprobs-alone", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "logprobs"),
    ("seed", "/v1/completions", {**COMPLETION, "seed": -1}, 400, "seed"),
    ("empty-prompt", "/v1/completions", {**COMPLETION, "prompt": ""}, 400, "empty"),
    ("token-out-of-vocab", "/v1/completions", {**COMPLETION, "prompt": [1, 99999]}, 400, "vocabulary"),
    ("unknown-model", "/v1/completions", {**COMPLETION, "model": "gpt-9"}, 404, "does not exist"),
    ("context-window", "/v1/completions", {**COMPLETION, "max_tokens": 300}, 400,
     "maximum context length is 256"),
    ("prompt-too-long", "/v1/chat/completions",
     {**CHAT, "max_tokens": None, "messages": [{"role": "user", "content": "x" * 400}]}, 400,
     "maximum context length"),
    ("prompt-logprobs", "/v1/completions", {**COMPLETION, "prompt_logprobs": 21}, 400,
     "prompt_logprobs"),
    ("prompt-logprobs-streamed", "/v1/chat/completions",
     {**CHAT, "stream": True, "prompt_logprobs": 1}, 400,
     "prompt_logprobs are not available with stream=true"),
    ("penalty", "/v1/chat/completions", {**CHAT, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("repetition-zero", "/v1/chat/completions", {**CHAT, "repetition_penalty": 0}, 400,
     "repetition_penalty"),
    ("repetition-negative", "/v1/completions", {**COMPLETION, "repetition_penalty": -1.5}, 400,
     "'repetition_penalty': input should be greater than or equal to 0.01"),
    ("logit-bias-range", "/v1/completions", {**COMPLETION, "logit_bias": {"65": 101}}, 400,
     "biases must be in [-100, 100]"),
    ("logit-bias-entries", "/v1/chat/completions",
     {**CHAT, "logit_bias": {str(t): 1 for t in range(301)}}, 400, "at most 300 entries"),
    ("logit-bias-key", "/v1/completions", {**COMPLETION, "logit_bias": {"fox": 1}}, 400,
     "keys must be token ids"),
    ("logit-bias-negative-key", "/v1/completions", {**COMPLETION, "logit_bias": {"-3": 1}}, 400,
     "keys must be token ids"),
    ("logit-bias-value-type", "/v1/completions", {**COMPLETION, "logit_bias": {"65": "high"}}, 400,
     "logit_bias"),
    ("logit-bias-vocabulary", "/v1/chat/completions", {**CHAT, "logit_bias": {"259": 5}}, 400,
     "logit_bias token id 259 is outside the vocabulary [0, 259)"),
    ("tool-schema", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400,
     "tools.0.function"),
    ("tool-schema-typo", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "paramters": {}}}]}, 400,
     "unknown field 'tools.0.function.paramters'"),
    ("tool-type", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "retrieval", "function": {"name": "f"}}]}, 400, "tools.0.type"),
    ("tool-names-unique", "/v1/chat/completions", {**CHAT, "tools": [TOOL, TOOL]}, 400,
     "'get_weather' appears twice"),
    ("tool-choice-required-and-response-format", "/v1/chat/completions",
     {**CHAT, "tools": [TOOL], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, 400,
     "constrains the output to tool calls, so response_format cannot"),
    ("response-format-without-json-schema", "/v1/chat/completions",
     {**CHAT, "response_format": {"type": "json_schema"}}, 400, "needs 'json_schema'"),
    ("response-format-without-schema", "/v1/completions",
     {**COMPLETION, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     400, "json_schema needs 'schema'"),
    ("response-format-type", "/v1/chat/completions",
     {**CHAT, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ("response-format-and-structured-outputs", "/v1/chat/completions",
     {**CHAT, "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}},
     400, "response_format 'json_object' and structured_outputs both constrain the output"),
    ("structured-outputs-two-kinds", "/v1/completions",
     {**COMPLETION, "structured_outputs": {"regex": "a+", "choice": ["a"]}}, 400,
     "exactly one of json"),
    ("structured-outputs-unknown-field", "/v1/completions",
     {**COMPLETION, "structured_outputs": {"regexp": "a+"}}, 400,
     "unknown field 'structured_outputs.regexp'"),
    ("tool-choice-named-unknown", "/v1/chat/completions",
     {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     400, "'nope', which is not in tools"),
    ("tool-choice-without-tools", "/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, 400,
     "tool_choice needs tools"),
    ("tool-choice-value", "/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": "any"},
     400, "tool_choice"),
    ("tool-call-arguments-json", "/v1/chat/completions",
     {**CHAT, "messages": tool_history('{"city": "Par')}, 400,
     "messages.1.tool_calls.0.function.arguments is not valid JSON"),
    ("tool-call-arguments-object", "/v1/chat/completions",
     {**CHAT, "messages": tool_history('["Paris"]')}, 400, "must be a JSON object"),
    ("tool-call-shape", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}, 400,
     "messages.0.tool_calls.0.function"),
    ("tokenize-tools-without-messages", "/tokenize", {"prompt": "hi", "tools": [TOOL]}, 400,
     "tools go with 'messages'"),
    ("stream-options-without-stream", "/v1/chat/completions",
     {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream=true"),
    ("tokenize-neither", "/tokenize", {"model": "tiny-chat"}, 400, "either 'prompt'"),
    ("tokenize-both", "/tokenize", {"prompt": "hi", "messages": CHAT["messages"]}, 400, "not both"),
    ("tokenize-unknown-model", "/tokenize", {"model": "gpt-9", "prompt": "hi"}, 404, "does not exist"),
    ("detokenize-vocabulary", "/detokenize", {"tokens": [65, 259]}, 400,
     "token id 259 is outside the vocabulary [0, 259)"),
    ("detokenize-type", "/detokenize", {"tokens": ["a"]}, 400, "tokens"),
    # Values the device cannot hold, text that is not Unicode, numbers that are not JSON
    ("top-k-past-int32", "/v1/completions", {**COMPLETION, "top_k": 2**31}, 400,
     "'top_k': input should be less than or equal to 2147483647"),
    ("top-k-huge", "/v1/chat/completions", {**CHAT, "top_k": 10**20}, 400, "top_k"),
    ("stop-token-ids-huge", "/v1/completions", {**COMPLETION, "stop_token_ids": [2**64]}, 400,
     "'stop_token_ids.0': input should be less than or equal to 2147483647"),
    ("stop-token-ids-vocabulary", "/v1/chat/completions", {**CHAT, "stop_token_ids": [259]}, 400,
     "stop_token_ids token id 259 is outside the vocabulary [0, 259)"),
    ("logit-bias-key-huge", "/v1/completions", {**COMPLETION, "logit_bias": {str(2**64): 1}}, 400,
     "keys must be token ids (integers in [0, 2147483647])"),
    ("max-tokens-huge", "/v1/completions", {**COMPLETION, "max_tokens": 2**63}, 400, "max_tokens"),
    ("min-tokens-huge", "/v1/completions", {**COMPLETION, "min_tokens": 2**40}, 400, "min_tokens"),
    ("repetition-huge", "/v1/completions", {**COMPLETION, "repetition_penalty": 1000}, 400,
     "repetition_penalty"),
    ("temperature-infinity", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 400,
     "'temperature' is Infinity, which is not a JSON number"),
    ("temperature-nan", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400,
     "'temperature' is NaN"),
    ("nan-deep-inside", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": [-Infinity]}}',
     400, "'chat_template_kwargs.x.0' is -Infinity"),
    ("lone-surrogate-prompt", "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', 400,
     "'prompt' is not valid Unicode (it holds a lone surrogate, '\\ud800' at character 1)"),
    ("lone-surrogate-message", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "a\\udc00"}]}', 400,
     "'messages.0.content' is not valid Unicode"),
    ("lone-surrogate-tokenize", "/tokenize", b'{"prompt": "\\ud83d"}', 400,
     "'prompt' is not valid Unicode"),
    ("echo-negative-id", "/v1/completions", {**COMPLETION, "prompt": [1, -1], "echo": True}, 400,
     "prompt token id -1 is outside the vocabulary [0, 259)"),
    ("echo-id-past-uint32", "/v1/completions", {**COMPLETION, "prompt": [[2**32]], "echo": True},
     400, "prompt token id 4294967296 is outside the vocabulary"),
]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def post(http, path, body, headers=AUTH):
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
    return http.post(path, json=body, headers=headers)


def assert_error(response, status, words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words.lower() in error["message"].lower(), error["message"]
    return error


@pytest.mark.parametrize("path,body,status,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(http, path, body, status, words):
    assert_error(post(http, path, body), status, words)
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {**COMPLETION, "top_k": 2**31}, "top_k"),
    ("/v1/completions", {**COMPLETION, "prompt": [[5], [3, 999]]}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "stop_token_ids": [259]}, "stop_token_ids"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"300": 1}}, "logit_bias"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}',
     "messages.0.content"),
    ("/v1/completions", b'{"prompt": "hi", "presence_penalty": NaN}', "presence_penalty"),
])
def test_bad_values_name_their_field(http, path, body, param):
    assert assert_error(post(http, path, body), 400, "")["param"] == param


def test_body_over_the_size_limit(http):
    body = {**COMPLETION, "prompt": "x" * (MAX_BODY_BYTES + 10)}
    assert_error(post(http, "/v1/completions", body), 413, "larger than")

    def chunks():  # no Content-Length: the limit must hold while streaming the body in
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 10_000 + 2):
            yield b"x" * 10_000
        yield b'"}'
    response = http.post("/v1/completions", content=chunks(),
                         headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 413, "larger than")
    assert http.get("/health").status_code == 200


def test_api_key(http):
    error = assert_error(post(http, "/v1/completions", COMPLETION, headers={}), 401, "missing API key")
    assert error["code"] == "invalid_api_key"
    assert_error(post(http, "/v1/completions", COMPLETION, headers={"Authorization": "Bearer nope"}),
                 401, "incorrect API key")
    assert_error(http.get("/v1/models"), 401, "API key")
    assert http.get("/health").status_code == 200  # probes need no key
    assert http.get("/metrics").status_code == 200


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing", headers=AUTH), 404, "no route")
    assert_error(http.get("/v1/completions", headers=AUTH), 405, "not allowed")


def test_queue_full_answers_429_with_retry_after(server):
    """8 running + 32 queued is the most this server holds; a burst of 80 overflows it."""
    body = {**COMPLETION, "max_tokens": 128, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=AUTH,
                                     limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body)
                                          for _ in range(80)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 40 and statuses.count(429) >= 1, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert int(rejected.headers["Retry-After"]) >= 1
    assert_error(rejected, 429, "retry later")
    assert all(len(r.json()["choices"][0]["text"]) >= 0 for r in responses if r.status_code == 200)
    assert server.wait_until(lambda: server.metric("duetjax_num_requests_in_flight") == 0)
    assert server.metric("duetjax_requests_rejected_total", reason="queue_full") >= 1
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_tool_choice_auto_needs_a_tool_call_parser():
    """A server started without --tool-call-parser (the shared one has one): tools with
    tool_choice "auto", or with no tool_choice (OpenAI's default is then "auto"), get a 400 that
    says how to start the server; "none" passes that check."""
    engine = SimpleNamespace(tokenizer=None, max_model_len=256, stats=None)
    client = TestClient(create_app(engine, "tiny-chat"))  # no lifespan, no engine work needed
    for choice in ({"tool_choice": "auto"}, {}):
        response = client.post("/v1/chat/completions", json={**CHAT, "tools": [TOOL], **choice})
        error = assert_error(response, 400, "start the server with --tool-call-parser")
        assert error["param"] == "tool_choice"
    response = client.post("/v1/chat/completions",
                           json={**CHAT, "tools": [TOOL], "tool_choice": "none"})
    assert_error(response, 400, "ships none")  # past the tool check: this stub has no tokenizer


def test_a_request_that_fails_in_the_engine_gets_a_500_and_nothing_else_does(tiny_chat_engine,
                                                                              monkeypatch):
    """One request's detokenizer raises: that request gets a 500 with an OpenAI error body,
    the requests beside it get their answers, the server stays healthy and counts the 500."""
    engine = tiny_chat_engine
    prompts = ["first", "boom", "third"]
    expected = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0,
                                                       ignore_eos=True), use_tqdm=False)
    break_detokenizers(engine, monkeypatch, "boom")

    async def main():
        async_engine = AsyncEngine(engine)
        app = create_app(async_engine, "tiny-chat")
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://test", timeout=60) as client:
                answers = await asyncio.gather(*(client.post("/v1/completions", json={
                    "prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
                    for p in prompts))
                return answers, await client.get("/health"), await client.get("/metrics")
        finally:
            await async_engine.shutdown(drain_timeout=0)

    answers, health, metrics = asyncio.run(main())
    error = assert_error(answers[1], 500, "the detokenizer broke")
    assert (error["type"], error["code"]) == ("server_error", "request_failed")
    for i in (0, 2):
        assert answers[i].status_code == 200
        assert answers[i].json()["choices"][0]["text"] == expected[i].outputs[0].text
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert 'duetjax_http_requests_total{route="/v1/completions",status="500"} 1.0' in metrics.text
    assert ('duetjax_request_success_total{finished_reason="error",model_name="tiny-chat"} 1.0'
            in metrics.text)
    assert 'finished_reason="abort"' not in metrics.text


def test_health_says_why_the_engine_failed(tiny_chat_engine, monkeypatch):
    def lost(self):
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(type(tiny_chat_engine), "step", lost)

    async def main():
        async_engine = AsyncEngine(tiny_chat_engine)
        app = create_app(async_engine, "tiny-chat")
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://test", timeout=60) as client:
                answer = await client.post("/v1/completions", json=COMPLETION)
                return answer, await client.get("/health")
        finally:
            await async_engine.shutdown(drain_timeout=0)

    answer, health = asyncio.run(main())
    assert assert_error(answer, 500, "the device is gone")["code"] == "engine_dead"
    assert health.status_code == 503
    assert health.json() == {"status": "engine failed", "reason": "RuntimeError: the device is gone"}


def test_an_unexpected_error_is_a_counted_500_and_the_app_goes_on(monkeypatch):
    """An exception no handler takes is answered inside the app (an OpenAI error body, counted
    in duetjax_http_requests_total) instead of escaping it: TestClient would re-raise it, and
    uvicorn would drop the connection."""
    def broken(self, model):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Serving, "check_model", broken)
    engine = SimpleNamespace(tokenizer=None, max_model_len=256, num_in_flight=0,
                             stats=EngineStats(num_preemptions=3))
    client = TestClient(create_app(engine, "tiny-chat"))  # (re-raises what escapes the app)
    error = assert_error(client.post("/v1/completions", json=COMPLETION), 500, "a bug")
    assert error["type"] == "server_error"
    metrics = client.get("/metrics").text
    assert 'duetjax_http_requests_total{route="/v1/completions",status="500"} 1.0' in metrics
    assert 'duetjax_preemptions_total{model_name="tiny-chat"} 3.0' in metrics
