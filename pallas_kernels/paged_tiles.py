"""Shared pieces of the attention kernels: gathering KV rows out of pages, masking constants.

Every index is an integer array (no slices) because Pallas interpret mode, which the CPU tests
run, discharges only all-slice or all-integer indexers; the Triton lowering turns the integer
indexers into the same pointer arithmetic (the ``head_dim`` iota stays contiguous, so rows load
as 16-byte vectors).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
# Finite "minus infinity": an all-masked block then gives exp2(NEG - NEG) = 1 in the rescale
# factor instead of NaN; masked scores are zeroed explicitly, never through exp underflow.
NEG = -1e30


def load_kv_rows(pool_ref, layer, block_table_ref, seq, head, kv: int, key_pos: jax.Array,
                 mask: jax.Array, page_size: int, head_dim: int, dtype) -> jax.Array:
    """Rows ``key_pos [N]`` of one sequence's K (kv=0) or V (kv=1) for one KV head: ``[N, D]``
    in ``dtype`` (the dots' operand type).

    A position maps to ``pool[layer, block_table[seq, pos // page_size], head, kv,
    pos % page_size]``; masked rows read as zeros (and never touch the block table past the
    context), so garbage in unused pages or NaN bits in a fresh pool cannot leak into sums.
    """
    page = plgpu.load(block_table_ref.at[seq, key_pos // page_size], mask=mask, other=0)
    dims = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    rows = pool_ref.at[layer, page[:, None], head, kv, (key_pos % page_size)[:, None], dims]
    if jnp.dtype(pool_ref.dtype).itemsize == 1:
        # Triton cannot splat a fill value into float8: load masked rows undefined, upcast
        # straight to the operand type (one conversion: float16 and wider hold every e4m3
        # value) and zero them, which also drops stray NaN bytes.
        values = plgpu.load(rows, mask=mask[:, None]).astype(dtype)
        return jnp.where(mask[:, None], values, 0)
    return plgpu.load(rows, mask=mask[:, None], other=0).astype(dtype)


def soft_cap_scores(scores: jax.Array, soft_cap: float | None) -> jax.Array:
    """``cap * tanh(s / cap)`` (Gemma 2); identity when no cap is set."""
    if soft_cap is None or soft_cap <= 0:
        return scores
    return soft_cap * jnp.tanh(scores * (1.0 / soft_cap))
