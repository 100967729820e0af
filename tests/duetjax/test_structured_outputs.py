"""Structured outputs: the token mask on the device, the grammar state on the host, and the
engine's constrained requests beside unconstrained ones (tiny byte-level chat model on CPU)."""
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from duetjax import Engine, SamplingParams, StructuredOutputsParams
from duetjax.core.sampler import apply_token_mask
from duetjax.structured_outputs import all_tokens_mask, fill_token_mask, token_mask_width

from .test_engine import token_ids

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}
PROMPTS = ["Answer in JSON", "abc", "The quick brown fox", "a" * 30, "Once upon a time"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    from tests.duetjax.server.helpers import write_tiny_chat_model

    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def engine(chat_dir):
    return Engine(chat_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64,
                  show_progress=False)


# ---- parameters -------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({}, "exactly one of"),
    ({"regex": "a+", "choice": ["a"]}, "got regex, choice"),
    ({"choice": "yes"}, "list of strings"),
    ({"choice": []}, "at least one"),
    ({"json": "{not json"}, "not a valid JSON schema"),
    ({"json": [1, 2]}, "must be a JSON schema"),
])
def test_structured_outputs_params_say_what_is_wrong(fields, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**fields)


def test_sampling_params_take_a_dict_and_need_the_full_sampler():
    params = SamplingParams(temperature=0, structured_outputs={"json": json.dumps(SCHEMA)})
    assert params.structured_outputs == StructuredOutputsParams(json=SCHEMA)
    assert params.needs_full_sampler
    with pytest.raises(ValueError, match="StructuredOutputsParams or a dict"):
        SamplingParams(structured_outputs="json")


# ---- the mask on the device -------------------------------------------------------------------

def test_token_mask_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    rows, vocab = 5, 1000  # (not a multiple of 32: the last word is partly past the vocabulary)
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    mask = rng.integers(-2**31, 2**31, size=(rows, token_mask_width(vocab)), dtype=np.int64).astype(np.int32)
    mask[2] = -1  # every token allowed: the row comes back bit for bit
    bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    want = np.where(bits, logits, -np.inf)
    got = np.asarray(apply_token_mask(jnp.asarray(logits), jnp.asarray(mask)))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[2], logits[2])
    assert all_tokens_mask(3, vocab).shape == (3, 32) and (all_tokens_mask(3, vocab) == -1).all()


# ---- the engine -------------------------------------------------------------------------------

def best_allowed_tokens(engine, prompt_ids, output_ids, params):
    """Reference for a greedy constrained output: at each position, the model's best token
    among those the grammar allows after the output so far, found by an unconstrained greedy
    step that biases every allowed token by +100 (the logits' spread is far smaller)."""
    import llguidance

    matcher = engine.admission.grammar_compiler().matcher(params)
    requests, biases = [], []
    for i, token in enumerate(output_ids):
        mask = all_tokens_mask(1, engine.vocab_size)
        fill_token_mask(matcher, mask, 0)
        allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")
                                 [:engine.vocab_size])
        assert len(allowed) <= 300, "too many allowed tokens for a logit_bias reference"
        requests.append({"prompt_token_ids": prompt_ids + output_ids[:i]})
        biases.append(SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                                     logit_bias={int(t): 100.0 for t in allowed}))
        assert matcher.consume_token(token)
    assert isinstance(matcher, llguidance.LLMatcher)
    return [o.outputs[0].token_ids[0] for o in engine.generate(requests, biases, use_tqdm=False)]


@pytest.mark.parametrize("constraint", [
    {"json": SCHEMA},
    {"regex": r"[a-f]{3}-\d{2,4}"},
    {"choice": ["red", "green", "blue", "ultraviolet"]},
    {"grammar": 'start: "(" item ("," item)* ")"\nitem: /[0-9]/ | "x"'},
])
def test_greedy_constrained_output_takes_the_best_allowed_token_each_step(engine, constraint):
    structured = StructuredOutputsParams(**constraint)
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=structured)
    prompt = engine.tokenizer.encode("Pick one:")
    [out] = engine.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    ids = out.outputs[0].token_ids
    assert ids == best_allowed_tokens(engine, prompt, ids, structured)
    if out.outputs[0].finish_reason == "stop":  # the grammar completed: the text matches it
        text = out.outputs[0].text
        if "json" in constraint:
            value = json.loads(text)
            assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 99
        elif "regex" in constraint:
            assert re.fullmatch(constraint["regex"], text)
        elif "choice" in constraint:
            assert text in constraint["choice"]
    else:
        assert out.outputs[0].finish_reason == "length" and len(ids) == 40


def test_a_grammar_that_completes_ends_the_request(engine):
    choices = ["yes", "no"]
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=1.0, seed=5, max_tokens=20,
                                                      structured_outputs={"choice": choices}),
                              use_tqdm=False)
    for out in outputs:
        assert out.outputs[0].text in choices and out.outputs[0].finish_reason == "stop"
        assert out.outputs[0].stop_reason is None


def test_constrained_and_free_requests_share_batches_without_changing_each_other(engine):
    free = [SamplingParams(temperature=0, max_tokens=25, ignore_eos=True),
            SamplingParams(temperature=0.8, seed=3, max_tokens=30, ignore_eos=True)]
    constrained = [SamplingParams(temperature=0, max_tokens=30, structured_outputs={"json": SCHEMA}),
                   SamplingParams(temperature=0.9, seed=7, top_k=20, max_tokens=30,
                                  structured_outputs={"regex": "[a-z ]{5,20}\\."})]
    alone = [token_ids(engine.generate(PROMPTS, p, use_tqdm=False)) for p in free + constrained]
    params = [p for p in free + constrained for _ in PROMPTS]
    together = token_ids(engine.generate(PROMPTS * 4, params, use_tqdm=False))
    assert [together[i:i + len(PROMPTS)] for i in range(0, len(together), len(PROMPTS))] == alone
    assert engine.stats().num_constrained == 0
    assert engine.stats().num_free_pages == engine.stats().num_pages


def test_constrained_requests_survive_preemption(engine, chat_dir):
    params = SamplingParams(temperature=0, max_tokens=30, structured_outputs={"json": SCHEMA})
    want = token_ids(engine.generate(PROMPTS, params, use_tqdm=False))
    small = Engine(chat_dir, dtype="float32", kv_cache_tokens=64, max_model_len=64,
                   max_num_batched_tokens=16, max_num_seqs=4, show_progress=False)
    assert token_ids(small.generate(PROMPTS, params, use_tqdm=False)) == want
    assert small.stats().num_preemptions > 0


def test_nothing_compiles_for_constrained_requests(engine):
    import jax

    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        engine.generate(PROMPTS * 2, [SamplingParams(temperature=t, max_tokens=12, logprobs=lp,
                                                     structured_outputs={"regex": "[0-9]+"})
                                      for t in (0, 1) for lp in (None, 2, None, None, 1)],
                        use_tqdm=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


@pytest.mark.parametrize("constraint, message", [
    ({"regex": "(a"}, "unclosed group"),
    ({"json": {"type": "bogus"}}, "bogus"),
    ({"grammar": "start: missing_rule"}, "missing_rule"),
])
def test_a_constraint_that_does_not_compile_is_a_clear_error(engine, constraint, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request("hi", SamplingParams(structured_outputs=constraint))
    assert not engine.has_unfinished_requests()


def test_structured_outputs_need_a_tokenizer(tiny_llama_dir):
    engine = Engine(tiny_llama_dir, dtype="float32", max_num_seqs=2, max_num_batched_tokens=16,
                    compile_on_start=False, show_progress=False)
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.add_request({"prompt_token_ids": [5, 6]},
                           SamplingParams(structured_outputs={"choice": ["a"]}))


def test_a_constrained_request_gets_a_token_every_step(engine):
    # The step in flight is read before the next is scheduled, so the mask is ready in time
    # (otherwise the request would sit out every other step).
    request_id = engine.add_request("Count:", SamplingParams(
        temperature=0, max_tokens=20, structured_outputs={"regex": "[a-z]{30}"}))
    calls = 0
    while engine.has_unfinished_requests():
        engine.step()
        calls += 1
    assert request_id not in engine.output_processor.requests and calls <= 20 + 2


def test_k_step_decode_drops_to_one_step_while_a_constrained_request_runs(engine, chat_dir):
    # (a k-step executable samples inside its device loop, where no mask can reach)
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)] * 3 + [
        SamplingParams(temperature=0, max_tokens=20, structured_outputs={"regex": "[a-z]{3,}"})]
    want = token_ids(engine.generate(PROMPTS[:4], params, use_tqdm=False))
    multi = Engine(chat_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64,
                   decode_steps=4, show_progress=False)
    assert token_ids(multi.generate(PROMPTS[:4], params, use_tqdm=False)) == want
