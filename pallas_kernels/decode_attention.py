"""Paged decode attention: one query token per sequence (Pallas, Triton lowering).

Grid ``(batch, kv_heads, splits)``. A program owns one sequence, one KV head and one contiguous
share of that sequence's keys (split-K, "flash decoding"). It loads the ``group`` query heads
that share the KV head as the rows of one tile (padded to 16, the smallest tensor-core M), so
every K/V row is read from HBM once for the whole group, then walks its keys in blocks of
``block_k`` with an online softmax. Key rows are gathered per position through the block table,
so any page size works and blocks need not align to pages.

Decode is memory-bound (about ``2 * group`` FLOP per KV byte): what matters is keeping enough
bytes in flight, hence many programs (splits when ``batch * kv_heads`` is small next to the
SM count) and Triton's software pipelining (``num_stages``) of the gathered loads.

With one split the kernel writes the normalized output directly. With several it writes each
split's normalized partial output and its log2-sum-exp, and a small XLA combine (a few MB at
most) merges them on the GPU.

An FP8 pool (``kv_layout``) is dequantized in registers: e4m3 rows are loaded (half the bytes)
and upcast to the dots' operand type (``kv_layout.fp8_operand_dtype``: float16 for bf16 queries,
one conversion instruction per pair of elements), the K scale is folded into the softmax scale
and the V scale into the normalized output, both exact (scores and the output are linear in
them).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .kv_layout import as_operands, fp8_operand_dtype, is_fp8, scales_for
from .paged_tiles import LOG2E, NEG, load_kv_rows, soft_cap_scores


def _decode_kernel(q_ref, pool_ref, block_table_ref, context_len_ref, params_ref, scale_ref,
                   *out_refs,
                   num_q_heads: int, group: int, block_h: int, block_k: int, num_splits: int, page_size: int,
                   head_dim: int, scale: float, soft_cap: float | None, precision, dot_dtype):
    seq, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, window = params_ref[0], params_ref[1]
    context_len = context_len_ref[seq]
    lowest = jnp.where(window > 0, jnp.maximum(context_len - window, 0), 0)
    if num_splits == 1:
        start, end = lowest, context_len
    else:
        share = pl.cdiv(pl.cdiv(context_len - lowest, num_splits), block_k) * block_k
        start = lowest + split * share
        end = jnp.minimum(context_len, start + share)
    num_blocks = pl.cdiv(jnp.maximum(end - start, 0), block_k)

    rows = jnp.arange(block_h, dtype=jnp.int32)
    row_valid = rows < group
    # Padding rows point past the last head: masked on the GPU, dropped by interpret mode's
    # scatter (a clamped index would race the real row's store there).
    q_heads = jnp.where(row_valid, head * group + rows, num_q_heads)[:, None]
    dims = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    q = plgpu.load(q_ref.at[seq, q_heads, dims], mask=row_valid[:, None], other=0)
    offsets = jnp.arange(block_k, dtype=jnp.int32)
    score_scale = scale if soft_cap else scale * LOG2E
    fp8 = is_fp8(pool_ref.dtype)
    if fp8:
        score_scale = score_scale * scale_ref[0, head]
        q = as_operands(q, dot_dtype)

    def body(i, carry):
        acc, row_max, row_sum = carry
        key_pos = start + i * block_k + offsets
        key_valid = key_pos < end
        k = load_kv_rows(pool_ref, layer, block_table_ref, seq, head, 0, key_pos, key_valid,
                         page_size, head_dim, q.dtype)
        scores = plgpu.dot(q, k, trans_b=True, precision=precision) * score_scale
        if soft_cap:
            scores = soft_cap_scores(scores, soft_cap) * LOG2E
        scores = jnp.where(key_valid[None, :], scores, NEG)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        alpha = jnp.exp2(row_max - new_max)
        p = jnp.where(key_valid[None, :], jnp.exp2(scores - new_max[:, None]), 0.0)
        v = load_kv_rows(pool_ref, layer, block_table_ref, seq, head, 1, key_pos, key_valid,
                         page_size, head_dim, q.dtype)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, new_max, row_sum * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((block_h, head_dim), jnp.float32), jnp.full((block_h,), NEG, jnp.float32),
            jnp.zeros((block_h,), jnp.float32))
    acc, row_max, row_sum = lax.fori_loop(0, num_blocks, body, init)
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None]
    if fp8:
        out = out * scale_ref[1, head]
    if num_splits == 1:
        (o_ref,) = out_refs
        plgpu.store(o_ref.at[seq, q_heads, dims], out.astype(o_ref.dtype),
                    mask=row_valid[:, None])
    else:
        o_ref, lse_ref = out_refs
        plgpu.store(o_ref.at[split, seq, q_heads, dims], out, mask=row_valid[:, None])
        lse = jnp.where(row_sum > 0, row_max + jnp.log2(jnp.maximum(row_sum, 1e-30)), NEG)
        plgpu.store(lse_ref.at[split, seq, q_heads[:, 0]], lse, mask=row_valid)


def combine_splits(partial_out: jax.Array, partial_lse: jax.Array) -> jax.Array:
    """Merges split-K partials ``[splits, B, H, D]`` (normalized) with their log2-sum-exp."""
    top = jnp.max(partial_lse, axis=0)
    weight = jnp.exp2(partial_lse - top[None])  # empty splits: exp2(NEG - real) = 0
    return jnp.sum(partial_out * weight[..., None], axis=0) / jnp.sum(weight, axis=0)[..., None]


@functools.partial(jax.jit, static_argnames=(
    "scale", "soft_cap", "block_k", "num_splits", "num_warps", "num_stages", "interpret",
    "fp8_dot_dtype"))
def paged_decode_attention(q: jax.Array, kv_pool: jax.Array, layer: jax.Array | int,
                           block_tables: jax.Array, context_lens: jax.Array, *, scale: float,
                           soft_cap: float | None = None,
                           sliding_window: jax.Array | int = 0, block_k: int = 64,
                           num_splits: int = 1, num_warps: int = 4, num_stages: int = 2,
                           interpret: bool = False, kv_scale: jax.Array | None = None,
                           fp8_dot_dtype: str | None = None) -> jax.Array:
    """Attention of ``q [B, Hq, D]`` (one token per sequence) over its paged context.

    ``context_lens [B]`` counts the keys of each sequence, this token's included; 0 gives zeros.
    ``kv_scale``: float32 ``[2]`` or ``[2, Hkv]``, the layer's K and V scales of an FP8 pool
    (``kv_layout``; None: 1.0). ``fp8_dot_dtype``: the dots' operand type over an FP8 pool
    (None: ``kv_layout.fp8_operand_dtype``; benchmarks race the others); other pools' dots
    always take q's type.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = kv_pool.shape[2], kv_pool.shape[4]
    group = num_q_heads // num_kv_heads
    block_h = max(16, pl.next_power_of_2(group))
    if not is_fp8(kv_pool.dtype):
        dot_dtype = jnp.dtype(q.dtype)
    else:
        dot_dtype = jnp.dtype(fp8_dot_dtype) if fp8_dot_dtype else fp8_operand_dtype(q.dtype)
    params = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(sliding_window, jnp.int32)])
    kernel = functools.partial(
        _decode_kernel, num_q_heads=num_q_heads, group=group, block_h=block_h, block_k=block_k, num_splits=num_splits,
        page_size=page_size, head_dim=head_dim, scale=scale, soft_cap=soft_cap,
        precision=lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None,
        dot_dtype=dot_dtype)
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    else:
        out_shape = [jax.ShapeDtypeStruct((num_splits, *q.shape), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, batch, num_q_heads), jnp.float32)]
    outs = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="duetjax_paged_decode",
    )(q, kv_pool, block_tables.astype(jnp.int32), context_lens.astype(jnp.int32), params,
      scales_for(kv_pool, kv_scale))
    if num_splits == 1:
        return outs[0]
    return combine_splits(*outs).astype(q.dtype)
