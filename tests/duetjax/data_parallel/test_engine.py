"""DataParallelEngine with two replica processes of the tiny chat model on CPU: the outputs of one
Engine, spread over both replicas, shared prefixes kept together, abort, failures that stay
with their request or their replica, and shutdown that leaves no process behind."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from duetjax import SamplingParams
from duetjax.async_engine import (EngineDeadError, EngineDrainingError, QueueFullError,
                                  RequestAbortedError, RequestFailedError)
from duetjax.config import ConfigError
from duetjax.data_parallel import DataParallelEngine

from . import faults

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
# The limits of the in-process Engine (``tiny_chat_engine``), whose outputs these
# must equal, and whose executables the replicas find in the compilation cache.
LIMITS = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=64, kv_cache_tokens=4096)


def start(model_dir, **options) -> DataParallelEngine:
    return DataParallelEngine(model_dir, data_parallel_size=2, replica_init=faults.install,
                              **LIMITS, **options)


@pytest.fixture(scope="module")
def dp(tiny_chat_dir):
    engine = start(tiny_chat_dir, max_queued_requests=2)
    compiled = [s.compile_seconds for s in engine.replica_stats]
    yield engine
    engine.close()
    assert_gone(engine.replica_pids)
    assert compiled[0] > 0
    assert [s.compile_seconds for s in engine.replica_stats] == compiled, "compiled while serving"


def assert_gone(pids: list[int]) -> None:
    """The processes have exited and were reaped (no zombies either)."""
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def idle(dp: DataParallelEngine) -> bool:
    return dp.num_in_flight == 0 and all(
        s.num_running == s.num_waiting == 0 and s.num_free_pages == s.num_pages
        for s in dp.replica_stats)


async def last(stream):
    output = None
    async for output in stream:
        pass
    return output


def run_then_close(dp: DataParallelEngine, body) -> None:
    """Runs ``body()`` on a fresh event loop, then stops ``dp`` and checks that no replica
    process is left (a test with an engine of its own)."""
    pids = dp.replica_pids
    try:
        asyncio.run(body())
    finally:
        dp.close()
    assert_gone(pids)


def texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


def test_outputs_equal_one_engines_and_spread_over_both_replicas(dp, tiny_chat_engine):
    prompts = [f"prompt {i}: " + "abcdefgh"[i:] * (i + 1) for i in range(8)]
    expected = tiny_chat_engine.generate(prompts, GREEDY, use_tqdm=False)
    before = dp.replica_stats

    async def body():
        return await asyncio.gather(*(last(dp.generate(p, GREEDY)) for p in prompts))
    outputs = asyncio.run(body())
    assert texts(outputs) == texts(expected)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert [o.prompt for o in outputs] == prompts  # text prompts keep their text
    wait_until(lambda: idle(dp))
    looked_up = [after.prefix_cache_query_tokens - b.prefix_cache_query_tokens
                 for after, b in zip(dp.replica_stats, before)]
    assert all(tokens > 0 for tokens in looked_up), looked_up  # both replicas served
    assert dp.stats.prefix_cache_query_tokens == sum(s.prefix_cache_query_tokens
                                                     for s in dp.replica_stats)


def test_prompts_with_a_shared_prefix_land_on_one_replica(dp):
    prefix = "You are a careful assistant. Answer in one word. " * 2  # 6 pages of 16 tokens
    before, decisions = dp.replica_stats, dp.routing.decisions

    async def body():
        for i in range(4):  # one after the other: each finds the pages of the ones before
            await last(dp.generate(prefix + f"Question {i}?", GREEDY))
    asyncio.run(body())
    wait_until(lambda: idle(dp))
    assert dp.routing.decisions["cache"] - decisions["cache"] == 3
    hits = [after.prefix_cache_hit_tokens - b.prefix_cache_hit_tokens
            for after, b in zip(dp.replica_stats, before)]
    assert sorted(hits) == [0, 3 * 96], hits  # 3 requests found its 6 pages, on one replica


def test_abort_and_leaving_early_free_the_replicas(dp):
    async def body():
        stream = await dp.add_request("abort me", LONG)
        await stream.__anext__()
        dp.abort(stream.request_id)
        async for output in dp.generate("leave early", LONG):
            if len(output.outputs[0].token_ids) >= 2:
                break
        while dp.num_in_flight:  # (the generator's cleanup runs on the loop's next turns)
            await asyncio.sleep(0.01)
    asyncio.run(body())
    wait_until(lambda: idle(dp))
    assert sum(dp.routing.num_requests) == 0


def test_bad_requests_and_a_full_queue_are_refused_before_anything_runs(dp):
    async def body():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await dp.add_request({"prompt_token_ids": [1, 10**6]}, GREEDY)
        with pytest.raises(ValueError, match="empty"):
            await dp.add_request({"prompt_token_ids": []}, GREEDY)
        with pytest.raises(TypeError, match="list of integers"):
            await dp.add_request({"prompt_token_ids": "abc"}, GREEDY)
        assert dp.capacity == 2 * 8 + 2
        # (slow: at least 200 steps of 20 ms, so none finishes before the checks however slowly
        # this machine adds them)
        streams = [await dp.add_request(f"q{i}: {faults.SLOW}", LONG, request_id=f"full-{i}")
                   for i in range(17)]
        with pytest.raises(ValueError, match="already in use"):
            await dp.add_request("again", LONG, request_id="full-0")
        streams.append(await dp.add_request(f"the last one: {faults.SLOW}", LONG))
        with pytest.raises(QueueFullError, match="retry later"):
            await dp.add_request("one too many", LONG)
        assert dp.routing.num_requests == (9, 9)
        for stream in streams:
            dp.abort(stream.request_id)
        assert dp.num_in_flight == 0 and dp.is_healthy
    asyncio.run(body())
    wait_until(lambda: idle(dp))


def test_a_request_that_fails_in_its_replica_fails_alone(dp, tiny_chat_engine):
    prompts = ["first", f"{faults.FAILS_ALONE}!", "third", "fourth"]
    expected = tiny_chat_engine.generate(prompts, GREEDY, use_tqdm=False)

    async def body():
        return await asyncio.gather(*(last(dp.generate(p, GREEDY)) for p in prompts),
                                    return_exceptions=True)
    results = asyncio.run(body())
    assert isinstance(results[1], RequestFailedError), results[1]
    assert "the detokenizer broke" in str(results[1])
    assert [r.outputs[0].text for i, r in enumerate(results) if i != 1] == \
        [e.outputs[0].text for i, e in enumerate(expected) if i != 1]
    assert dp.is_healthy and dp.failure is None and dp.num_in_flight == 0


def test_shutdown_drains_then_stops_every_replica(dp):
    """(Last of the tests on ``dp``: it stops it.)"""
    async def both_in_flight():
        while dp.num_in_flight < 2:
            await asyncio.sleep(0.01)

    async def body():
        slow = await dp.add_request(f"{faults.SLOW}: abort me at shutdown", LONG)
        # 30 steps of at least 20 ms: still running when the drain begins
        short = asyncio.ensure_future(last(dp.generate(f"{faults.SLOW}: drain me",
                                                       SamplingParams(temperature=0.0,
                                                                      max_tokens=30,
                                                                      ignore_eos=True))))
        await asyncio.wait_for(both_in_flight(), timeout=60)
        dp.begin_drain()
        with pytest.raises(EngineDrainingError):
            await dp.add_request("too late", GREEDY)
        assert (await short).outputs[0].finish_reason == "length"  # in flight: it went on
        await dp.shutdown(drain_timeout=0)  # the slow one has seconds to go
        with pytest.raises(RequestAbortedError):
            await last(slow)
    asyncio.run(body())
    assert not dp.is_healthy and dp.failure == "the replicas have stopped"
    assert_gone(dp.replica_pids)


def test_a_dead_replica_fails_only_its_requests(tiny_chat_dir):
    """Those it had answered fail; those it had not started go to the other replica."""
    dp = start(tiny_chat_dir)
    pids = dp.replica_pids

    async def body():
        slow = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)  # 4 s or more
        running = [await dp.add_request(f"{i}: {faults.SLOW}", slow) for i in range(16)]
        assert dp.routing.num_requests == (8, 8)  # by load: replicas 0, 1, 0, 1, ...
        for stream in running:
            await stream.__anext__()
        # max_num_seqs (8) run on each replica: these two wait there, unanswered
        waiting = [await dp.add_request(f"wait {i}: {faults.SLOW}", slow) for i in range(2)]
        assert dp.routing.num_requests == (9, 9)
        os.kill(pids[0], signal.SIGKILL)
        results = await asyncio.gather(*(last(s) for s in running + waiting),
                                       return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results[0:16:2]), results
        assert [r.outputs[0].finish_reason for r in results[1:16:2]] == ["length"] * 8
        assert [r.outputs[0].finish_reason for r in results[16:]] == ["length"] * 2  # moved
        assert "replica 0" in str(results[0]) and "exited with code -9" in str(results[0])
        assert not dp.is_healthy and "replica 0" in dp.failure
        assert dp.routing.alive == (False, True) and dp.capacity == 8 + 256
        after = await last(dp.generate("still served", GREEDY))
        assert after.outputs[0].finish_reason == "length"

        # A step that raises in replica 1 (a device failure) takes it down too.
        doomed = await dp.add_request(faults.BREAKS_THE_DEVICE, GREEDY)
        with pytest.raises(EngineDeadError, match="the device fell off the bus"):
            await last(doomed)
        with pytest.raises(EngineDeadError, match="every replica stopped"):
            await dp.add_request("nobody left", GREEDY)
        assert "replica 1" in dp.failure and "fell off the bus" in dp.failure
        await dp.shutdown(drain_timeout=0)
    run_then_close(dp, body)


def test_a_hung_replica_is_killed_and_fails_its_requests(tiny_chat_dir):
    dp = start(tiny_chat_dir, replica_timeout=1.0)

    async def body():
        hung = await dp.add_request(faults.HANGS, GREEDY)
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"sent nothing for \d+s with 1 requests \(hung\)"):
            await last(hung)
        assert time.monotonic() - started < 30
        assert dp.routing.alive.count(False) == 1 and "hung" in dp.failure
        after = await last(dp.generate("still served", GREEDY))
        assert after.outputs[0].finish_reason == "length"
        await dp.shutdown(drain_timeout=0)
    run_then_close(dp, body)


def test_options_are_checked_before_any_replica_starts(tiny_chat_dir):
    with pytest.raises(ConfigError, match="must be >= 1"):
        DataParallelEngine(tiny_chat_dir, data_parallel_size=0)
    with pytest.raises(ConfigError, match="duet mode"):
        DataParallelEngine(tiny_chat_dir, data_parallel_size=2, mode="duet")
    with pytest.raises(ConfigError, match="max_num_seqs"):
        DataParallelEngine(tiny_chat_dir, data_parallel_size=2, max_num_seqs=0)
