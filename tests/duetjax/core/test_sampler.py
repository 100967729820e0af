"""duetjax/core/sampler.py: the sort-free truncation keeps exactly what a sort keeps; penalties and
logit biases."""
import jax
import jax.numpy as jnp
import numpy as np

from duetjax.core.sampler import (PenaltyArrays, SamplingArrays, SlotTables, apply_penalties,
                            count_tokens, fill_slot, sample, sample_basic, sample_full, slot_row,
                            truncated_logits, with_logprobs)
from duetjax.sampling_params import MAX_LOGIT_BIAS, SamplingParams


def sorted_reference(logits: np.ndarray, temperature, top_k, top_p, min_p) -> np.ndarray:
    """The definition, row by row on a descending sort (float64): rank < k, then mass strictly
    above < p on the top-k distribution, then value >= max + log(min_p)."""
    out = np.full(logits.shape, -np.inf)
    for r, row in enumerate(logits.astype(np.float64)):
        scaled = row / (temperature[r] if temperature[r] > 0 else 1.0)
        order = np.argsort(-scaled, kind="stable")
        k = top_k[r] if 0 < top_k[r] < len(row) else len(row)
        kept = order[:k]
        probs = np.exp(scaled[kept] - scaled[kept].max())
        probs /= probs.sum()
        above = np.cumsum(probs) - probs
        if top_p[r] < 1:
            kept = kept[above < top_p[r]]
        if min_p[r] > 0:
            kept = kept[scaled[kept] >= scaled.max() + np.log(min_p[r])]
        out[r, kept] = scaled[kept]
    return out


def arrays(rows, **fields) -> SamplingArrays:
    base = dict(temperature=np.ones(rows, np.float32), top_k=np.zeros(rows, np.int32),
                top_p=np.ones(rows, np.float32), min_p=np.zeros(rows, np.float32),
                seeds=np.arange(rows, dtype=np.uint32), counters=np.zeros(rows, np.int32),
                want_logprobs=np.zeros(rows, bool))
    base.update({k: np.asarray(v, base[k].dtype) for k, v in fields.items()})
    return SamplingArrays(**{k: jnp.asarray(v) for k, v in base.items()})


def test_truncation_keeps_what_a_sort_keeps():
    vocab = 3000
    settings = [  # (temperature, top_k, top_p, min_p)
        (1.0, 0, 1.0, 0.0), (0.7, 1, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.3, 50, 0.9, 0.0),
        (1.0, 0, 0.5, 0.0), (1.0, 0, 0.05, 0.0), (0.8, 0, 0.95, 0.1), (1.0, vocab - 1, 1.0, 0.0),
        (1.0, vocab, 0.3, 0.0), (2.0, 200, 0.99, 0.02), (1.0, 0, 1.0, 0.5), (0.5, 7, 0.6, 0.3)]
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((len(settings), vocab)) * 3).astype(np.float32)
    logits[2, :10] += 20  # a peaked row
    t, k, p, m = (np.array(c) for c in zip(*settings))
    got = np.asarray(jax.jit(truncated_logits)(jnp.asarray(logits), arrays(len(settings), temperature=t,
                                                                           top_k=k, top_p=p, min_p=m)))
    want = sorted_reference(logits, t, k, p, m)
    for r in range(len(settings)):
        np.testing.assert_array_equal(np.isfinite(got[r]), np.isfinite(want[r]), err_msg=f"row {r}: {settings[r]}")
        kept = np.isfinite(want[r])
        np.testing.assert_allclose(got[r][kept], want[r][kept], rtol=1e-6)
    assert np.isfinite(got[1]).sum() == 1 and np.isfinite(got[2]).sum() == 5


def test_negative_and_equal_logits():
    # Keys must order negative values, zero and ties correctly: a flat row keeps every tie.
    logits = jnp.asarray([[-5.0, -1.0, 0.0, -3.0, -0.5], [2.0, 2.0, 2.0, 2.0, 1.0]], jnp.float32)
    got = np.asarray(truncated_logits(logits, arrays(2, top_k=[2, 2])))
    assert np.isfinite(got[0]).tolist() == [False, False, True, False, True]
    assert np.isfinite(got[1]).tolist() == [True, True, True, True, False]  # ties at the k-th all kept


def test_sample_greedy_rows_and_logprobs():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((3, 100)).astype(np.float32))
    s = arrays(3, temperature=[0.0, 1.0, 0.0], top_k=[0, 1, 0])
    tokens = jax.jit(sample)(logits, s)
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), -1))  # top_k=1 is greedy
    out = jax.jit(with_logprobs)(logits, tokens)
    logprobs = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(out.logprobs, logprobs[np.arange(3), tokens], rtol=1e-6)
    np.testing.assert_allclose(out.top_logprobs, -np.sort(-logprobs)[:, :20], rtol=1e-6)


def test_full_sampler_agrees_with_basic_on_rows_without_truncation():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((4, 500)).astype(np.float32) * 2)
    s = arrays(4, temperature=[0.0, 1.0, 0.7, 1.3], min_p=[0.0, 0.0, 0.05, 0.0])
    np.testing.assert_array_equal(sample(logits, s), sample_basic(logits, s).token_ids)


def test_penalties_touch_only_penalized_rows():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((3, 8)).astype(np.float32))
    counts = jnp.zeros((4, 8), jnp.int32).at[2, 5].set(3).at[3, 1].set(9)
    p = PenaltyArrays(slots=jnp.asarray([0, 2, 3]), presence=jnp.asarray([0.0, 0.5, 0.0]),
                      frequency=jnp.asarray([0.0, 0.25, 1.0]), repetition=jnp.ones(3),
                      biased=jnp.zeros(3, bool), reset=jnp.asarray([False, False, True]),
                      count=jnp.asarray([False, True, True]))
    penalized, counts = apply_penalties(logits, counts, SlotTables.zeros(4, 8), p)
    np.testing.assert_array_equal(penalized[0], logits[0])
    np.testing.assert_allclose(penalized[1], np.asarray(logits[1]) - np.eye(8)[5] * (0.5 + 0.25 * 3))
    np.testing.assert_array_equal(penalized[2], logits[2])  # slot 3 was reset before use
    counts = count_tokens(counts, jnp.asarray([4, 5, 1]), p)
    assert counts[0].sum() == 0 and counts[2, 5] == 4 and counts[3].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]


def penalized_reference(logits, counts, prompt, bias, presence, frequency, repetition):
    """The definitions, row by row in float64 on plain numpy: ``bias`` ({token: value}) added,
    then every token of the prompt or already generated (count > 0) divided by the repetition
    penalty where positive and multiplied where negative, then presence and frequency
    penalties on the generated tokens only."""
    out = logits.astype(np.float64)
    for token, value in bias.items():
        out[token] += value
    if repetition != 1:
        repeated = np.zeros(len(out), bool)
        repeated[list(prompt)] = True
        repeated |= counts > 0
        out = np.where(repeated, np.where(out > 0, out / repetition, out * repetition), out)
    return out - presence * (counts > 0) - frequency * counts


def test_penalties_and_logit_bias_match_their_definition_and_spare_other_rows():
    vocab, slots = 300, 6
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((7, vocab)) * 4).astype(np.float32)  # both signs, no zeros
    counts = rng.integers(0, 3, (slots, vocab)) * (rng.random((slots, vocab)) < 0.1)
    full_bias = {int(t): float(b) for t, b in zip(rng.choice(vocab, MAX_LOGIT_BIAS - 1, replace=False),
                                                  rng.uniform(-100, 100, MAX_LOGIT_BIAS - 1))}
    full_bias[vocab - 1] = 100.0  # the last token id, and the entry limit
    rows = [  # (slot or None, prompt, params)
        (None, [], SamplingParams()),
        (1, [5, 9, 9, 200], SamplingParams(repetition_penalty=1.3)),
        (2, [], SamplingParams(logit_bias={3: 100.0, 7: -100.0, 250: 0.5})),
        (None, [], SamplingParams(temperature=0.7)),
        (3, [0, 1, 2, 3], SamplingParams(repetition_penalty=0.7, presence_penalty=0.5,
                                         frequency_penalty=-0.3, logit_bias={2: -2.0})),
        (4, [], SamplingParams(frequency_penalty=1.0)),
        (5, list(range(0, vocab, 3)), SamplingParams(repetition_penalty=2.0, logit_bias=full_bias)),
    ]
    # Slot tables as requests fill them, over a stale row (slot 0: nobody uses it here)
    tables = SlotTables.zeros(slots, vocab)
    tables = fill_slot(tables, jnp.asarray([0]), slot_row(
        SamplingParams(repetition_penalty=3.0, logit_bias={1: 50.0}), list(range(vocab)), vocab))
    for slot, prompt, params in rows:
        if slot is not None and params.fills_slot:
            tables = fill_slot(tables, jnp.asarray([slot]), slot_row(params, prompt, vocab))
    p = PenaltyArrays(
        slots=jnp.asarray([slot or 0 for slot, _, _ in rows], jnp.int32),
        presence=jnp.asarray([r[2].presence_penalty for r in rows], jnp.float32),
        frequency=jnp.asarray([r[2].frequency_penalty for r in rows], jnp.float32),
        repetition=jnp.asarray([r[2].repetition_penalty for r in rows], jnp.float32),
        biased=jnp.asarray([r[2].logit_bias is not None for r in rows]),
        reset=jnp.zeros(len(rows), bool), count=jnp.zeros(len(rows), bool))
    got, _ = jax.jit(apply_penalties)(jnp.asarray(logits), jnp.asarray(counts, jnp.int32), tables, p)
    got = np.asarray(got)
    for r, (slot, prompt, params) in enumerate(rows):
        if slot is None:  # no penalty slot: the logits untouched, bit for bit
            np.testing.assert_array_equal(got[r], logits[r], err_msg=f"row {r}")
            continue
        want = penalized_reference(logits[r], counts[slot], prompt, params.logit_bias or {},
                                   params.presence_penalty, params.frequency_penalty,
                                   params.repetition_penalty)
        np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-5, err_msg=f"row {r}: {params}")
    assert not np.array_equal(got[1], logits[1]) and not np.array_equal(got[6], logits[6])


def test_logit_bias_forces_and_bans_tokens_in_the_full_sampler():
    vocab = 50
    rng = np.random.default_rng(12)
    logits = jnp.asarray((rng.standard_normal((3, vocab)) * 3).astype(np.float32))
    top = np.argmax(np.asarray(logits), axis=-1)
    tables = SlotTables.zeros(2, vocab)
    for slot, bias in ((0, {17: 100.0}), (1, {int(top[1]): -100.0})):
        tables = fill_slot(tables, jnp.asarray([slot]), slot_row(SamplingParams(logit_bias=bias), [], vocab))
    s = arrays(3, temperature=[0.0, 0.0, 0.9])
    p = PenaltyArrays(slots=jnp.asarray([0, 1, 0]), presence=jnp.zeros(3), frequency=jnp.zeros(3),
                      repetition=jnp.ones(3), biased=jnp.asarray([True, True, False]),
                      reset=jnp.zeros(3, bool), count=jnp.asarray([True, True, False]))
    sampled, counts = jax.jit(sample_full)(logits, jnp.zeros((2, vocab), jnp.int32), tables, s, p)
    tokens = np.asarray(sampled.token_ids)
    assert tokens[0] == 17
    assert tokens[1] == np.argsort(-np.asarray(logits[1]))[1]  # the runner-up
    np.testing.assert_array_equal(tokens[2], sample(logits, s)[2])  # an unbiased row as before
    assert np.asarray(counts)[0, 17] == 1 and np.asarray(counts).sum() == 2


def test_a_slot_out_of_range_fills_nothing():
    tables = SlotTables.zeros(2, 10)
    row = slot_row(SamplingParams(repetition_penalty=1.5, logit_bias={4: 1.0}), [1, 2], 10)
    assert row.prompt[0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0] and row.bias_ids[0, :2].tolist() == [4, 10]
    same = fill_slot(tables, jnp.asarray([2]), row)
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(tables)):
        np.testing.assert_array_equal(a, b)
