"""KV write: new K/V rows into their pool slots, in place (Pallas, Triton lowering).

One program per (block of ``block_t`` tokens, KV head) stores a ``[block_t, head_dim]`` tile of
K and one of V. Each row lands at ``pool[layer, slot // page_size, head, kv, slot % page_size]``:
a contiguous ``head_dim`` run, so the scatter is made of full 128/256/512-byte rows. The pool is
aliased input -> output (``input_output_aliases``), so under donation XLA writes into the same
buffer and nothing else of the pool is touched: the pass moves only the new tokens' bytes.

Why not fused into attention: the write moves ``T * Hkv * 2 * D`` elements, less than 1 % of a
decode step's KV reads at any context worth batching, and keeping it separate lets every
attention kernel read the pool as a plain input (no ordering between writes and reads of the
same page inside one launch).

An FP8 pool is written quantized (``kv_layout.quantize_kv``: divided by the layer's K or V
scale, clamped to +-448, rounded to e4m3) in the same pass: the store moves half the bytes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .kv_layout import FP8_KV_MAX, KV_AXIS, is_fp8, scales_for


def _write_kernel(pool_in_ref, layer_ref, k_ref, v_ref, slot_ref, scale_ref, pool_ref, *,
                  block_t: int,
                  num_tokens: int, num_pages: int, page_size: int, head_dim: int):
    del pool_in_ref  # aliased with pool_ref
    head = pl.program_id(1)
    token = pl.program_id(0) * block_t + jnp.arange(block_t, dtype=jnp.int32)
    in_range = token < num_tokens
    token = jnp.minimum(token, num_tokens - 1)
    slot = plgpu.load(slot_ref.at[token], mask=in_range, other=-1)
    valid = (slot >= 0) & in_range
    # A skipped row points one page past the pool: never dereferenced (masked), and dropped by
    # interpret mode's scatter instead of racing a real write to the same slot.
    page = jnp.where(valid, slot // page_size, num_pages)[:, None]
    offset = jnp.where(valid, slot % page_size, 0)[:, None]
    dims = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    layer = layer_ref[0]
    for kv, src_ref in ((0, k_ref), (1, v_ref)):
        rows = plgpu.load(src_ref.at[token[:, None], head, dims], mask=in_range[:, None], other=0)
        if is_fp8(pool_ref.dtype):
            rows = jnp.clip(rows.astype(jnp.float32) / scale_ref[kv, head], -FP8_KV_MAX, FP8_KV_MAX)
        plgpu.store(pool_ref.at[layer, page, head, kv, offset, dims], rows.astype(pool_ref.dtype),
                    mask=valid[:, None])


@functools.partial(jax.jit, static_argnames=("block_t", "num_warps", "interpret"))
def write_kv_pallas(kv_pool: jax.Array, layer: jax.Array | int, k: jax.Array, v: jax.Array,
                    slot_mapping: jax.Array, kv_scale: jax.Array | None = None, *,
                    block_t: int = 16, num_warps: int = 4, interpret: bool = False) -> jax.Array:
    """Scatters ``k, v [T, Hkv, D]`` to ``slot_mapping [T]`` (slot -1: skipped), in place;
    an FP8 pool gets them quantized with ``kv_scale`` (float32 ``[2]`` or ``[2, Hkv]``, K and V
    per layer or per KV head; None: 1.0)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert KV_AXIS == 3 and kv_pool.shape[2] == num_kv_heads and kv_pool.shape[5] == head_dim
    kernel = functools.partial(_write_kernel, block_t=block_t, num_tokens=num_tokens,
                               num_pages=kv_pool.shape[1], page_size=kv_pool.shape[4],
                               head_dim=head_dim)
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, block_t), num_kv_heads),
        out_shape=jax.ShapeDtypeStruct(kv_pool.shape, kv_pool.dtype),
        input_output_aliases={0: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="duetjax_write_kv",
    )(kv_pool, layer_arr, k, v, slot_mapping.astype(jnp.int32), scales_for(kv_pool, kv_scale))
