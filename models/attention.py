"""The one attention interface every model layer goes through: a paged KV pool.

A step's batch is ragged: the new tokens of all sequences concatenated (prefill chunks and decode
tokens alike). ``AttentionMetadata`` describes where each token sits and where its sequence's KV
pages are; ``pallas_kernels`` does the work (Pallas kernels on GPU, a plain-jnp reference on CPU).
"""
from __future__ import annotations

import functools

import flax.struct
import jax
from jax.sharding import Mesh, PartitionSpec as P

import pallas_kernels

from .tensor_parallel import AXIS, kv_pool_spec


@flax.struct.dataclass
class AttentionMetadata:
    """Where the tokens of one step sit; see ``pallas_kernels.reference`` for the conventions."""

    positions: jax.Array
    """int32[T]: absolute position of each token (rotary embedding); padding tokens: 0."""
    slot_mapping: jax.Array
    """int32[T]: pool slot (page * page_size + offset) receiving each token's K/V; -1 = padding."""
    block_tables: jax.Array
    """int32[S, P]: page ids of each sequence, in order."""
    context_lens: jax.Array
    """int32[S]: KV length of each sequence after this step (cached + new); padding: 0."""
    query_start_loc: jax.Array
    """int32[S + 1]: sequence s owns tokens query_start_loc[s]:query_start_loc[s + 1]."""
    decode_only: bool = flax.struct.field(pytree_node=False, default=False)
    """Static: one new token per sequence (T == S), so the decode kernel applies."""


def attend(q: jax.Array, k: jax.Array, v: jax.Array, kv_pool: jax.Array, layer: jax.Array,
           meta: AttentionMetadata, *, scale: float, soft_cap: float | None,
           sliding_window: jax.Array, impl: str,
           kv_scale: jax.Array | None = None,
           mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """Writes this step's K/V into the pool, then attends over each sequence's pages.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; ``kv_scale``: this layer's K and V scales of an FP8
    pool, ``[2]`` or ``[2, Hkv]`` (None: 1.0). Returns (output [T, Hq, D], updated pool).
    ``mesh``: a tensor-parallel group (``tensor_parallel``): heads, the pool and per-head
    scales split by heads over it, each device runs the kernels on its own heads (the
    metadata and per-layer scales are the same everywhere).
    """
    run = functools.partial(_attend, scale=scale, soft_cap=soft_cap, impl=impl)
    if mesh is None:
        return run(q, k, v, kv_pool, layer, meta, sliding_window, kv_scale)
    heads, pool = P(None, AXIS), kv_pool_spec()
    scales = heads if kv_scale is not None and kv_scale.ndim == 2 else P()  # [2, Hkv]: by heads
    run = jax.shard_map(run, mesh=mesh, in_specs=(heads, heads, heads, pool, P(), P(), P(), scales),
                        out_specs=(heads, pool), check_vma=False)
    return run(q, k, v, kv_pool, layer, meta, sliding_window, kv_scale)


def _attend(q, k, v, kv_pool, layer, meta: AttentionMetadata, sliding_window, kv_scale, *,
            scale: float, soft_cap: float | None, impl: str) -> tuple[jax.Array, jax.Array]:
    kv_pool = pallas_kernels.write_kv(kv_pool, layer, k, v, meta.slot_mapping,
                                      kv_scale=kv_scale, impl=impl)
    out = pallas_kernels.paged_attention(
        q, kv_pool, layer, meta.block_tables, meta.context_lens, meta.query_start_loc,
        scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
        decode_only=meta.decode_only, kv_scale=kv_scale, impl=impl)
    return out, kv_pool
