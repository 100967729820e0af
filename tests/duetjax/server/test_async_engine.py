"""AsyncEngine without HTTP: streaming, abort, bounded admission, errors, shutdown."""
from __future__ import annotations

import asyncio

import pytest

from duetjax import Engine, SamplingParams
from duetjax.async_engine import (AsyncEngine, EngineDrainingError, QueueFullError,
                                  RequestAbortedError, RequestFailedError)

from ..test_engine import break_detokenizers

LONG = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_chat_engine):
    return tiny_chat_engine


def run(engine: Engine, body, **kwargs):
    async def main():
        async_engine = AsyncEngine(engine, **kwargs)
        try:
            return await body(async_engine)
        finally:
            await async_engine.shutdown(drain_timeout=0)
    return asyncio.run(main())


def test_generate_streams_growing_outputs_then_finishes(engine):
    async def body(ae: AsyncEngine):
        outputs = [o async for o in ae.generate("Hello", SamplingParams(max_tokens=6, ignore_eos=True))]
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        assert lengths == sorted(lengths) and lengths[-1] == 6
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert outputs[-1].outputs[0].finish_reason == "length"
        together = await asyncio.gather(*(_last(ae.generate({"prompt_token_ids": [5, 6, 7]}, LONG))
                                          for _ in range(3)))
        assert len({tuple(o.outputs[0].token_ids) for o in together}) == 1  # greedy, same prompt
    run(engine, body)


async def _last(stream):
    last = None
    async for output in stream:
        last = output
    return last


def test_leaving_early_aborts_and_frees_pages(engine):
    async def body(ae: AsyncEngine):
        async for output in ae.generate("x", LONG):
            if len(output.outputs[0].token_ids) >= 2:
                break
        for _ in range(200):
            if ae.num_in_flight == 0 and ae.stats.num_running == 0:
                break
            await asyncio.sleep(0.01)
        assert ae.num_in_flight == 0
        assert ae.stats.num_free_pages == ae.stats.num_pages and ae.stats.kv_cache_usage == 0
    run(engine, body)


def test_admission_is_bounded(engine):
    async def body(ae: AsyncEngine):
        assert ae.capacity == 8 + 2
        streams = [await ae.add_request("q", LONG) for _ in range(10)]
        with pytest.raises(QueueFullError, match="retry later"):
            await ae.add_request("q", LONG)
        for stream in streams:
            ae.abort(stream.request_id)
    run(engine, body, max_queued_requests=2)


def test_bad_prompt_raises_before_anything_runs(engine):
    async def body(ae: AsyncEngine):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await ae.add_request({"prompt_token_ids": [1, 10**6]}, LONG)
        with pytest.raises(ValueError, match="empty"):
            await ae.add_request({"prompt_token_ids": []}, LONG)
        assert ae.num_in_flight == 0 and ae.is_healthy
    run(engine, body)


def test_shutdown_aborts_what_outlives_the_drain_timeout(engine):
    async def body(ae: AsyncEngine):
        stream = await ae.add_request("y", SamplingParams(max_tokens=250, ignore_eos=True))
        await ae.shutdown(drain_timeout=0)
        with pytest.raises(RequestAbortedError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDrainingError):
            await ae.add_request("z", LONG)
        assert engine.stats().num_free_pages == engine.stats().num_pages
    run(engine, body)


def test_a_request_that_fails_in_the_engine_fails_alone(engine, monkeypatch):
    """Its stream raises RequestFailedError; the others finish as they would have; the engine
    stays healthy and keeps nothing of it."""
    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
    prompts = ["first", "boom", "third"]
    expected = engine.generate(prompts, params, use_tqdm=False)
    break_detokenizers(engine, monkeypatch, "boom")

    async def body(ae: AsyncEngine):
        results = await asyncio.gather(*(_last(ae.generate(p, params)) for p in prompts),
                                       return_exceptions=True)
        assert isinstance(results[1], RequestFailedError)
        assert "the detokenizer broke" in str(results[1])
        for i in (0, 2):
            assert results[i].outputs[0].text == expected[i].outputs[0].text
        assert ae.is_healthy and ae.failure is None and ae.num_in_flight == 0
        again = await _last(ae.generate(prompts[0], params))
        assert again.outputs[0].text == expected[0].outputs[0].text
    run(engine, body)
