"""Corrupted request bodies against ``python -m duetjax.serve`` on the embedded SmolLM2: every
answer is a 200 or a 4xx with an OpenAI error body, never a 5xx or a dropped connection, and
the server still answers a plain question right afterwards.

The corruptions are seeded (the same run every time) and bounded: a few hundred requests, each
generating at most a couple of tokens. All of them go over one keep-alive connection, so a
server that dropped it after an error would fail the next request.
"""
from __future__ import annotations

import copy
import http.client
import json
import random
import urllib.parse
from typing import Any

import pytest

SEED = 0
NUM_REQUESTS = 300
MESSAGES = [{"role": "user", "content": "Hi!"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string"}}}}}
VALID = [
    # (path, a valid body: it generates at most 2 tokens)
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0,
                         "top_k": 5, "stop": ["\n"], "seed": 1, "logprobs": 1}),
    ("/v1/completions", {"prompt": [[504, 3575, 282], [1]], "max_tokens": 2, "echo": True,
                         "n": 2, "stop_token_ids": [2], "logit_bias": {"28": -5}}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": 0.7,
                              "top_p": 0.9, "presence_penalty": 0.5, "logprobs": True,
                              "top_logprobs": 2, "stream": True,
                              "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": [{"type": "text",
                                                                         "text": "Hello"}]}],
                              "max_completion_tokens": 2, "tools": [TOOL], "tool_choice": "none",
                              "repetition_penalty": 1.1, "min_p": 0.1,
                              "response_format": {"type": "json_object"}}),
    ("/tokenize", {"prompt": "Hello world", "return_token_strs": True}),
    ("/tokenize", {"messages": MESSAGES, "add_generation_prompt": True}),
    ("/detokenize", {"tokens": [504, 3575, 282]}),
]
NAN, INF = float("nan"), float("inf")
BAD_VALUES = [
    None, True, False, "", "x", "\ud800", "a\udfffb", "x" * 100_000, [], [None], {}, {"a": 1},
    -1, 0, 1, 2**31, 2**32, 2**63, 2**64, 10**20, -10**20, 10**100, 1e308, -1e308, 1e-320, 0.5,
    NAN, INF, -INF, [2**64], [-1], [49152], [1, 2**32], {"99999999999": 1}, {"\ud800": 1},
]
SAMPLING_FIELDS = [
    "model", "temperature", "top_p", "top_k", "min_p", "n", "stop", "stop_token_ids", "seed",
    "stream", "stream_options", "min_tokens", "ignore_eos", "skip_special_tokens",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "user",
    "response_format", "structured_outputs",
]
FIELDS = {  # every field of each endpoint, to set to bad values
    "/v1/completions": SAMPLING_FIELDS + ["prompt", "logprobs", "echo", "suffix", "best_of"],
    "/v1/chat/completions": SAMPLING_FIELDS + [
        "messages", "logprobs", "top_logprobs", "add_generation_prompt", "chat_template_kwargs",
        "tools", "tool_choice", "parallel_tool_calls"],
    "/tokenize": ["model", "prompt", "messages", "tools", "add_generation_prompt",
                  "chat_template_kwargs", "add_special_tokens", "return_token_strs"],
    "/detokenize": ["model", "tokens"],
}
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")
"""Left alone (or set to bad values that are no length): a request must not run long."""


def nested(depth: int) -> str:
    """A stand-in for a list nested ``depth`` deep, written out by ``encode`` (Python's json
    cannot write one deeper than its recursion limit)."""
    return f"<nested {depth}>"


def encode(body: dict) -> bytes:
    """``body`` as JSON bytes: NaN and Infinity as Python's json writes them, lone surrogates
    as \\ud800 escapes, and ``nested`` stand-ins as the lists they stand for."""
    data = json.dumps(body)
    for depth in (50, 100_000):
        data = data.replace(f'"{nested(depth)}"', "[" * depth + '"deep"' + "]" * depth)
    return data.encode()


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside ``value`` (dict keys and list indices)."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, item in items:
        found.append(prefix + (key,))
        found += paths(item, prefix + (key,))
    return found


def set_at(body: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        body = body[key]
    body[path[-1]] = value


def delete_at(body: Any, path: tuple) -> None:
    for key in path[:-1]:
        body = body[key]
    del body[path[-1]]


def bad_value(rng: random.Random, path: tuple) -> Any:
    """A value from ``BAD_VALUES`` (or a deep nesting) for the value at ``path``."""
    value = copy.deepcopy(rng.choice(BAD_VALUES + [nested(rng.choice([50, 100_000]))]))
    if path[-1] in LENGTH_FIELDS and (value is None or (isinstance(value, int) and 2 < value < 2**31)):
        return -1  # (a valid length would let a request run long)
    return value


def corrupt(rng: random.Random, path: str, body: dict) -> bytes:
    """``body`` (of a request to ``path``) with one to three corruptions, as the bytes sent."""
    body = copy.deepcopy(body)
    for _ in range(rng.randint(1, 3)):
        where, kind = paths(body), rng.random()
        if kind < 0.45 and where:  # a value anywhere becomes a bad one
            spot = rng.choice(where)
            set_at(body, spot, bad_value(rng, spot))
        elif kind < 0.75:  # a field of the API becomes a bad value
            field = rng.choice(FIELDS[path])
            body[field] = bad_value(rng, (field,))
        elif kind < 0.85:  # an unknown field
            body[rng.choice(["max_token", "temprature", "\ud800", "x" * 1000])] = 1
        elif deletable := [p for p in where if p[-1] not in LENGTH_FIELDS]:  # a value goes missing
            delete_at(body, rng.choice(deletable))
    data = encode(body)
    if rng.random() < 0.1:  # bytes that are not UTF-8, or a body cut short
        at = rng.randrange(len(data))
        data = data[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b""]) + \
            (data[at:] if rng.random() < 0.5 else b"")
    return data


EXACT = [
    # (path, body): inputs that once took the server down or answered with a 500
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "top_k": 2147483648}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "top_k": 10**20}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stop_token_ids": [18446744073709551616]}),
    ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}], "max_tokens": 2}),
    ("/tokenize", {"prompt": "a\ud800b"}),
    ("/tokenize", {"messages": [{"role": "user", "content": "a\ud800b"}]}),
    ("/v1/completions", {"prompt": [1, -1], "echo": True, "max_tokens": 2}),
    ("/v1/completions", {"prompt": [2**32], "echo": True, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": INF}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": NAN}),
]


class Connection:
    """One keep-alive HTTP/1.1 connection: a dropped connection fails the next request."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.http = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)

    def post(self, path: str, data: bytes) -> tuple[int, bytes]:
        self.http.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = self.http.getresponse()
        body = response.read()
        assert response.getheader("connection", "").lower() != "close", (path, data[:300])
        return response.status, body

    def get(self, path: str) -> tuple[int, bytes]:
        self.http.request("GET", path)
        response = self.http.getresponse()
        return response.status, response.read()


def check_answer(path: str, data: bytes, status: int, body: bytes) -> None:
    """A 200 with a well-formed body, or a 4xx with an OpenAI error body."""
    what = f"{path} {data[:300]!r} -> {status} {body[:500]!r}"
    if status == 200:
        if body.startswith(b"data:"):  # a stream: JSON events, no error event, then [DONE]
            events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", what
            assert all("error" not in json.loads(event) for event in events[:-1]), what
        else:
            json.loads(body)
        return
    assert 400 <= status < 500, what
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], what


@pytest.fixture(scope="module")
def connection(default_server):
    return Connection(default_server.url)


@pytest.mark.parametrize("path,body", EXACT, ids=[f"{p}-{i}" for i, (p, _) in enumerate(EXACT)])
def test_inputs_that_broke_the_server_get_a_400(connection, path, body):
    status, answer = connection.post(path, encode(body))
    check_answer(path, encode(body), status, answer)
    assert status == 400, answer


def test_corrupted_bodies_get_a_200_or_a_4xx_and_the_server_stays_well(default_server, connection):
    rng = random.Random(SEED)
    statuses = []
    for _ in range(NUM_REQUESTS):
        path, body = rng.choice(VALID)
        data = corrupt(rng, path, body)
        status, answer = connection.post(path, data)
        check_answer(path, data, status, answer)
        statuses.append(status)
    assert statuses.count(200) >= 10 and sum(s >= 400 for s in statuses) >= NUM_REQUESTS // 2
    assert connection.get("/health") == (200, b'{"status":"ok"}')
    errors = sum(value for key, value in default_server.metrics().items()
                 if key.startswith("duetjax_http_requests_total") and 'status="5' in key)
    assert errors == 0
    status, answer = connection.post("/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 20, "temperature": 0}).encode())
    assert status == 200 and "Paris" in json.loads(answer)["choices"][0]["message"]["content"]
