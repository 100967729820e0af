"""The paged KV pool: one buffer for every layer, K and V side by side.

Layout: ``[num_layers, num_pages, num_kv_heads, 2, page_size, head_dim]``.

Why this order:
- One buffer for all layers and both K and V, so the engine donates one array per step and
  shares one CUDA IPC handle with every worker process.
- ``num_layers`` first: a kernel receives the whole pool plus a (traced) layer index, so the
  layer loop (``lax.scan``) never slices the pool (a slice of a carried buffer is a copy).
- Within a page, one KV head's K tile and V tile are adjacent: ``[2, page_size, head_dim]``
  is one contiguous run of ``2 * page_size * head_dim`` elements (8 KiB for page 16, d 128,
  bf16), so a decode program streams K and V of its head with long contiguous reads.
- A slot is ``page * page_size + offset``; slot ``-1`` marks a padding token (never written).

An FP8 pool (``FP8_KV_DTYPE``) holds ``round(x / scale)`` in e4m3 with float32 scales for K and
for V of each layer, one per layer (``kv_scale [2]``, vLLM's ``k_scale`` / ``v_scale``) or one
per KV head (``kv_scale [2, num_kv_heads]``): the real value is ``stored * scale``. The write
quantizes, every attention path dequantizes as it reads; each kernel program owns one KV head,
so a per-head scale costs it nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LAYER_AXIS, PAGE_AXIS, HEAD_AXIS, KV_AXIS, TOKEN_AXIS, DIM_AXIS = range(6)

FP8_KV_DTYPE = jnp.float8_e4m3fn
"""The FP8 pool's dtype: e4m3, finite only (a value past ``FP8_KV_MAX`` would become NaN)."""
FP8_KV_MAX = 448.0
"""Largest finite e4m3 value: quantized K/V are clamped to +-it."""


def is_fp8(dtype) -> bool:
    """The pool holds scaled e4m3 values (else values in the compute dtype, unscaled)."""
    return jnp.dtype(dtype) == jnp.dtype(FP8_KV_DTYPE)


def scales_for(kv_pool: jax.Array, kv_scale: jax.Array | None) -> jax.Array:
    """float32 ``[2, num_kv_heads]``: one layer's K and V scales per KV head, from ``kv_scale``
    ``[2]`` (per layer, broadcast over the heads) or ``[2, num_kv_heads]``; 1.0 where none is
    given. Only an FP8 pool is scaled: a scale for any other pool, or of another shape, is a
    ValueError."""
    num_kv_heads = kv_pool.shape[HEAD_AXIS]
    if kv_scale is None:
        return jnp.ones((2, num_kv_heads), jnp.float32)
    if not is_fp8(kv_pool.dtype):
        raise ValueError(f"kv_scale applies to an FP8 KV pool only; this pool is "
                         f"{jnp.dtype(kv_pool.dtype).name}")
    kv_scale = jnp.asarray(kv_scale, jnp.float32)
    if kv_scale.shape == (2,):
        kv_scale = kv_scale[:, None]
    elif kv_scale.shape != (2, num_kv_heads):
        raise ValueError(f"kv_scale must be [2] (K and V scales of the layer) or "
                         f"[2, {num_kv_heads}] (one per KV head of this pool), got "
                         f"{list(kv_scale.shape)}")
    return jnp.broadcast_to(kv_scale, (2, num_kv_heads))


def fp8_operand_dtype(q_dtype) -> jnp.dtype:
    """The operand type of attention's dots over an FP8 pool: float16 for 16-bit queries
    (every e4m3 value is exactly a float16, and Hopper converts e4m3 pairs to float16 in one
    instruction, where bfloat16 takes a detour through float32), else the queries' type."""
    dtype = jnp.dtype(q_dtype)
    return jnp.dtype(jnp.float16) if dtype.itemsize == 2 else dtype


FP16_MAX = 65504.0
"""Largest finite float16: queries are clamped to it before they become float16 operands."""


def as_operands(q: jax.Array, dtype) -> jax.Array:
    """Queries as the dots' operands of type ``dtype`` (``fp8_operand_dtype``), clamped to
    float16's range when that is the type (never infinite)."""
    if jnp.dtype(dtype) == jnp.float16:
        q = jnp.clip(q.astype(jnp.float32), -FP16_MAX, FP16_MAX)
    return q.astype(dtype)


def quantize_kv(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x / scale`` clamped to e4m3's range and rounded to e4m3."""
    return jnp.clip(x.astype(jnp.float32) / scale, -FP8_KV_MAX, FP8_KV_MAX).astype(FP8_KV_DTYPE)


def kv_pool_shape(num_layers: int, num_pages: int, num_kv_heads: int, page_size: int,
                  head_dim: int) -> tuple[int, int, int, int, int, int]:
    """Shape of the pool for the given model geometry and page count."""
    for name, value in (("num_layers", num_layers), ("num_pages", num_pages),
                        ("num_kv_heads", num_kv_heads), ("page_size", page_size),
                        ("head_dim", head_dim)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    return (num_layers, num_pages, num_kv_heads, 2, page_size, head_dim)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of KV one token occupies across all layers (K and V)."""
    return num_layers * num_kv_heads * 2 * head_dim * itemsize
