"""duetjax/sampler.py: the sort-free truncation keeps exactly what a sort keeps; penalties."""
import jax
import jax.numpy as jnp
import numpy as np

from duetjax.sampler import (PenaltyArrays, SamplingArrays, apply_penalties, count_tokens, sample,
                            sample_basic, truncated_logits, with_logprobs)


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
                      frequency=jnp.asarray([0.0, 0.25, 1.0]), reset=jnp.asarray([False, False, True]),
                      count=jnp.asarray([False, True, True]))
    penalized, counts = apply_penalties(logits, counts, p)
    np.testing.assert_array_equal(penalized[0], logits[0])
    np.testing.assert_allclose(penalized[1], np.asarray(logits[1]) - np.eye(8)[5] * (0.5 + 0.25 * 3))
    np.testing.assert_array_equal(penalized[2], logits[2])  # slot 3 was reset before use
    counts = count_tokens(counts, jnp.asarray([4, 5, 1]), p)
    assert counts[0].sum() == 0 and counts[2, 5] == 4 and counts[3].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
