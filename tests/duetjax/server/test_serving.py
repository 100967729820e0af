"""Fields a request leaves out take the model's defaults (its generation_config.json), as vLLM's
server does with --generation-config auto, not OpenAI's; fields it sends override them."""
from __future__ import annotations

import openai
import pytest

from .conftest import TINY_SERVER_ARGS
from .helpers import ServerProcess, write_tiny_model_with_sampling_defaults

HI = [{"role": "user", "content": "hi"}]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model = write_tiny_model_with_sampling_defaults(tmp_path_factory.mktemp("server-defaults"))
    # The shared server's flags, so its compiled executables come from the compilation cache.
    server = ServerProcess("--model", str(model), *TINY_SERVER_ARGS)
    yield openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    assert server.terminate() == 0, server.output[-3000:]


def chat(client: openai.OpenAI, **fields):
    extra = {**NO_EOS, **fields.pop("extra_body", {})}
    return client.chat.completions.create(model="tiny-chat", messages=HI, extra_body=extra, **fields)


def test_chat_fields_left_out_take_the_models_defaults(client):
    greedy = chat(client, temperature=0, max_tokens=8).choices[0].message.content
    left_out = chat(client)  # top_k 1 (greedy), max_new_tokens 5
    assert left_out.usage.completion_tokens == 5
    assert greedy.startswith(left_out.choices[0].message.content)
    # temperature sent, top_k still the model's: still greedy
    assert chat(client, temperature=1.0, seed=0, max_tokens=8).choices[0].message.content == greedy
    sent = chat(client, temperature=1.0, seed=0, max_tokens=8, extra_body={"top_k": 0})
    assert sent.usage.completion_tokens == 8 and sent.choices[0].message.content != greedy


def test_completions_max_tokens_left_out_is_the_models(client):
    def tokens(**fields) -> int:
        response = client.completions.create(model="tiny-chat", prompt="hi", extra_body=NO_EOS,
                                             **fields)
        return response.usage.completion_tokens

    assert tokens() == 5  # not OpenAI's 16
    assert tokens(max_tokens=8) == 8
