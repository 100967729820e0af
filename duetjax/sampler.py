"""Token sampling on the device, inside the step executable.

Randomness is per request: the key is ``fold_in(key(seed), n)`` where n counts the request's
generated tokens, so a seeded request gives the same tokens whatever else is in the batch, and
after a preemption.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from .sampling_params import MAX_LOGPROBS


@flax.struct.dataclass
class SamplingArrays:
    """Per-sequence sampling settings of one step, padded to the step's sequence bucket."""

    temperature: jax.Array
    """float32[S]; 0 = greedy."""
    top_k: jax.Array
    """int32[S]; 0 = off."""
    top_p: jax.Array
    """float32[S]; 1 = off."""
    min_p: jax.Array
    """float32[S]; 0 = off."""
    seeds: jax.Array
    """uint32[S]."""
    counters: jax.Array
    """int32[S]: tokens the request has generated so far."""
    want_logprobs: jax.Array
    """bool[S]: the request asked for log-probabilities."""


@flax.struct.dataclass
class PenaltyArrays:
    """Presence/frequency penalties of one step. Counts of generated tokens live on the device
    in a table with one row (slot) per penalized request."""

    slots: jax.Array
    """int32[S]: the row's slot in the count table (0 for rows without penalties)."""
    presence: jax.Array
    """float32[S]."""
    frequency: jax.Array
    """float32[S]."""
    reset: jax.Array
    """bool[S]: the slot is new to this request: zero it first."""
    count: jax.Array
    """bool[S]: add the token this row samples to its slot's counts."""


def apply_penalties(logits: jax.Array, counts: jax.Array, p: PenaltyArrays):
    """(penalized logits, counts with fresh slots zeroed); skipped when no row has a slot."""
    def penalize(logits, counts):
        counts = counts.at[p.slots].multiply(jnp.where(p.reset, 0, 1)[:, None].astype(counts.dtype))
        seen = counts[p.slots].astype(jnp.float32)
        logits = logits - p.presence[:, None] * (seen > 0) - p.frequency[:, None] * seen
        return logits, counts

    return jax.lax.cond(jnp.any(p.reset | (p.presence != 0) | (p.frequency != 0)), penalize,
                        lambda logits, counts: (logits, counts), logits, counts)


def count_tokens(counts: jax.Array, tokens: jax.Array, p: PenaltyArrays) -> jax.Array:
    """Adds each counted row's sampled token to its slot."""
    return jax.lax.cond(jnp.any(p.count),
                        lambda c: c.at[p.slots, tokens].add(p.count.astype(c.dtype)),
                        lambda c: c, counts)


@flax.struct.dataclass
class SampledTokens:
    """What one step returns per sequence."""

    token_ids: jax.Array
    """int32[S]."""
    logprobs: jax.Array
    """float32[S]: log-probability of the sampled token (model distribution)."""
    top_ids: jax.Array
    """int32[S, MAX_LOGPROBS]: the most likely tokens."""
    top_logprobs: jax.Array
    """float32[S, MAX_LOGPROBS]: their log-probabilities."""


def _sample_random(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    vocab = logits.shape[-1]
    scaled = logits / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    ordered = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)  # descending
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
    rank = jnp.arange(vocab)[None, :]
    ordered = jnp.where(rank < k[:, None], ordered, -jnp.inf)  # top-k first, then top-p on it
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each rank
    keep = (before < s.top_p[:, None]) & (rank < k[:, None])
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1)
    min_p_floor = jnp.where(s.min_p > 0, ordered[:, 0] + jnp.log(jnp.maximum(s.min_p, 1e-30)), -jnp.inf)
    threshold = jnp.maximum(threshold, min_p_floor)
    masked = jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)
    keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(s.seeds, s.counters)
    return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)


def sample(logits: jax.Array, s: SamplingArrays, model_logits: jax.Array | None = None) -> SampledTokens:
    """Next token per row of ``logits [S, vocab]`` (float32). The sort that top-k/top-p need is
    skipped when every row is greedy. Log-probabilities come from ``model_logits`` (the model's
    distribution before penalties) when given."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    random = jax.lax.cond(jnp.any(s.temperature > 0), _sample_random, lambda l, _: greedy, logits, s)
    tokens = jnp.where(s.temperature > 0, random, greedy)
    # A branch, not a separate executable: batches with and without logprobs share executables,
    # and the top-k over the vocabulary runs only when some request asked for it.
    top_n = min(MAX_LOGPROBS, logits.shape[-1])

    def with_logprobs(logits, tokens):
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        top_logprobs, top_ids = jax.lax.top_k(logprobs, top_n)
        chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        return chosen, top_ids.astype(jnp.int32), top_logprobs

    def without(logits, tokens):
        rows = logits.shape[0]
        return (jnp.zeros(rows, jnp.float32), jnp.zeros((rows, top_n), jnp.int32),
                jnp.zeros((rows, top_n), jnp.float32))

    source = logits if model_logits is None else model_logits
    chosen, top_ids, top_logprobs = jax.lax.cond(jnp.any(s.want_logprobs), with_logprobs, without,
                                                 source, tokens)
    return SampledTokens(tokens, chosen, top_ids, top_logprobs)
