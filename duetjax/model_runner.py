"""The executor: owns every device array (weights, KV pool) and the compiled steps.

One step runs the model over a ragged batch (prefill chunks and decode tokens together) and
samples on the device. Every batch is padded to a bucket, and every bucket is compiled ahead of
time at start-up, so nothing compiles while serving:
- decode buckets: S sequences of one token each, S a power of two up to max_num_seqs;
- mixed buckets: T tokens (a power of two up to max_num_batched_tokens) over min(T, S_max)
  sequences (prefill, chunked prefill, decode tokens riding along).
Block tables always have the full width (max_model_len / page_size): the attention kernels'
cost follows the real context lengths, not the table width. Weights are arguments (not
constants) and the KV pool is donated, so XLA updates it in place.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import pallas_kernels
from models import LoadedModel
from models.attention import AttentionMetadata
from models.decoder import Decoder

from .config import EngineConfig
from .request import PENDING
from .sampler import (PenaltyArrays, SampledTokens, SamplingArrays, apply_penalties,
                      count_tokens, sample)
from .scheduler import SchedulerOutput

log = logging.getLogger(__name__)
MIN_MIXED_TOKENS = 16


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass
class InFlight:
    """A dispatched step whose results the host has not read yet."""

    batch: SchedulerOutput
    sampled: SampledTokens
    """Device arrays (futures): reading them waits for the step."""
    output_index: dict[int, int] = dataclasses.field(default_factory=dict)
    """Row -> index in its request's output of the token this step samples (rows that end a
    prefill chunk sample nothing)."""

    def fetch(self) -> SampledTokens:
        """Waits for the step; its results as host arrays, one row per scheduled request."""
        n = len(self.batch.scheduled)
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], self.sampled)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One compiled shape: ``num_tokens`` tokens over ``num_seqs`` sequences."""

    decode: bool
    num_tokens: int
    num_seqs: int


def plan_buckets(config: EngineConfig) -> list[Bucket]:
    """Every shape the engine can ever run, given its batch limits."""
    max_seqs = bucket(config.max_num_seqs)
    max_tokens = bucket(config.max_num_batched_tokens, MIN_MIXED_TOKENS)
    decode = [Bucket(True, 1 << i, 1 << i) for i in range(max_seqs.bit_length())]
    mixed = [Bucket(False, t, min(t, max_seqs))
             for t in (1 << i for i in range(max_tokens.bit_length())) if t >= MIN_MIXED_TOKENS]
    return decode + mixed


def bucket_for(batch: SchedulerOutput, config: EngineConfig) -> Bucket:
    if batch.decode_only:
        s = bucket(len(batch.scheduled))
        return Bucket(True, s, s)
    t = bucket(batch.num_tokens, MIN_MIXED_TOKENS)
    return Bucket(False, t, min(t, bucket(config.max_num_seqs)))


class ModelRunner:
    def __init__(self, model: LoadedModel, config: EngineConfig, max_model_len: int):
        self.model = model
        self.config = config
        cfg = model.config
        self.page_size = config.page_size
        self.max_pages_per_seq = -(-max_model_len // config.page_size)
        self.num_pages = self._plan_num_pages()
        if self.num_pages < self.max_pages_per_seq:
            raise ValueError(
                f"the KV pool holds {self.num_pages * self.page_size} tokens, less than "
                f"max_model_len={max_model_len}; lower max_model_len or raise kv_cache_tokens")
        shape = pallas_kernels.kv_pool_shape(cfg.num_layers, self.num_pages, cfg.num_kv_heads,
                                             self.page_size, cfg.head_dim)
        self.kv_pool = jnp.zeros(shape, model.dtype)
        unroll = config.scan_unroll
        if unroll is None:
            unroll = cfg.num_layers if jax.default_backend() == "gpu" else 1
        self._decoder = Decoder(cfg, impl=config.attention_impl, dtype=model.dtype,
                                scan_unroll=unroll)
        self._executables: dict[Bucket, jax.stages.Compiled] = {}
        self.compile_seconds = 0.0
        self.last_launch_seconds = 0.0
        """Host time of the last executable call (it blocks while the device queue is full)."""
        self.max_seqs = bucket(config.max_num_seqs)
        self._no_previous = jnp.zeros(self.max_seqs, jnp.int32)
        # Generated-token counts of penalized requests, one row per scheduler slot.
        self.token_counts = jnp.zeros((config.max_num_seqs, cfg.vocab_size), jnp.int32)
        self._jitted_step = jax.jit(self._step_fn, donate_argnums=(1, 2))

    def compile_all(self, show_progress: bool = True) -> None:
        """Compiles every bucket (from the persistent cache when it holds them)."""
        buckets = plan_buckets(self.config)
        for b in tqdm(buckets, desc="compile", disable=not show_progress):
            self._compile(b)
        log.info("compiled %d buckets in %.1fs", len(buckets), self.compile_seconds)

    def _compile(self, b: Bucket) -> jax.stages.Compiled:
        start = time.perf_counter()
        inputs = self._host_inputs(b)
        lowered = self._jitted_step.lower(self.model.params, self.kv_pool, self.token_counts,
                                          self._no_previous, *inputs)
        self._executables[b] = lowered.compile()
        self.compile_seconds += time.perf_counter() - start
        return self._executables[b]

    def _plan_num_pages(self) -> int:
        cfg = self.model.config
        per_token = pallas_kernels.kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                                      jnp.dtype(self.model.dtype).itemsize)
        tokens = self.config.kv_cache_tokens
        if tokens is None and jax.default_backend() == "gpu":
            stats = jax.devices()[0].memory_stats() or {}
            free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
            tokens = int(free * self.config.kv_cache_memory_fraction) // per_token
        if tokens is None:
            tokens = self.config.cpu_kv_cache_tokens
        pages = tokens // self.page_size
        log.info("KV pool: %d pages of %d tokens (%.2f GiB)", pages, self.page_size,
                 pages * self.page_size * per_token / 2**30)
        return pages

    def _step_fn(self, params, kv_pool, counts, previous, tokens, from_previous, meta,
                 logits_indices, sampling, penalties):
        # Tokens sampled by the step still in flight never visit the host: they are read here,
        # on the device, from that step's output.
        tokens = jnp.where(from_previous >= 0, previous[jnp.maximum(from_previous, 0)], tokens)
        logits, kv_pool = self._decoder.apply({"params": params}, tokens, kv_pool, meta, logits_indices)
        penalized, counts = apply_penalties(logits, counts, penalties)
        sampled = sample(penalized, sampling, model_logits=logits)
        counts = count_tokens(counts, sampled.token_ids, penalties)
        padded = jnp.zeros(self.max_seqs, jnp.int32).at[:sampled.token_ids.shape[0]].set(sampled.token_ids)
        return sampled.replace(token_ids=padded), kv_pool, counts

    def dispatch(self, batch: SchedulerOutput, previous: InFlight | None) -> InFlight:
        """Launches one step without waiting for it (nor for ``previous``, whose sampled tokens
        feed this step on the device)."""
        b = bucket_for(batch, self.config)
        executable = self._executables.get(b)
        if executable is None:
            if self.config.compile_on_start:
                raise RuntimeError(f"no compiled executable for {b} (buckets: "
                                   f"{sorted(self._executables, key=str)}): a scheduler bug")
            log.info("compiling %s on first use", b)
            executable = self._compile(b)
        inputs = self._host_inputs(b, batch)
        prev_tokens = previous.sampled.token_ids if previous is not None else self._no_previous
        start = time.perf_counter()
        sampled, self.kv_pool, self.token_counts = executable(
            self.model.params, self.kv_pool, self.token_counts, prev_tokens, *inputs)
        self.last_launch_seconds = time.perf_counter() - start
        return InFlight(batch, sampled)

    def _host_inputs(self, b: Bucket, batch: SchedulerOutput | None = None):
        """Host arrays of one step in bucket ``b`` (all padding when ``batch`` is None)."""
        page = self.page_size
        num_seqs, num_tokens, decode_only = b.num_seqs, b.num_tokens, b.decode
        max_pages = self.max_pages_per_seq

        tokens = np.zeros(num_tokens, np.int32)
        from_previous = np.full(num_tokens, -1, np.int32)  # row of the in-flight step's output
        positions = np.zeros(num_tokens, np.int32)
        slots = np.full(num_tokens, -1, np.int32)
        block_tables = np.zeros((num_seqs, max_pages), np.int32)
        context_lens = np.zeros(num_seqs, np.int32)
        query_start_loc = np.zeros(num_seqs + 1, np.int32)
        logits_indices = np.zeros(num_seqs, np.int32)
        temperature = np.zeros(num_seqs, np.float32)
        top_k = np.zeros(num_seqs, np.int32)
        top_p = np.ones(num_seqs, np.float32)
        min_p = np.zeros(num_seqs, np.float32)
        seeds = np.zeros(num_seqs, np.uint32)
        counters = np.zeros(num_seqs, np.int32)
        want_logprobs = np.zeros(num_seqs, bool)
        penalty_slots = np.zeros(num_seqs, np.int32)
        presence = np.zeros(num_seqs, np.float32)
        frequency = np.zeros(num_seqs, np.float32)
        reset = np.zeros(num_seqs, bool)
        count = np.zeros(num_seqs, bool)

        at = 0
        scheduled = batch.scheduled if batch is not None else []
        for s, item in enumerate(scheduled):
            r, n = item.request, item.num_new_tokens
            start = r.num_computed_tokens
            pos = np.arange(start, start + n, dtype=np.int32)
            table = np.asarray(r.block_table, np.int32)
            chunk = r.token_slice(start, start + n)
            tokens[at:at + n] = chunk
            if chunk[-1] == PENDING:  # only the newest token can still be in flight
                from_previous[at + n - 1] = r.pending_rows[start + n - 1 - len(r.prompt_token_ids)]
            positions[at:at + n] = pos
            slots[at:at + n] = table[pos // page] * page + pos % page
            block_tables[s, :len(table)] = table
            context_lens[s] = start + n
            at += n
            query_start_loc[s + 1] = at
            logits_indices[s] = at - 1
            p = r.params
            temperature[s], top_k[s], top_p[s], min_p[s] = p.temperature, p.top_k, p.top_p, p.min_p
            seeds[s], counters[s] = r.seed, len(r.output_token_ids)
            want_logprobs[s] = p.logprobs is not None
            if r.penalty_slot is not None:
                penalty_slots[s] = r.penalty_slot
                presence[s], frequency[s] = p.presence_penalty, p.frequency_penalty
                reset[s], count[s] = r.penalty_slot_fresh, item.completes_sequence
        query_start_loc[len(scheduled) + 1:] = at

        meta = AttentionMetadata(positions=positions, slot_mapping=slots, block_tables=block_tables,
                                 context_lens=context_lens, query_start_loc=query_start_loc,
                                 decode_only=decode_only)
        sampling = SamplingArrays(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  seeds=seeds, counters=counters, want_logprobs=want_logprobs)
        penalties = PenaltyArrays(slots=penalty_slots, presence=presence, frequency=frequency, reset=reset,
                                  count=count)
        return tokens, from_previous, meta, logits_indices, sampling, penalties
