"""AsyncEngine without HTTP: streaming, abort, bounded admission, errors, shutdown."""
from __future__ import annotations

import asyncio

import pytest

from duetjax import Engine, SamplingParams
from duetjax.async_engine import (AsyncEngine, EngineDrainingError, QueueFullError,
                                  RequestAbortedError)

LONG = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_chat_dir):
    # The test server's limits, so the compiled executables come from the compilation cache.
    return Engine(tiny_chat_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64,
                  kv_cache_tokens=4096, show_progress=False)


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
        assert engine.scheduler.blocks.num_free_pages == engine.scheduler.blocks.num_pages
    run(engine, body)
