"""The executor: owns every device array (weights, KV pool) and the compiled step.

One jitted step runs the model over a ragged batch (prefill chunks and decode tokens together)
and samples on the device. Shapes are padded to power-of-two buckets (tokens, sequences, pages
per sequence) so a handful of executables serve every batch; the KV pool is donated, so XLA
updates it in place.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from models import LoadedModel
from models.attention import AttentionMetadata
from models.decoder import Decoder

from .config import EngineConfig
from .sampler import SampledTokens, SamplingArrays, sample
from .scheduler import SchedulerOutput

log = logging.getLogger(__name__)


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


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
        self._decoder = Decoder(cfg, impl=config.attention_impl, dtype=model.dtype)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))

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

    def _step_fn(self, params, kv_pool, tokens, meta, logits_indices, sampling):
        logits, kv_pool = self._decoder.apply({"params": params}, tokens, kv_pool, meta, logits_indices)
        return sample(logits, sampling), kv_pool

    def execute(self, batch: SchedulerOutput) -> SampledTokens:
        """Runs one step; returns (as host arrays) what was sampled for each scheduled request,
        in order."""
        inputs = self.prepare(batch)
        sampled, self.kv_pool = self._step(self.model.params, self.kv_pool, *inputs)
        n = len(batch.scheduled)
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], sampled)

    def prepare(self, batch: SchedulerOutput):
        """Host arrays of one step, padded to its buckets."""
        page = self.page_size
        num_seqs = bucket(len(batch.scheduled))
        decode_only = batch.decode_only
        num_tokens = num_seqs if decode_only else bucket(batch.num_tokens, 8)
        max_pages = bucket(max(len(s.request.block_table) for s in batch.scheduled))

        tokens = np.zeros(num_tokens, np.int32)
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

        at = 0
        for s, item in enumerate(batch.scheduled):
            r, n = item.request, item.num_new_tokens
            start = r.num_computed_tokens
            pos = np.arange(start, start + n, dtype=np.int32)
            table = np.asarray(r.block_table, np.int32)
            tokens[at:at + n] = r.token_slice(start, start + n)
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
        query_start_loc[len(batch.scheduled) + 1:] = at

        meta = AttentionMetadata(positions=positions, slot_mapping=slots, block_tables=block_tables,
                                 context_lens=context_lens, query_start_loc=query_start_loc,
                                 decode_only=decode_only)
        with_logprobs = any(s.request.params.logprobs is not None for s in batch.scheduled)
        sampling = SamplingArrays(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  seeds=seeds, counters=counters, with_logprobs=with_logprobs)
        return tokens, meta, logits_indices, sampling
