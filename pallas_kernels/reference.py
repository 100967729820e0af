"""Plain-jnp references for the paged attention kernels.

They define what the Pallas kernels compute, serve as the test oracle (computed in float32),
and are the attention path on CPU. Shapes follow ``kv_layout``:
``kv_pool [num_layers, num_pages, num_kv_heads, 2, page_size, head_dim]``.

Ragged batch convention (shared by every kernel):
- ``q [T, num_q_heads, head_dim]``: the new tokens of all sequences, concatenated, padded to T.
- ``query_start_loc [S + 1]``: sequence s owns tokens ``query_start_loc[s] : query_start_loc[s+1]``;
  tokens at or past ``query_start_loc[S]`` are padding.
- ``context_lens [S]``: KV length of each sequence *including* its new tokens (those have already
  been written to the pool); padding sequences have 0.
- ``block_tables [S, max_pages]``: page ids of each sequence, in order.
- Token i of sequence s sits at position ``context_lens[s] - q_len[s] + i`` and sees keys at
  positions ``j <= pos`` (causal) with ``pos - j < sliding_window`` when ``sliding_window > 0``.
- ``layer`` and ``sliding_window`` may be traced int32 scalars (they vary inside the layer scan).
- Rows that see no key (padding) come out as zeros.

FP8 pools (``kv_layout.is_fp8``): ``kv_scale`` ``[2]`` or ``[2, num_kv_heads]`` holds the
layer's K and V scales, per layer or per KV head (None: 1.0); the write stores
``quantize_kv(x, scale)`` and attention reads ``stored * scale``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .kv_layout import is_fp8, quantize_kv, scales_for


def write_kv_reference(kv_pool: jax.Array, layer: jax.Array | int, k: jax.Array, v: jax.Array,
                       slot_mapping: jax.Array, kv_scale: jax.Array | None = None) -> jax.Array:
    """Writes ``k, v [T, num_kv_heads, head_dim]`` into their slots; slot -1 is skipped."""
    num_pages, page_size = kv_pool.shape[1], kv_pool.shape[4]
    valid = slot_mapping >= 0
    page = jnp.where(valid, slot_mapping // page_size, num_pages)  # out of range -> dropped
    offset = jnp.where(valid, slot_mapping % page_size, 0)
    kv = jnp.stack([k, v], axis=2)  # [T, H, 2, D]
    if is_fp8(kv_pool.dtype):
        kv = quantize_kv(kv, scales_for(kv_pool, kv_scale).T[:, :, None])  # [H, 2, 1]
    kv = kv.astype(kv_pool.dtype)
    return kv_pool.at[layer, page, :, :, offset, :].set(kv, mode="drop")


def token_positions(query_start_loc: jax.Array, context_lens: jax.Array, num_tokens: int):
    """Per token: its sequence index, its absolute position, and whether it is real."""
    num_seqs = context_lens.shape[0]
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(query_start_loc, token, side="right").astype(jnp.int32) - 1
    seq = jnp.clip(seq, 0, num_seqs - 1)
    q_len = query_start_loc[seq + 1] - query_start_loc[seq]
    position = context_lens[seq] - q_len + (token - query_start_loc[seq])
    is_real = token < query_start_loc[num_seqs]
    return seq, position, is_real


def paged_attention_reference(q: jax.Array, kv_pool: jax.Array, layer: jax.Array | int,
                              block_tables: jax.Array, context_lens: jax.Array,
                              query_start_loc: jax.Array, *, scale: float,
                              soft_cap: float | None = None,
                              sliding_window: jax.Array | int = 0,
                              kv_scale: jax.Array | None = None) -> jax.Array:
    """Ragged paged attention (prefill, chunked prefill, decode, mixed), float32 inside."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = kv_pool.shape[2], kv_pool.shape[4]
    group = num_q_heads // num_kv_heads
    max_pages = block_tables.shape[1]
    seq, position, is_real = token_positions(query_start_loc, context_lens, num_tokens)

    pages = kv_pool[layer][block_tables[seq]]  # [T, max_pages, Hkv, 2, page, D]
    pages = jnp.moveaxis(pages, 3, 0).astype(jnp.float32)  # [2, T, max_pages, Hkv, page, D]
    pages = jnp.swapaxes(pages, 3, 4).reshape(2, num_tokens, max_pages * page_size, num_kv_heads, head_dim)
    keys, values = pages[0], pages[1]  # [T, C, Hkv, D]
    if is_fp8(kv_pool.dtype):
        k_scale, v_scale = scales_for(kv_pool, kv_scale)[:, :, None]  # [Hkv, 1] each
        keys, values = keys * k_scale, values * v_scale

    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("thgd,tchd->thgc", qg, keys) * scale
    if soft_cap is not None and soft_cap > 0:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    key_pos = jnp.arange(max_pages * page_size, dtype=jnp.int32)[None, :]
    visible = (key_pos <= position[:, None]) & (key_pos < context_lens[seq][:, None])
    window = jnp.asarray(sliding_window, jnp.int32)
    visible &= (window <= 0) | (position[:, None] - key_pos < window)
    visible &= is_real[:, None]
    visible = visible[:, None, None, :]
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("thgc,tchd->thgd", weights, values) / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
