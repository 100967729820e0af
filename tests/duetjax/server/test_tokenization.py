"""``/tokenize`` and ``/detokenize``: the server's own token counts, without generating."""
from __future__ import annotations

import httpx
import pytest

from .conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30, headers=AUTH) as client:
        yield client


def test_tokenize_a_prompt_round_trips_through_detokenize(http):
    text = "Hello, world!"
    body = http.post("/tokenize", json={"model": "tiny-chat", "prompt": text,
                                        "return_token_strs": True}).json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    assert len(body["token_strs"]) == body["count"]
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"].endswith(text)
    bare = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert bare["token_strs"] is None
    assert http.post("/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": text}


def test_tokenized_chat_is_what_a_chat_completion_counts(http):
    counted = http.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    completion = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}).json()
    assert counted == completion["usage"]["prompt_tokens"]
    without_header = http.post("/tokenize", json={"messages": MESSAGES,
                                                  "add_generation_prompt": False}).json()["count"]
    assert without_header < counted
    # The server renders text and tokenizes it itself: a template's own tokenize stays off.
    kwargs = {"chat_template_kwargs": {"tokenize": True}}
    assert http.post("/tokenize", json={"messages": MESSAGES, **kwargs}).json()["count"] == counted
    completion = http.post("/v1/chat/completions",
                           json={"messages": MESSAGES, "max_tokens": 1, **kwargs})
    assert completion.status_code == 200 and completion.json()["usage"]["prompt_tokens"] == counted


def test_tokenize_needs_the_api_key(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 401
        assert client.post("/detokenize", json={"tokens": [65]}).status_code == 401
