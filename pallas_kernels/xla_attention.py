"""Paged attention in plain XLA ops, for backends without the Pallas kernels (CPU).

Same contract as ``reference.paged_attention_reference``, but it walks the pages with an online
softmax and stops at the longest context in the batch, so its cost follows the real context
lengths, not the width of the block table: the engine can pass full-width block tables (one
executable per batch bucket) without paying for them.

An FP8 pool's pages are upcast as they are read; the K scale multiplies the (float32) queries
with the softmax scale, and the V scale the output (per KV head where the scales are).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .kv_layout import is_fp8, scales_for
from .reference import token_positions


def paged_attention_xla(q: jax.Array, kv_pool: jax.Array, layer: jax.Array | int,
                        block_tables: jax.Array, context_lens: jax.Array,
                        query_start_loc: jax.Array, *, scale: float,
                        soft_cap: float | None = None,
                        sliding_window: jax.Array | int = 0,
                        kv_scale: jax.Array | None = None) -> jax.Array:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = kv_pool.shape[2], kv_pool.shape[4]
    group = num_q_heads // num_kv_heads
    seq, position, is_real = token_positions(query_start_loc, context_lens, num_tokens)
    tables = block_tables[seq]  # [T, max_pages]
    ctx = jnp.where(is_real, context_lens[seq], 0)
    window = jnp.asarray(sliding_window, jnp.int32)
    lowest = jnp.where(window > 0, position - window + 1, 0)  # first visible key position
    first_page = jnp.min(jnp.where(is_real, jnp.maximum(lowest, 0) // page_size, block_tables.shape[1]))
    last_page = (jnp.max(ctx) + page_size - 1) // page_size
    k_scale, v_scale = (scales_for(kv_pool, kv_scale)[:, :, None, None]  # [Hkv, 1, 1] each
                        if is_fp8(kv_pool.dtype) else (1.0, 1.0))
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * (scale * k_scale)
    offsets = jnp.arange(page_size, dtype=jnp.int32)

    def body(j, carry):
        acc, row_max, denom = carry
        kv = kv_pool[layer, tables[:, j]].astype(jnp.float32)  # [T, Hkv, 2, page, D]
        scores = jnp.einsum("thgd,thkd->thgk", qg, kv[:, :, 0])
        if soft_cap is not None and soft_cap > 0:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        key_pos = j * page_size + offsets[None, :]
        visible = (key_pos <= position[:, None]) & (key_pos < ctx[:, None]) & (key_pos >= lowest[:, None])
        scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        weights = jnp.exp(scores - safe_max[..., None])
        correction = jnp.exp(jnp.where(jnp.isfinite(row_max), row_max - safe_max, -jnp.inf))
        acc = acc * correction[..., None] + jnp.einsum("thgk,thkd->thgd", weights, kv[:, :, 1])
        denom = denom * correction + jnp.sum(weights, axis=-1)
        return acc, new_max, denom

    init = (jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
            jnp.full((num_tokens, num_kv_heads, group), -jnp.inf, jnp.float32),
            jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32))
    acc, _, denom = jax.lax.fori_loop(first_page, last_page, body, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None] * v_scale
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
