"""The steady-decode path (``SchedulerOutput.continues``): a decode batch that repeats is
continued with array arithmetic. Its packed inputs, once advanced (``advanced``: what the
executable does first), must equal a fresh build's exactly, and the engine's outputs must
equal those of an engine that never takes the path."""
import dataclasses

import jax
import numpy as np
import pytest

from duetjax import Engine, SamplingParams
from duetjax.core import model_runner
from duetjax.core.scheduler import Scheduler
from duetjax.core.step_inputs import advanced, bucket_for, build_inputs, unpack

from ..test_engine import prompts, token_ids


def make(tiny_llama_dir, **kw):
    # Pages of 4 tokens: rows cross into new pages every few steps (page growth while steady).
    config = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=64, page_size=4,
                  max_model_len=128, show_progress=False)
    return Engine(tiny_llama_dir, **(config | kw))


@pytest.fixture
def checked_continuations(monkeypatch):
    """Wraps ``continue_packed``: each continuation, advanced, is compared with
    ``build_inputs()`` of the same batch, built from scratch. Returns the list of checked
    batch sizes."""
    checked = []
    original = model_runner.continue_packed

    def continue_and_compare(batch, last):
        runner_config, width = last.checked_against  # set below, per runner
        page_size = runner_config.page_size
        # (the dispatch it continues is in flight, with the same rows; built from the
        # requests alone, not from the input batch)
        alone = dataclasses.replace(batch, rows=None)
        fresh = build_inputs(bucket_for(alone, runner_config), alone, page_size, width,
                             in_flight=batch.scheduled)
        packed = original(batch, last)
        got = advanced(unpack(last.inputs, packed), page_size)
        assert got.advance[0] > 0 and fresh.advance[0] == 0
        for name, want, have in zip(leaf_names(fresh), jax.tree_util.tree_leaves(fresh),
                                    jax.tree_util.tree_leaves(got)):
            if name != "advance":
                assert want.dtype == have.dtype, name
                np.testing.assert_array_equal(have, want, err_msg=name)
        checked.append(len(batch.scheduled))
        return packed

    monkeypatch.setattr(model_runner, "continue_packed", continue_and_compare)
    return checked


def leaf_names(tree) -> list[str]:
    return [jax.tree_util.keystr(path).split(".")[-1]
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def no_steady(monkeypatch):
    monkeypatch.setattr(Scheduler, "_steady_after", lambda self, output, decode_steps: None)


def mixed_params(n):
    # Token limits that differ (rows leave at different steps), k-unaligned limits, and a stop
    # id that some rows sample (the vectorized stop check flags them).
    return [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True,
                           stop_token_ids=[7] if i % 3 == 0 else [])
            for i, m in enumerate(rng_limits(n))]


def rng_limits(n):
    return np.random.default_rng(5).integers(20, 80, size=n).tolist()


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_continuations_equal_fresh_builds_and_change_no_output(tiny_llama_dir, monkeypatch,
                                                               checked_continuations, decode_steps):
    batch = prompts(7, seed=21)
    params = mixed_params(len(batch))

    def follow_ups(outputs):  # each conversation goes on: its generated pages are cache hits
        return [{"prompt_token_ids": p["prompt_token_ids"] + o.outputs[0].token_ids}
                for p, o in zip(batch, outputs)]

    short = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    with monkeypatch.context() as m:
        no_steady(m)
        plain = make(tiny_llama_dir, decode_steps=decode_steps)
        expected = plain.generate(batch, params, use_tqdm=False)
        plain.generate(follow_ups(expected), short, use_tqdm=False)
    engine = make(tiny_llama_dir, decode_steps=decode_steps)
    engine.runner._last_dispatch.checked_against = (engine.config, engine.runner.max_pages_per_seq)
    got = engine.generate(batch, params, use_tqdm=False)
    engine.generate(follow_ups(got), short, use_tqdm=False)
    # Pages filled by generated tokens were named for the prefix cache as without the path.
    assert engine.stats().prefix_cache_hit_rate == plain.stats().prefix_cache_hit_rate > 0.5
    assert token_ids(got) == token_ids(expected)
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in expected]
    for a, b in zip(got, expected):
        assert len(a.metrics.token_times) == len(b.metrics.token_times) == len(a.outputs[0].token_ids)
    # The path ran (55 and 7 times here), at several batch sizes.
    assert len(checked_continuations) >= {1: 40, 4: 5}[decode_steps]
    assert len(set(checked_continuations)) >= 2
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_pages


def test_arrivals_aborts_and_preemption_leave_the_steady_path_cleanly(tiny_llama_dir, monkeypatch,
                                                                     checked_continuations):
    """Requests arrive and are aborted while a steady batch runs, in a pool small enough that
    growing pages preempts: the streamed outputs equal those of an engine without the path."""
    batch = prompts(6, seed=22)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)

    def run(engine):
        engine.runner._last_dispatch.checked_against = (engine.config, engine.runner.max_pages_per_seq)
        ids = [engine.add_request(p, params) for p in batch[:3]]
        final, step = {}, 0
        while engine.has_unfinished_requests() or step < 12:
            step += 1
            if step in (6, 9, 12):  # arrivals into a running steady batch
                ids.append(engine.add_request(batch[len(ids)], params))
            if step == 15:
                engine.abort(ids[1])
            for output in engine.step():
                final[output.request_id] = output
        return [(final[i].outputs[0].token_ids, final[i].outputs[0].finish_reason) for i in ids]

    small = dict(kv_cache_tokens=96, max_model_len=64, max_num_seqs=4)
    with monkeypatch.context() as m:
        no_steady(m)
        expected = run(make(tiny_llama_dir, **small))
    engine = make(tiny_llama_dir, **small)
    assert run(engine) == expected
    assert engine.stats().num_preemptions > 0
    assert expected[1][1] is None  # aborted: its last streamed output is unfinished
    assert len(checked_continuations) >= 5
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_pages
