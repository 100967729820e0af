"""Prompt logprobs over HTTP: ``echo`` with ``logprobs`` on /v1/completions (OpenAI's legacy
format, with ``max_tokens: 0`` as log-likelihood evaluations send it) and vLLM's extra
``prompt_logprobs`` on both endpoints. The tiny chat model has one token per byte, so an ASCII
prompt's tokens are its characters."""
from __future__ import annotations

import pytest

MODEL = "tiny-chat"
PROMPT = "The quick brown fox"
GREEDY = dict(model=MODEL, temperature=0, extra_body={"ignore_eos": True})


def completion(client, **kwargs):
    extra = {**GREEDY["extra_body"], **kwargs.pop("extra_body", {})}
    return client.completions.create(**{**GREEDY, **kwargs, "extra_body": extra})


def check_lines_up(logprobs, text):
    """Each token's text sits at its offset in the returned text, one after the other."""
    assert "".join(logprobs.tokens) == text
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i]))
                                    for i in range(len(logprobs.tokens))]
    for token, offset in zip(logprobs.tokens, logprobs.text_offset):
        assert text[offset:offset + len(token)] == token


def test_echo_with_logprobs_returns_the_prompt_tokens_ahead_of_the_completion(client):
    plain = completion(client, prompt=PROMPT, max_tokens=4, logprobs=2).choices[0]
    echoed = completion(client, prompt=PROMPT, max_tokens=4, logprobs=2, echo=True).choices[0]
    assert echoed.text == PROMPT + plain.text
    lp = echoed.logprobs
    n = len(PROMPT)
    assert lp.tokens[:n] == list(PROMPT) and lp.tokens[n:] == plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    for token, logprob, top in zip(lp.tokens[1:n], lp.token_logprobs[1:n], lp.top_logprobs[1:n]):
        assert top[token] == logprob and len(top) in (2, 3)  # the top 2, and the token if not
        assert max(top.values()) >= logprob
    check_lines_up(lp, echoed.text)


def test_echo_without_new_tokens_scores_the_prompt(client):
    """lm-evaluation-harness's log-likelihood request: echo, logprobs, max_tokens 0."""
    response = completion(client, prompt=[PROMPT, "abc"], max_tokens=0, logprobs=1, echo=True,
                          extra_body={"prompt_logprobs": 3})
    for choice, prompt in zip(response.choices, [PROMPT, "abc"]):
        assert choice.text == prompt and choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp.tokens == list(prompt) and lp.token_logprobs[0] is None
        check_lines_up(lp, prompt)
        # vLLM's prompt_logprobs: per token id, its logprob, rank and text
        vllm = choice.model_extra["prompt_logprobs"]
        assert len(vllm) == len(prompt) and vllm[0] is None
        for char, logprob, entry in zip(prompt[1:], lp.token_logprobs[1:], vllm[1:]):
            mine = entry[str(ord(char))]
            assert mine["logprob"] == pytest.approx(logprob, abs=1e-6)
            assert mine["decoded_token"] == char
            ranked = sorted(entry.values(), key=lambda e: -e["logprob"])
            assert len(entry) in (3, 4) and [e["rank"] for e in ranked[:3]] == [1, 2, 3]
            assert mine["rank"] is None or 1 <= mine["rank"] <= 3
    assert response.usage.completion_tokens == 0
    assert response.usage.prompt_tokens == response.usage.total_tokens == len(PROMPT) + 3


def test_streamed_echo_carries_the_prompt_logprobs_in_its_first_chunk(client):
    kwargs = dict(prompt=PROMPT, max_tokens=5, logprobs=1, echo=True)
    whole = completion(client, **kwargs).choices[0]
    chunks = [c.choices[0] for c in completion(client, stream=True, **kwargs) if c.choices]
    assert chunks[0].text.startswith(PROMPT) and len(chunks[0].logprobs.tokens) > len(PROMPT)
    assert "".join(c.text for c in chunks) == whole.text
    tokens = [t for c in chunks for t in c.logprobs.tokens]
    offsets = [o for c in chunks for o in c.logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    empty = [c for c in completion(client, stream=True, **{**kwargs, "max_tokens": 0})
             if c.choices]
    assert [c.choices[0].text for c in empty] == [PROMPT]
    assert empty[0].choices[0].logprobs.tokens == list(PROMPT)


def test_chat_prompt_logprobs_cover_the_rendered_prompt(client):
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0,
        extra_body={"prompt_logprobs": 0})
    prompt_logprobs = response.model_extra["prompt_logprobs"]
    assert len(prompt_logprobs) == response.usage.prompt_tokens and prompt_logprobs[0] is None
    assert all(len(entry) == 1 and next(iter(entry.values()))["logprob"] <= 0
               for entry in prompt_logprobs[1:])
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
    assert plain.model_extra.get("prompt_logprobs") is None
    assert plain.choices[0].message.content == response.choices[0].message.content
