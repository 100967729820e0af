"""Token sampling on the device.

Every step samples with ``sample_basic`` (greedy, temperature, min-p) inside its executable.
Steps holding a request that uses top-k, top-p, penalties, logit_bias or structured outputs
also run ``sample_full`` over the step's logits as a second executable, which replaces the
step's tokens (structured outputs first mask the logits with ``apply_token_mask``, a third);
steps with a request that wants log-probabilities run ``with_logprobs`` after that, on the
model's logits. The host picks them from
the step's inputs, so no device value ever decides what runs.

Randomness is per request: the key is ``fold_in(key(seed), n)`` where n counts the request's
generated tokens, so a seeded request gives the same tokens whatever else is in the batch, and
after a preemption.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams


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
    """Penalties and logit biases of one step. What a penalized request accumulates or keeps
    lives on the device, one row (slot) per penalized request: counts of its generated tokens,
    and its ``SlotTables`` row."""

    slots: jax.Array
    """int32[S]: the row's slot in the count table (0 for rows without penalties)."""
    presence: jax.Array
    """float32[S]."""
    frequency: jax.Array
    """float32[S]."""
    repetition: jax.Array
    """float32[S]; 1 = off."""
    biased: jax.Array
    """bool[S]: add the slot's logit biases."""
    reset: jax.Array
    """bool[S]: the slot is new to this request: zero it first."""
    count: jax.Array
    """bool[S]: add the token this row samples to its slot's counts."""


@flax.struct.dataclass
class SlotTables:
    """What repetition penalties and logit biases read, one row per penalty slot: written once
    when a request that uses them gets its slot (``fill_slot``), read-only in steps.

    The prompt's tokens are written from the host's copy of the prompt rather than marked as
    prefill steps compute them: prefix-cache hits skip computing part of the prompt, and a
    preempted request keeps its slot (and this row) while it is recomputed."""

    prompt: jax.Array
    """uint8[slots, vocab]: 1 where the token occurs in the prompt (repetition penalty)."""
    bias_ids: jax.Array
    """int32[slots, MAX_LOGIT_BIAS]: biased token ids, padded with vocab (out of range)."""
    bias_values: jax.Array
    """float32[slots, MAX_LOGIT_BIAS]."""

    @classmethod
    def zeros(cls, slots: int, vocab: int) -> "SlotTables":
        return cls(prompt=jnp.zeros((slots, vocab), jnp.uint8),
                   bias_ids=jnp.full((slots, MAX_LOGIT_BIAS), vocab, jnp.int32),
                   bias_values=jnp.zeros((slots, MAX_LOGIT_BIAS), jnp.float32))


def slot_row(params: SamplingParams, prompt_token_ids: list[int], vocab: int) -> SlotTables:
    """Host arrays of one slot's ``SlotTables`` row (a leading axis of 1) for a request."""
    prompt = np.zeros((1, vocab), np.uint8)
    if params.repetition_penalty != 1.0:
        prompt[0, prompt_token_ids] = 1
    ids = np.full((1, MAX_LOGIT_BIAS), vocab, np.int32)
    values = np.zeros((1, MAX_LOGIT_BIAS), np.float32)
    bias = params.logit_bias or {}
    ids[0, :len(bias)] = list(bias)
    values[0, :len(bias)] = list(bias.values())
    return SlotTables(prompt=prompt, bias_ids=ids, bias_values=values)


def fill_slot(tables: SlotTables, slot: jax.Array, row: SlotTables) -> SlotTables:
    """``tables`` with slot ``slot`` (int32[1]; out of range: nothing changes) set to ``row``."""
    return jax.tree_util.tree_map(lambda t, r: t.at[slot].set(r, mode="drop"), tables, row)


def apply_penalties(logits: jax.Array, counts: jax.Array, tables: SlotTables, p: PenaltyArrays):
    """(adjusted logits, counts with fresh slots zeroed), in vLLM's order: logit biases, the
    repetition penalty (over the prompt and the generated tokens), then presence and frequency
    penalties (over the generated tokens only, as OpenAI defines them). Rows without penalties
    read slot 0 with coefficients that change nothing; their logits come back bit for bit."""
    counts = counts.at[p.slots].multiply(jnp.where(p.reset, 0, 1)[:, None].astype(counts.dtype))
    seen = counts[p.slots]
    rows, vocab = logits.shape
    ids = jnp.where(p.biased[:, None], tables.bias_ids[p.slots], vocab)  # (out of range: dropped)
    logits = logits.at[jnp.arange(rows)[:, None], ids].add(tables.bias_values[p.slots], mode="drop")
    repeated = (p.repetition != 1)[:, None] & ((tables.prompt[p.slots] != 0) | (seen > 0))
    factor = p.repetition[:, None]
    logits = jnp.where(repeated, jnp.where(logits > 0, logits / factor, logits * factor), logits)
    seen = seen.astype(jnp.float32)
    return logits - p.presence[:, None] * (seen > 0) - p.frequency[:, None] * seen, counts


def count_tokens(counts: jax.Array, tokens: jax.Array, p: PenaltyArrays) -> jax.Array:
    """Adds each counted row's sampled token to its slot."""
    return counts.at[p.slots, tokens].add(p.count.astype(counts.dtype))


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


def _ordered_keys(x: jax.Array) -> jax.Array:
    """uint32 keys that sort like the float32 values ``x`` (sign-magnitude to offset binary)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_key_reaching(keys: jax.Array, weights: jax.Array, target: jax.Array,
                          bits: int) -> jax.Array:
    """Per row, the largest key t with sum(weights[keys >= t]) >= target (0, i.e. every key,
    when none does: an infinite target turns the search off). A radix select instead of a sort
    of the vocabulary: ``bits`` bits per pass, 32 / bits passes, each measuring all
    2**bits - 1 candidate digits in one read of the row."""
    prefix = jnp.zeros(keys.shape[0], jnp.uint32)
    digits = jnp.arange(1, 2 ** bits, dtype=jnp.uint32)
    for shift in range(32 - bits, -1, -bits):
        candidates = prefix[:, None] | (digits[None, :] << shift)  # [S, 2**bits - 1], increasing
        reached = jnp.sum(jnp.where(keys[:, None, :] >= candidates[:, :, None], weights[:, None, :], 0),
                          axis=-1) >= target[:, None]
        # ``reached`` is true for a leading run of digits: its length is the next digit.
        prefix = prefix | (jnp.sum(reached, axis=-1).astype(jnp.uint32) << shift)
    return prefix


RADIX_BITS = 4
"""Bits per pass of the top-k / top-p radix select (any divisor of 32; exact for every one)."""


def _scaled(logits: jax.Array, s: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """(logits / temperature, the min-p floor per row: -inf when off)."""
    scaled = logits / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    top = jnp.max(scaled, axis=-1)
    return scaled, jnp.where(s.min_p > 0, top + jnp.log(jnp.maximum(s.min_p, 1e-30)), -jnp.inf)


def truncated_logits(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    """``logits / temperature`` with -inf outside the tokens top-k, then top-p (on the top-k
    distribution), then min-p (relative to the most likely token) keep: exactly the tokens a
    descending sort would keep (ties at a boundary are all kept)."""
    vocab = logits.shape[-1]
    scaled, min_p_floor = _scaled(logits, s)
    keys = _ordered_keys(scaled)
    use_top_k = (s.top_k > 0) & (s.top_k < vocab)
    top_k_key = _largest_key_reaching(keys, jnp.ones_like(scaled),
                                      jnp.where(use_top_k, s.top_k.astype(jnp.float32), jnp.inf),
                                      RADIX_BITS)
    probs = jax.nn.softmax(jnp.where(keys >= top_k_key[:, None], scaled, -jnp.inf), axis=-1)
    top_p_key = _largest_key_reaching(keys, probs, jnp.where(s.top_p < 1, s.top_p, jnp.inf), RADIX_BITS)
    threshold = jnp.maximum(jnp.maximum(top_k_key, top_p_key), _ordered_keys(min_p_floor))
    return jnp.where(keys >= threshold[:, None], scaled, -jnp.inf)


def _choose(logits: jax.Array, masked: jax.Array, s: SamplingArrays) -> jax.Array:
    """Per row: a draw from ``masked`` (scaled, truncated logits) when it samples, else the
    argmax of ``logits``."""
    keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(s.seeds, s.counters)
    random = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    return jnp.where(s.temperature > 0, random, jnp.argmax(logits, axis=-1).astype(jnp.int32))


def _without_logprobs(tokens: jax.Array, vocab: int) -> SampledTokens:
    rows, top_n = tokens.shape[0], min(MAX_LOGPROBS, vocab)
    return SampledTokens(tokens, jnp.zeros(rows, jnp.float32), jnp.zeros((rows, top_n), jnp.int32),
                         jnp.zeros((rows, top_n), jnp.float32))


def sample_basic(logits: jax.Array, s: SamplingArrays) -> SampledTokens:
    """The sampling built into every step: greedy, temperature and min-p, which cost a few
    passes over the logits. No ``lax.cond`` anywhere in a step: a cond on a device value makes
    XLA:GPU copy the predicate to the host and wait for it, so the host could not launch the
    next step before this one had computed its logits (measured: the GPU idled 30-40 % of a
    Llama-3-8B decode step on an H200). Log-probability fields are zeros."""
    scaled, floor = _scaled(logits, s)
    tokens = _choose(logits, jnp.where(scaled >= floor[:, None], scaled, -jnp.inf), s)
    return _without_logprobs(tokens, logits.shape[-1])


def sample(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    """Token ids with top-k, top-p and min-p truncation, for every row. A row that uses none
    of them gets the token ``sample_basic`` gives it."""
    return _choose(logits, truncated_logits(logits, s), s)


def sample_full(logits: jax.Array, counts: jax.Array, tables: SlotTables, s: SamplingArrays,
                p: PenaltyArrays) -> tuple[SampledTokens, jax.Array]:
    """Penalties and logit biases, truncated sampling and the count update: (sampled, counts);
    the log-probability fields are zeros (``with_logprobs`` fills them)."""
    penalized, counts = apply_penalties(logits, counts, tables, p)
    tokens = sample(penalized, s)
    return _without_logprobs(tokens, logits.shape[-1]), count_tokens(counts, tokens, p)


def apply_token_mask(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """``logits`` with -inf where ``mask`` (int32[S, ceil(vocab / 32)], bit i of word w for
    token 32 w + i: llguidance's layout) does not allow the token (structured outputs). Rows
    that allow everything come back bit for bit."""
    rows, vocab = logits.shape
    bits = jax.lax.bitcast_convert_type(mask, jnp.uint32)[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)
    allowed = (bits & 1).reshape(rows, -1)[:, :vocab] != 0
    return jnp.where(allowed, logits, -jnp.inf)


def with_logprobs(model_logits: jax.Array, tokens: jax.Array) -> SampledTokens:
    """``tokens`` with their log-probabilities and the most likely tokens', under the model's
    distribution (before penalties). A separate executable: its top-k over the vocabulary (a
    segmented sort in XLA, about 1 ms at batch 64 on an H200) runs only for steps with a
    request that asked for logprobs."""
    logprobs = jax.nn.log_softmax(model_logits, axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, model_logits.shape[-1]))
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return SampledTokens(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)


def slot_rows(p: PenaltyArrays) -> np.ndarray:
    """Host check on a step's (numpy) inputs: bool[S], the rows whose penalty slot the full
    sampler reads or writes."""
    return (np.asarray(p.reset) | np.asarray(p.count) | (np.asarray(p.presence) != 0)
            | (np.asarray(p.frequency) != 0) | (np.asarray(p.repetition) != 1) | np.asarray(p.biased))


def needs_full_sampler(s: SamplingArrays, p: PenaltyArrays) -> bool:
    """Host check on a step's (numpy) inputs: does any row need ``sample_full`` (top-k, top-p,
    penalties or logit biases)?"""
    return bool(np.any((np.asarray(s.top_k) > 0) | (np.asarray(s.top_p) < 1) | slot_rows(p)))


def wants_logprobs(s: SamplingArrays) -> bool:
    """Host check: does any row want log-probabilities (``with_logprobs``)?"""
    return bool(np.any(np.asarray(s.want_logprobs)))
