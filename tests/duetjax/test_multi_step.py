"""k-step decode (one executable runs k decode steps) gives exactly the tokens of k single steps."""
import jax
import numpy as np
import pytest

from duetjax import Engine, SamplingParams

from .test_engine import prompts, token_ids


def make(tiny_llama_dir, **kw):
    config = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=64, show_progress=False)
    return Engine(tiny_llama_dir, **(config | kw))


@pytest.fixture(scope="module")
def single(tiny_llama_dir):
    return make(tiny_llama_dir)


@pytest.fixture(scope="module")
def multi(tiny_llama_dir):
    return make(tiny_llama_dir, decode_steps=4)


def test_k_step_decode_matches_single_steps(single, multi):
    batch = prompts(5, seed=11)
    # Token limits that are not multiples of k; a stop token that lands inside a k-step chunk.
    plain = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (10, 7, 13, 1, 9)]
    expected = token_ids(single.generate(batch, plain, use_tqdm=False))
    stop_at = expected[2][5]
    params = plain[:2] + [SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True,
                                         stop_token_ids=[stop_at])] + plain[3:]
    expected[2] = expected[2][:expected[2].index(stop_at) + 1]
    before = multi.stats().loop
    got = multi.generate(batch, params, use_tqdm=False)
    assert token_ids(got) == expected
    assert got[2].outputs[0].finish_reason == "stop"
    loop = multi.stats().loop.since(before)
    assert loop.steps > loop.dispatches  # k > 1 ran
    stats = multi.stats()
    assert stats.num_free_pages == stats.num_pages  # overrun pages were freed too


def test_k_step_seeded_sampling_matches(single, multi):
    batch = prompts(3, seed=14)
    params = [SamplingParams(temperature=1.0, max_tokens=11, seed=5, ignore_eos=True),
              SamplingParams(temperature=0.7, min_p=0.05, max_tokens=9, seed=6, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True)]
    before = multi.stats().loop
    assert token_ids(multi.generate(batch, params, use_tqdm=False)) == token_ids(
        single.generate(batch, params, use_tqdm=False))
    loop = multi.stats().loop.since(before)
    assert loop.steps > loop.dispatches  # k > 1 ran


def test_full_sampler_requests_decode_one_step_per_dispatch(single, multi):
    # Top-p, penalties and logprobs run in the full sampler between steps, not in the k-step loop.
    batch = prompts(3, seed=12)
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=11, seed=5, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=11, frequency_penalty=1.5, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=11, logprobs=3, ignore_eos=True)]
    one = single.generate(batch, params, use_tqdm=False)
    before = multi.stats().loop
    many = multi.generate(batch, params, use_tqdm=False)
    loop = multi.stats().loop.since(before)
    assert loop.steps == loop.dispatches  # k = 1
    assert token_ids(many) == token_ids(one)
    for a, b in zip(one[2].outputs[0].logprobs, many[2].outputs[0].logprobs):
        assert a.keys() == b.keys()
        np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-5, atol=1e-6)


def test_split_schedule_drops_to_one_step_for_a_full_sampler_newcomer(multi):
    # A one-token prompt decodes at once; with top-p it needs the full sampler, so the k-step
    # decode of the others becomes a single step.
    from duetjax.core.request import Request

    scheduler = multi.scheduler
    plain = Request("plain", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=8), seed=0)
    scheduler.add(plain)
    scheduler.commit(scheduler.schedule())
    plain.output_token_ids.append(9)  # its first token is back: it decodes now
    newcomer = Request("newcomer", [5], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8), seed=1)
    scheduler.add(newcomer)
    batch = scheduler.schedule(4, split=True)
    assert [item.request.request_id for item in batch.scheduled] == ["plain", "newcomer"]
    assert batch.num_steps == 1 and all(item.num_steps == 1 for item in batch.scheduled)
    for request in (plain, newcomer):
        scheduler.finish(request, "abort")
    assert scheduler.blocks.num_free_pages == scheduler.blocks.num_pages


def test_k_step_with_preemption_and_no_compiles(tiny_llama_dir, single):
    batch = prompts(6, seed=13)
    expected = token_ids(single.generate(batch, SamplingParams(temperature=0.0, max_tokens=20,
                                                               ignore_eos=True), use_tqdm=False))
    small = make(tiny_llama_dir, decode_steps=8, kv_cache_tokens=96, max_model_len=96,
                 max_num_batched_tokens=16, max_num_seqs=4)
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        got = small.generate(batch, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                             use_tqdm=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert token_ids(got) == expected
    assert compiles == []
    assert small.stats().num_preemptions > 0
    assert small.stats().num_free_pages == small.stats().num_pages


def test_decode_steps_is_validated(tiny_llama_dir):
    with pytest.raises(ValueError, match="decode_steps"):
        make(tiny_llama_dir, decode_steps=16, max_decode_steps=8)
    with pytest.raises(ValueError, match="power of two"):
        make(tiny_llama_dir, decode_steps=3)


@pytest.mark.parametrize("engine_name", ["single", "multi"])
def test_pages_filled_by_generated_tokens_are_cached(engine_name, request):
    # A page is named for prefix hits once the host knows all its tokens; with k-step decode
    # that is a dispatch after the device computed them. A follow-up prompt that repeats the
    # prompt and the output must hit every full page of both.
    engine = request.getfixturevalue(engine_name)
    prompt = np.random.default_rng(21).integers(3, 256, size=20).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    output = engine.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    follow_up = prompt + list(output.outputs[0].token_ids) + [5]  # 51 tokens: 3 full pages
    hits_before = engine.stats().prefix_cache_hit_tokens
    engine.generate([{"prompt_token_ids": follow_up}], SamplingParams(max_tokens=1), use_tqdm=False)
    assert engine.stats().prefix_cache_hit_tokens - hits_before == 48
