"""The README's main command: ``python -m duetjax.serve`` on the embedded SmolLM2 default."""
from __future__ import annotations

import openai


def test_default_model_answers_a_chat_question(default_server):
    client = openai.OpenAI(base_url=default_server.base_url, api_key="unused", max_retries=0)
    [model] = client.models.list().data
    assert model.id == "SmolLM2-135M-Instruct"
    response = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0)
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"  # the model ended its turn (EOS)
