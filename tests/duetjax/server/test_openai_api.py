"""The official ``openai`` client, sync and async, against a real server on the tiny model."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from .conftest import API_KEY

MODEL = "tiny-chat"
MESSAGES = [{"role": "user", "content": "Say something."}]


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_text_and_usage(client):
    response = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert response.object == "text_completion" and response.model == MODEL
    assert choice.finish_reason == "length" and isinstance(choice.text, str)
    assert response.usage.prompt_tokens == len("Hello there".encode())  # one token per byte
    assert response.usage.completion_tokens == 6
    assert response.usage.total_tokens == response.usage.prompt_tokens + 6


def test_completion_greedy_is_deterministic_and_seeded_sampling_reproducible(client):
    def text(**kwargs):
        return client.completions.create(model=MODEL, prompt="abc", max_tokens=8,
                                         extra_body={"ignore_eos": True}, **kwargs).choices[0].text
    assert text(temperature=0) == text(temperature=0)
    assert text(temperature=1.0, seed=7) == text(temperature=1.0, seed=7)


def test_completion_token_ids_batch_and_echo(client):
    response = client.completions.create(model=MODEL, prompt=[[72, 105], [104, 101, 121]],
                                         max_tokens=3, temperature=0, echo=True,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].text.startswith("Hi")
    assert response.choices[1].text.startswith("hey")
    assert response.usage.prompt_tokens == 5 and response.usage.completion_tokens == 6


def test_chat_completion(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5,
                                              temperature=0, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert response.object == "chat.completion"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length" and response.usage.completion_tokens == 5


def test_streaming_chat_with_usage_matches_non_streaming(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    expected = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(client, endpoint):
    """vLLM's stream_options.continuous_usage_stats, which vLLM's benchmark clients send with
    include_usage on every streaming request."""
    kwargs = dict(model=MODEL, max_tokens=6, temperature=0, stream=True,
                  stream_options={"include_usage": True, "continuous_usage_stats": True},
                  extra_body={"ignore_eos": True})
    if endpoint == "chat":
        chunks = list(client.chat.completions.create(messages=MESSAGES, **kwargs))
    else:
        chunks = list(client.completions.create(prompt="Hello there", **kwargs))
    usages = [c.usage for c in chunks]
    assert all(u is not None for u in usages)
    completion = [u.completion_tokens for u in usages]
    # (non-decreasing: a slow reader may get several tokens in one chunk, even all of them)
    assert completion == sorted(completion) and completion[-1] == 6
    assert len({u.prompt_tokens for u in usages}) == 1
    assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in usages)
    assert chunks[-1].choices == [] and chunks[-2].choices  # the final usage chunk still comes
    without_include_usage = {**kwargs, "stream_options": {"continuous_usage_stats": True}}
    if endpoint == "chat":
        plain = list(client.chat.completions.create(messages=MESSAGES, **without_include_usage))
    else:
        plain = list(client.completions.create(prompt="Hello there", **without_include_usage))
    assert all(c.usage is None for c in plain)  # (as vLLM: it goes with include_usage)


def test_n_choices(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, max_tokens=6,
                                              temperature=1.0, seed=3,
                                              extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    assert response.usage.completion_tokens == 18
    assert len({c.message.content for c in response.choices}) > 1  # seeds 3, 4, 5 differ
    stream = client.completions.create(model=MODEL, prompt="xyz", n=2, max_tokens=4, stream=True,
                                       temperature=0, extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and texts[0] == texts[1]  # greedy: both choices agree


def _stop_inside(text: str) -> tuple[str, str] | None:
    """A stop string first seen after the start of ``text`` (two characters if possible, to
    exercise streaming's hold-back), and the text before it. U+FFFD is excluded: it stands for
    bytes that a later token may complete. The random model writes mostly non-ASCII bytes."""
    for length in (2, 1):
        for k in range(1, len(text) - length + 1):
            stop = text[k:k + length]
            if "\ufffd" not in stop and text.find(stop) == k:
                return stop, text[:k]
    return None


def test_stop_strings(client):
    kwargs = dict(model=MODEL, prompt="The quick brown fox", temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(max_tokens=40, **kwargs).choices[0].text
    found = _stop_inside(full)
    assert found is not None, f"no stop string candidate in {full!r}"
    stop, before = found
    response = client.completions.create(max_tokens=40, stop=[stop, "never-seen"], **kwargs)
    assert response.choices[0].text == before
    assert response.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        max_tokens=40, stop=stop, stream=True, **kwargs) if c.choices)
    assert streamed == before  # no part of the stop string leaked into the stream


def test_logprobs(client):
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the sampled token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True)
    legacy = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, logprobs=2,
                                       temperature=0, extra_body={"ignore_eos": True})
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert lp.text_offset[0] == 0
    # keyed by token text, so byte tokens that all print as U+FFFD may share a key
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert all(lp.top_logprobs[i][t] == lp.token_logprobs[i] for i, t in enumerate(lp.tokens)
               if t != "\ufffd")


def test_logit_bias_and_repetition_penalty(client):
    kwargs = dict(model=MODEL, prompt="abc", max_tokens=12, temperature=0)
    forced = client.completions.create(logit_bias={"65": 100}, extra_body={"ignore_eos": True},
                                       **kwargs)
    assert forced.choices[0].text == "A" * 12  # byte 65; ignore_eos: EOS is not forced away
    plain = client.completions.create(extra_body={"ignore_eos": True}, **kwargs).choices[0].text
    # a byte the tiny model repeats (one token per byte: ASCII characters are their token ids)
    repeated = next(c for c in plain if c.isascii() and plain.count(c) > 1)
    banned = client.completions.create(logit_bias={str(ord(repeated)): -100},
                                       extra_body={"ignore_eos": True}, **kwargs).choices[0].text
    assert repeated not in banned
    penalized = client.completions.create(
        extra_body={"ignore_eos": True, "repetition_penalty": 3.0}, **kwargs).choices[0].text
    assert penalized != plain
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logit_bias={"66": 100},
        extra_body={"ignore_eos": True, "repetition_penalty": 1.2})
    assert chat.choices[0].message.content == "B" * 6


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)


def test_async_client_completion_and_stream(server):
    async def main():
        client = async_client(server)
        response = await client.completions.create(model=MODEL, prompt="async", max_tokens=3,
                                                   extra_body={"ignore_eos": True})
        assert response.usage.completion_tokens == 3
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                      max_tokens=3, stream=True,
                                                      extra_body={"ignore_eos": True})
        reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
        assert reasons[-1] == "length"
        await client.close()

    asyncio.run(main())


def test_32_concurrent_streaming_clients(server):
    client = None

    async def one(i: int):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"client {i}"}], max_tokens=8,
            stream=True, stream_options={"include_usage": True}, temperature=0.8, seed=i,
            extra_body={"ignore_eos": True})
        return [chunk async for chunk in stream]

    async def main():
        nonlocal client
        client = async_client(server)
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    results = asyncio.run(main())
    for chunks in results:
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 8
        assert len({c.id for c in chunks}) == 1
    assert server.wait_until(lambda: server.metric("duetjax_num_requests_in_flight") == 0)


def test_client_disconnect_aborts_request_and_frees_pages(server):
    aborted_before = server.metric("duetjax_request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": "go", "max_tokens": 240, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.base_url}/completions", json=body,
                         headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break  # one chunk, then hang up
    assert server.wait_until(
        lambda: server.metric("duetjax_request_success_total", finished_reason="abort")
        == aborted_before + 1)
    assert server.wait_until(lambda: server.metric("duetjax_num_requests_running") == 0)
    assert server.metric("duetjax_kv_cache_usage_perc") == 0.0
    assert server.metric("duetjax_kv_cache_free_pages") == server.metric("duetjax_kv_cache_pages")


def test_metrics_exposes_the_serving_picture(server, client):
    client.completions.create(model=MODEL, prompt="m", max_tokens=2, extra_body={"ignore_eos": True})
    samples = server.metrics()
    names = {key.partition("{")[0] for key in samples}
    for name in ("duetjax_time_to_first_token_seconds_bucket",
                 "duetjax_inter_token_latency_seconds_bucket", "duetjax_num_requests_running",
                 "duetjax_num_requests_waiting", "duetjax_kv_cache_usage_perc",
                 "duetjax_prefix_cache_hit_rate", "duetjax_mode_info", "duetjax_sm_share",
                 "duetjax_request_success_total", "duetjax_http_requests_total",
                 "duetjax_duet_split_iterations", "duetjax_duet_decode_steps",
                 "duetjax_duet_predicted_iteration_ms", "duetjax_duet_measured_iteration_ms",
                 "duetjax_duet_worker_failures", "duetjax_preemptions_total"):
        assert name in names, name
    assert server.metric("duetjax_mode_info", mode="aggregated") == 1.0
    assert server.metric("duetjax_sm_share", phase="decode") == 1.0
    assert server.metric("duetjax_duet_split_iterations") == 0.0  # an aggregated server
