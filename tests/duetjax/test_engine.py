"""Engine behaviour on a tiny random Llama (token ids in, token ids out)."""
import dataclasses

import numpy as np
import pytest

from duetjax import Engine, SamplingParams
from duetjax.config import ConfigError, EngineConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def prompts(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, 256, size=length).tolist()}
            for length in rng.integers(3, 40, size=n)]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return Engine(tiny_llama_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64,
                  show_progress=False)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_batch_equals_one_by_one(engine):
    batch = prompts(5)
    together = token_ids(engine.generate(batch, GREEDY, use_tqdm=False))
    alone = [token_ids(engine.generate(p, GREEDY, use_tqdm=False))[0] for p in batch]
    assert together == alone
    assert all(len(t) == 12 for t in together)


def test_compile_threads_compile_the_same_buckets(engine, tiny_llama_dir):
    """Buckets compiled on a pool of threads: the same set, nothing compiled while serving,
    the same tokens."""
    threaded = Engine(tiny_llama_dir, dtype="float32", max_num_seqs=8,
                      max_num_batched_tokens=64, show_progress=False, compile_threads=3,
                      compilation_cache_dir="")
    assert set(threaded.compiled_buckets()) == set(engine.compiled_buckets())
    compiled = threaded.stats().compile_seconds
    batch = prompts(6, seed=3)
    assert (token_ids(threaded.generate(batch, GREEDY, use_tqdm=False))
            == token_ids(engine.generate(batch, GREEDY, use_tqdm=False)))
    assert threaded.stats().compile_seconds == compiled, "compiled while serving"
    with pytest.raises(ConfigError, match="compile_threads"):
        EngineConfig(compile_threads=0)


def test_stats_is_a_snapshot_of_the_engine(engine, tiny_llama_dir):
    assert engine.model_path == tiny_llama_dir and engine.vocab_size == engine.model_config.vocab_size
    assert engine.dtype == np.float32 and engine.compiled_buckets()
    idle = engine.stats()
    assert idle.num_running == idle.num_waiting == 0 and idle.num_free_pages == idle.num_pages
    assert idle.page_size == 16 and idle.mode == "aggregated" and idle.sm_share == (1.0, 1.0)
    assert idle.compile_seconds > 0 and idle.token_budget == 64
    request_id = engine.add_request(prompts(1)[0], GREEDY)
    engine.add_request(prompts(1, seed=1)[0], GREEDY)
    engine.step()
    busy = engine.stats()
    assert busy.num_running == 2 and busy.num_waiting == 0
    assert busy.num_free_pages < idle.num_free_pages and 0 < busy.kv_cache_usage <= 1
    assert busy.num_steps == idle.num_steps + 1 and busy.loop.steps == idle.loop.steps + 1
    engine.abort(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    done = engine.stats()
    assert done.num_running == 0 and done.num_free_pages == done.num_pages
    assert busy.num_running == 2 and busy.loop.steps == idle.loop.steps + 1  # (a snapshot)
    assert done.loop.since(busy.loop).steps == done.loop.steps - busy.loop.steps > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        done.num_running = 1


@pytest.fixture(scope="module")
def small(tiny_llama_dir):
    """A KV pool of 64 tokens and a 16-token budget: six prompts force preemptions."""
    return Engine(tiny_llama_dir, dtype="float32", kv_cache_tokens=64, max_model_len=64,
                  max_num_batched_tokens=16, max_num_seqs=4, show_progress=False)


def test_preemption_and_chunked_prefill_keep_outputs(engine, small):
    batch = prompts(6, seed=1)
    expected = token_ids(engine.generate(batch, GREEDY, use_tqdm=False))
    before = small.stats().num_preemptions
    assert token_ids(small.generate(batch, GREEDY, use_tqdm=False)) == expected
    assert small.stats().num_preemptions > before  # the pool was small enough to force it
    assert small.stats().num_free_pages == small.stats().num_pages


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=10, seed=1234,
                            ignore_eos=True)
    batch = prompts(3, seed=2)
    first = token_ids(engine.generate(batch, params, use_tqdm=False))
    again = token_ids(engine.generate(batch[::-1], params, use_tqdm=False))[::-1]
    assert first == again
    other = token_ids(engine.generate(batch, SamplingParams(temperature=1.0, max_tokens=10, seed=99,
                                                            ignore_eos=True), use_tqdm=False))
    assert other != first


def test_max_tokens_and_stop_token_ids(engine):
    out = engine.generate(prompts(1)[0], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    stop_at = out.token_ids[4]
    first = out.token_ids.index(stop_at)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_at])
    stopped = engine.generate(prompts(1)[0], params, use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == out.token_ids[:first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at


def test_abort_frees_pages(engine):
    free = engine.stats().num_free_pages
    request_id = engine.add_request(prompts(1)[0], GREEDY)
    engine.step()
    assert engine.stats().num_free_pages < free
    engine.abort(request_id)
    assert engine.stats().num_free_pages == free
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt, message", [
    ({"prompt_token_ids": [1, 999]}, "outside the vocabulary"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": list(range(3, 250)) * 2}, "max_model_len"),
    ("text without a tokenizer", "no tokenizer"),
    (42, "a prompt is a string"),
])
def test_bad_prompts_raise_clear_errors(engine, prompt, message):
    with pytest.raises((ValueError, TypeError), match=message):
        engine.generate(prompt, GREEDY, use_tqdm=False)
    assert not engine.has_unfinished_requests()


def test_logprobs_match_the_model_distribution(engine, tiny_llama_dir):
    from models import compute_logits, load_model

    prompt = prompts(1, seed=3)[0]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=5)
    out = engine.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 3
    first = out.logprobs[0]
    logits = compute_logits(load_model(tiny_llama_dir, dtype="float32"), [prompt["prompt_token_ids"]])[0][-1]
    reference = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
    top5 = np.argsort(-reference)[:5]
    assert set(first) == set(top5.tolist()) and out.token_ids[0] == top5[0]
    for token, logprob in first.items():
        assert abs(logprob - reference[token]) < 1e-4


def test_min_p_one_is_greedy(engine):
    batch = prompts(2, seed=4)
    greedy = token_ids(engine.generate(batch, GREEDY, use_tqdm=False))
    min_p = SamplingParams(temperature=1.5, min_p=1.0, max_tokens=12, ignore_eos=True, seed=7)
    assert token_ids(engine.generate(batch, min_p, use_tqdm=False)) == greedy


def test_prefix_cache_hits_compute_fewer_tokens_and_change_nothing(tiny_llama_dir):
    rng = np.random.default_rng(5)
    shared = rng.integers(3, 256, size=40).tolist()
    batch = [{"prompt_token_ids": shared + rng.integers(3, 256, size=n).tolist()} for n in (3, 9)]
    cold = Engine(tiny_llama_dir, dtype="float32", enable_prefix_caching=False)
    expected = token_ids(cold.generate(batch, GREEDY, use_tqdm=False))
    warm = Engine(tiny_llama_dir, dtype="float32")
    first = token_ids(warm.generate(batch[:1], GREEDY, use_tqdm=False))
    assert warm.stats().prefix_cache_hit_tokens == 0
    second = token_ids(warm.generate(batch[1:], GREEDY, use_tqdm=False))
    assert first + second == expected
    assert warm.stats().prefix_cache_hit_tokens == 32  # two full 16-token pages of the shared prefix


@pytest.mark.parametrize("quantization, kv_cache_dtype", [(None, "auto"), ("fp8", "auto"),
                                                          (None, "fp8")])
def test_nothing_compiles_while_serving(tiny_llama_dir, quantization, kv_cache_dtype):
    import jax

    engine = Engine(tiny_llama_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64,
                    quantization=quantization, kv_cache_dtype=kv_cache_dtype, show_progress=False)
    assert engine.quantization == quantization
    assert (engine.kv_cache_dtype.name == "float8_e4m3fn") == (kv_cache_dtype == "fp8")
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(6)
        batch = [{"prompt_token_ids": rng.integers(3, 256, size=n).tolist()}
                 for n in (1, 2, 5, 17, 40, 63, 100, 150, 3, 9)]  # chunked, mixed, decode
        params = [SamplingParams(temperature=t, max_tokens=m, ignore_eos=True, logprobs=lp, seed=1,
                                 repetition_penalty=r, logit_bias=bias, prompt_logprobs=plp)
                  for t, m, lp, r, bias, plp in zip(
                      [0, 1, 0.5, 0, 1, 0, 0.7, 0, 1, 0], [1, 30, 5, 12, 7, 2, 9, 4, 20, 3],
                      [None, 2, None, 0, None, None, 5, None, None, 1],
                      [1, 1, 1.3, 1, 1, 0.9, 1, 1, 1.1, 1],
                      [None, None, None, None, {5: 2.0}, None, None, {9: -100.0, 10: 1.0}, None, None],
                      [None, 1, None, 0, None, None, 5, 20, None, 2])]
        outputs = engine.generate(batch, params, use_tqdm=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 30, 5, 12, 7, 2, 9, 4, 20, 3]
    assert [len(o.prompt_logprobs or ()) for o in outputs] == [0, 2, 0, 17, 0, 0, 100, 150, 0, 9]
    assert compiles == []


def test_nothing_compiles_while_serving_tensor_parallel(tensor_parallel_results):
    """The same at tensor_parallel_size=2, in a process with 8 host devices
    (``tensor_parallel_run.compiles_while_serving``)."""
    assert tensor_parallel_results["compiles"] == []


def test_warm_up_runs_every_bucket_and_changes_no_state(tiny_llama_dir):
    """The GPU start-up's first run of each executable (compile_all skips it on CPU; here it
    runs explicitly), on padding: it writes no KV and changes no penalty count or slot table."""
    import jax

    from duetjax.core.step_inputs import plan_buckets

    engine = Engine(tiny_llama_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
                    compile_on_start=False, show_progress=False)
    runner = engine.runner
    state = runner.state
    state.kv_pool = state.kv_pool + 1.5  # not a zero pool: a stray write would show
    state.token_counts = state.token_counts + 2
    state.slot_tables = state.slot_tables.replace(prompt=state.slot_tables.prompt + 1)
    runner._compile_samplers(4)
    runner._compile_fill_slot()
    runner._compile_prompt_logprobs(32)
    pool, counts = np.asarray(state.kv_pool), np.asarray(state.token_counts)
    tables = [np.asarray(a) for a in jax.tree_util.tree_leaves(state.slot_tables)]
    buckets = plan_buckets(engine.config, (1, 2))
    assert any(b.multi_step for b in buckets) and any(not b.decode for b in buckets)
    runner.warm_up(buckets)
    assert set(buckets) <= set(runner._executables)
    np.testing.assert_array_equal(np.asarray(state.kv_pool), pool)
    np.testing.assert_array_equal(np.asarray(state.token_counts), counts)
    for want, got in zip(tables, jax.tree_util.tree_leaves(state.slot_tables)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_pallas_kernels_in_interpret_mode_give_the_same_tokens(tiny_llama_dir, engine):
    """The engine through the Pallas kernels (interpreted on CPU) matches the XLA path."""
    batch = prompts(3, seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    pallas = Engine(tiny_llama_dir, dtype="float32", attention_impl="interpret", max_num_seqs=4,
                    max_num_batched_tokens=64, compile_on_start=False, show_progress=False)
    assert token_ids(pallas.generate(batch, params, use_tqdm=False)) == \
        token_ids(engine.generate(batch, params, use_tqdm=False))


def greedy_with_penalties(loaded, prompts: list[list[int]], outputs: list[list[int]],
                          params: list[SamplingParams]) -> list[list[int]]:
    """What greedy decoding with each request's penalties and logit biases must pick at each
    step, given its outputs, from full forward passes (all in one ragged batch)."""
    from collections import Counter

    from models import compute_logits

    prefixes = [prompt + out[:i] for prompt, out in zip(prompts, outputs) for i in range(len(out))]
    rows = iter(compute_logits(loaded, prefixes))
    picks = []
    for prompt, out, p in zip(prompts, outputs, params):
        picks.append([])
        for i in range(len(out)):
            logits = next(rows)[-1].copy()
            for token, value in (p.logit_bias or {}).items():
                logits[token] += value
            seen = sorted(set(prompt + out[:i]))
            r = p.repetition_penalty
            logits[seen] = np.where(logits[seen] > 0, logits[seen] / r, logits[seen] * r)
            for token, n in Counter(out[:i]).items():
                logits[token] -= p.presence_penalty + p.frequency_penalty * n
            picks[-1].append(int(np.argmax(logits)))
    return picks


def test_presence_and_frequency_penalties_follow_their_definition(engine, tiny_llama_dir):
    from models import load_model

    loaded = load_model(tiny_llama_dir, dtype="float32")
    batch = prompts(3, seed=9)
    plain_params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = token_ids(engine.generate(batch, plain_params, use_tqdm=False))
    assert all(len(set(out)) < len(out) for out in plain[:2])  # unpenalized, tokens repeat
    settings = [(2.0, 0.0), (0.0, 2.0), (0.0, 0.0)]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, presence_penalty=p,
                             frequency_penalty=f) for p, f in settings]
    penalized = token_ids(engine.generate(batch, params, use_tqdm=False))
    assert penalized[2] == plain[2]  # the unpenalized neighbour is untouched
    assert penalized[0] != plain[0] and penalized[1] != plain[1]
    assert penalized == greedy_with_penalties(loaded, [p["prompt_token_ids"] for p in batch],
                                              penalized, params)


def test_penalty_slots_are_reused_without_leaking_counts(tiny_llama_dir):
    """Two slots, five penalized requests: later requests get recycled slots, zeroed."""
    small = Engine(tiny_llama_dir, dtype="float32", max_num_seqs=2, max_num_batched_tokens=64,
                   show_progress=False)
    batch = prompts(5, seed=10)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, frequency_penalty=2.0)
    together = token_ids(small.generate(batch, params, use_tqdm=False))
    alone = [token_ids(small.generate(p, params, use_tqdm=False))[0] for p in batch]
    assert together == alone
    assert len(small.scheduler.free_penalty_slots) == 2


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    from tests.duetjax.server.helpers import write_tiny_chat_model

    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_generate_returns_what_streaming_ends_with(chat_model_dir, decode_steps):
    """``generate`` builds outputs only for finished requests; ``step`` builds one per request
    and token batch (streaming). Both end with the same outputs on a mixed run: stop strings,
    stop token ids with min_tokens, logprobs, penalties, seeded sampling, token limits."""
    engine = Engine(chat_model_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64,
                    decode_steps=decode_steps, show_progress=False)
    prompts = [f"{text} {i}" for i, text in enumerate(["Hello there", "abc", "The quick brown fox",
                                                       "a" * 30, "Once upon a time"] * 2)]
    probe = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                            use_tqdm=False)
    params = []
    for i, out in enumerate(o.outputs[0] for o in probe):  # stop conditions that do occur
        params.append([
            SamplingParams(temperature=0.0, max_tokens=30, stop=[out.text[9:11]], ignore_eos=True),
            SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[out.token_ids[1],
                                                                            out.token_ids[6]],
                           min_tokens=3),
            SamplingParams(temperature=0.0, max_tokens=25, logprobs=2, stop=[out.text[12:14]]),
            SamplingParams(temperature=0.8, max_tokens=17, seed=i, frequency_penalty=1.0),
            SamplingParams(temperature=1.0, max_tokens=1 + i, seed=i, ignore_eos=True),
        ][i % 5])
    generated = engine.generate(prompts, params, use_tqdm=False)
    seen = {}
    ids = [engine.add_request(prompt, p) for prompt, p in zip(prompts, params)]
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.setdefault(output.request_id, []).append(output)
    for outputs in seen.values():  # snapshots, each with more tokens; only the last finished
        sizes = [len(o.outputs[0].token_ids) for o in outputs]
        assert sizes == sorted(set(sizes)) and [o.finished for o in outputs][-1:] == [True]
        assert not any(o.finished for o in outputs[:-1])
    assert sum(map(len, seen.values())) > 2 * len(ids)
    streamed = [seen[request_id][-1] for request_id in ids]
    reasons = set()
    for a, b in zip(generated, streamed):
        assert a.finished and b.finished and a.prompt_token_ids == b.prompt_token_ids
        x, y = a.outputs[0], b.outputs[0]
        assert (x.text, x.token_ids, x.finish_reason, x.stop_reason) == \
            (y.text, y.token_ids, y.finish_reason, y.stop_reason)
        assert (x.logprobs is None) == (y.logprobs is None)
        for p, q in zip(x.logprobs or [], y.logprobs or []):
            assert p.keys() == q.keys()
            np.testing.assert_allclose(list(p.values()), list(q.values()), rtol=1e-5, atol=1e-6)
        for m in (a.metrics, b.metrics):
            assert len(m.token_times) == len(x.token_ids) and m.first_token_time == m.token_times[0]
        reasons.add((x.finish_reason, type(x.stop_reason).__name__))
    assert reasons >= {("stop", "str"), ("stop", "int"), ("length", "NoneType")}


REPETITION = [1.3, 1.0, 0.8, 2.0]


def repetition_params(max_tokens=24):
    return [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                           repetition_penalty=r) for r in REPETITION]


def test_repetition_penalty_matches_transformers_generate(engine, tiny_llama_hf_dir, tmp_path):
    """Greedy tokens with ``repetition_penalty`` are transformers' ``generate(...,
    repetition_penalty=...)`` tokens, with penalized and unpenalized requests in one batch
    (chunked prefill, then decode). The engine fixture serves ``tiny_llama_dir``: the same
    weights as ``tiny_llama_hf_dir``, which transformers loads."""
    from tests.oracle import OracleUnavailable, run_generate

    batch = prompts(4, seed=30)
    try:
        expected = run_generate(tiny_llama_hf_dir, [
            (p["prompt_token_ids"], {"max_new_tokens": 24, "repetition_penalty": r})
            for p, r in zip(batch, REPETITION)], tmp_path)
    except OracleUnavailable as err:
        pytest.fail(str(err), pytrace=False)
    assert min(e["min_gap"] for e in expected) > 1e-4  # no near-tie float32 rounding could flip
    got = token_ids(engine.generate(batch, repetition_params(), use_tqdm=False))
    assert got == [e["tokens"] for e in expected]
    plain = token_ids(engine.generate(batch, GREEDY, use_tqdm=False))
    assert [g[:12] != p for g, p in zip(got, plain)] == [True, False, True, True]


def test_repetition_penalty_and_logit_bias_survive_preemption(engine, small):
    batch = prompts(6, seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=r,
                             logit_bias=bias)
              for r, bias in [(1.5, None), (1.0, {40: 3.0}), (0.7, None), (1.0, None),
                              (2.0, {7: -100.0, 8: 0.5}), (1.2, None)]]
    expected = token_ids(engine.generate(batch, params, use_tqdm=False))
    assert expected != token_ids(engine.generate(batch, GREEDY, use_tqdm=False))
    before = small.stats().num_preemptions
    assert token_ids(small.generate(batch, params, use_tqdm=False)) == expected
    assert small.stats().num_preemptions > before
    assert len(small.scheduler.free_penalty_slots) == small.config.max_num_seqs


def test_repetition_penalty_sees_prompt_tokens_served_by_the_prefix_cache(engine, tiny_llama_dir):
    from models import load_model

    rng = np.random.default_rng(33)
    shared = rng.integers(3, 256, size=40).tolist()
    engine.generate({"prompt_token_ids": shared + [5, 6]}, GREEDY, use_tqdm=False)
    prompt = shared + [7, 8, 9]
    hits = engine.stats().prefix_cache_hit_tokens
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=3.0)
    out = token_ids(engine.generate({"prompt_token_ids": prompt}, params, use_tqdm=False))[0]
    assert engine.stats().prefix_cache_hit_tokens - hits == 32  # two pages were never computed
    loaded = load_model(tiny_llama_dir, dtype="float32")
    # (the cached part of the prompt matters: penalizing only the computed tail picks otherwise)
    want, tail_only = greedy_with_penalties(loaded, [prompt, [7, 8, 9]], [out, out], [params] * 2)
    assert out == want and out != tail_only


def test_logit_bias_forces_and_bans_tokens(engine):
    batch = prompts(4, seed=31)
    plain = token_ids(engine.generate(batch, GREEDY, use_tqdm=False))
    banned = plain[1][0]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logit_bias={77: 100}),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                             logit_bias={banned: -100}),
              GREEDY,
              SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=3,
                             logit_bias={200: 100})]
    got = token_ids(engine.generate(batch, params, use_tqdm=False))
    assert got[0] == [77] * 12 and got[3] == [200] * 12  # +100 wins (logits here are within +-3)
    assert banned not in got[1] and got[1] != plain[1]
    assert got[2] == plain[2]  # the unbiased neighbour is untouched


def test_logit_bias_outside_the_vocabulary_is_a_clear_error(engine):
    with pytest.raises(ValueError, match=r"logit_bias token id 256 is outside the vocabulary \[0, 256\)"):
        engine.add_request(prompts(1)[0], SamplingParams(logit_bias={3: 1.0, 256: -1.0}))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt_token_ids, params, message", [
    ([1, 2], SamplingParams(stop_token_ids=[256]),
     r"stop_token_ids token id 256 is outside the vocabulary \[0, 256\)"),
    ([1, -1], GREEDY, r"prompt token id -1 is outside the vocabulary"),
    ([1, 2**64], GREEDY, r"prompt token id 18446744073709551616 is outside the vocabulary"),
    ([1, 2.5], GREEDY, "prompt_token_ids must be a list of integers"),
])
def test_token_ids_are_checked_against_the_vocabulary(engine, prompt_token_ids, params, message):
    with pytest.raises((ValueError, TypeError), match=message):
        engine.add_request({"prompt_token_ids": prompt_token_ids}, params)
    assert not engine.has_unfinished_requests()


class RaisingDetokenizer:
    """Stands in for one request's detokenizer: its second token raises."""

    def __init__(self):
        self.calls = 0

    def add(self, token_id):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("the detokenizer broke")
        return "x"


def break_detokenizers(engine, monkeypatch, marker: str) -> None:
    """From now on, requests whose prompt text holds ``marker`` get a ``RaisingDetokenizer``
    (set as the engine adds them, on whatever thread adds them)."""
    add_request = engine.add_request

    def add_and_break(prompt, params=None, request_id=None):
        request_id = add_request(prompt, params, request_id)
        text = prompt if isinstance(prompt, str) else prompt.get("prompt") or ""
        if marker in text:
            engine.output_processor.requests[request_id].detokenizer = RaisingDetokenizer()
        return request_id

    monkeypatch.setattr(engine, "add_request", add_and_break)


def break_next_input_token(request) -> None:
    """The token that ``request``'s next step reads first becomes one no int32 holds: that
    step's inputs cannot be built."""
    index = request.num_computed_tokens - len(request.prompt_token_ids)  # (< 0: in the prompt)
    tokens = request.prompt_token_ids if index < 0 else request.output_token_ids
    tokens[index] = 2**40


FAULTS = {
    # fault: (the faulty request's params, how it breaks after it was added)
    "detokenizer": (GREEDY, lambda r: setattr(r, "detokenizer", RaisingDetokenizer())),
    "grammar": (SamplingParams(temperature=0.0, max_tokens=12, structured_outputs={"regex": "a+"}),
                lambda r: setattr(r, "matcher", "not a grammar")),
    "step inputs": (SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, top_k=5),
                    lambda r: object.__setattr__(r.params, "top_k", 2**40)),
    "step tokens": (GREEDY, break_next_input_token),
    "slot tables": (SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                   logit_bias={3: 1.0}),
                    lambda r: object.__setattr__(r.params, "logit_bias", {2**40: 1.0})),
}


@pytest.fixture(scope="module")
def chat_engine(chat_model_dir):
    return Engine(chat_model_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64,
                  show_progress=False)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_request_that_fails_fails_alone(chat_engine, fault):
    """An exception in the host work for one request (its detokenizer, its grammar, its step
    inputs, its slot tables) ends that request with finish reason "error"; the requests
    batched with it get the tokens they get without it, and the engine goes on serving."""
    engine = chat_engine
    texts = [f"{text} {i}" for i, text in enumerate(["Hello there", "abc", "The quick brown fox",
                                                     "a" * 30, "Once upon a time"])]
    expected = engine.generate(texts, GREEDY, use_tqdm=False)
    params, breaks = FAULTS[fault]
    ids = [engine.add_request(text, params if i == 2 else GREEDY) for i, text in enumerate(texts)]
    breaks(engine.output_processor.requests[ids[2]])
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    failed = finished[ids[2]]
    assert failed.outputs[0].finish_reason == "error" and failed.error
    for i, request_id in enumerate(ids):
        if i != 2:
            assert finished[request_id].error is None
            assert finished[request_id].outputs[0].token_ids == expected[i].outputs[0].token_ids
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_pages and not stats.num_constrained
    again = engine.generate(texts[0], GREEDY, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == expected[0].outputs[0].token_ids


def test_public_names_load_from_the_package():
    import duetjax

    for name in duetjax.__all__:
        assert getattr(duetjax, name).__name__ == name
    assert {"Engine", "AsyncEngine", "SamplingParams", "EngineConfig",
            "RequestOutput"} <= set(duetjax.__all__)
