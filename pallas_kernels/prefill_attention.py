"""Ragged paged prefill attention: any number of new tokens per sequence after cached context.

Serves prefill, chunked prefill and mixed batches (decode tokens are sequences with one new
token). Flash attention (online softmax) over keys gathered from the pool through the block
table, causal over the new tokens, with optional sliding window and logit soft-cap.

Work split. Query rows are (token, group head) pairs: the ``group`` query heads that share a
KV head are rows of the same tile, so each K/V tile is loaded once per group, and any group
size (3, 5, 8, ...) fills power-of-two tiles. A program owns ``block_m`` consecutive pairs of
one sequence and one KV head; grid ``(q_blocks, kv_heads)``. The q-block -> (sequence, first
pair) map is a few tiny XLA ops; its length is a static upper bound (``cdiv(T*group, block_m)
+ S + 1``) and programs past the real blocks exit at once. The tokens past
``query_start_loc[S]`` form one more pseudo-sequence with no keys, so they come out as zeros.

Masks cost arithmetic, so each program walks its keys in three ranges: leading blocks cut by
the sliding window (masked), blocks every row sees entirely (no mask), and the causal diagonal
(masked).

An FP8 pool is dequantized in registers as in ``decode_attention``: e4m3 tiles upcast to the
dots' operand type (``kv_layout.fp8_operand_dtype``, float16 for bf16 queries), the K scale
folded into the softmax scale, the V scale into the output.
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


def _prefill_kernel(q_ref, pool_ref, block_table_ref, context_len_ref, start_loc_ref,
                    block_seq_ref, block_pair_ref, params_ref, scale_ref, o_ref, *, num_tokens: int,
                    num_seqs: int, group: int, block_m: int, block_n: int, page_size: int,
                    head_dim: int, scale: float, soft_cap: float | None, precision):
    block, head = pl.program_id(0), pl.program_id(1)
    layer, window = params_ref[0], params_ref[1]
    seq, first_pair = block_seq_ref[block], block_pair_ref[block]
    table_seq = jnp.minimum(seq, num_seqs - 1)  # the padding pseudo-sequence reads no keys
    q_start = start_loc_ref[seq]
    q_len = start_loc_ref[seq + 1] - q_start
    context_len = context_len_ref[seq]

    pair = first_pair + jnp.arange(block_m, dtype=jnp.int32)
    token = pair // group
    row_valid = token < q_len
    position = (context_len - q_len + token)[:, None]
    # Invalid rows point past the last token: masked on the GPU, dropped by interpret mode.
    q_token = jnp.where(row_valid, q_start + token, num_tokens)[:, None]
    q_head = (head * group + pair % group)[:, None]
    dims = jnp.arange(head_dim, dtype=jnp.int32)[None, :]
    q = plgpu.load(q_ref.at[q_token, q_head, dims], mask=row_valid[:, None], other=0)

    min_pos = context_len - q_len + first_pair // group
    max_pos = context_len - q_len + jnp.minimum(q_len - 1, (first_pair + block_m - 1) // group)
    high = jnp.where(first_pair // group < q_len, jnp.maximum(max_pos + 1, 0), 0)
    low = jnp.where(window > 0, jnp.maximum(min_pos - window + 1, 0), 0)
    num_blocks = pl.cdiv(jnp.maximum(high - low, 0), block_n)
    # Blocks [window_end, causal_end) need no mask: past the window's reach for the last row,
    # and wholly at or before the first row's position.
    reach = max_pos - window - low
    window_end = jnp.where((window > 0) & (reach >= 0), reach // block_n + 1, 0)
    window_end = jnp.minimum(window_end, num_blocks)
    causal_end = jnp.maximum(window_end, jnp.minimum(
        jnp.maximum(min_pos - low + 1, 0) // block_n, num_blocks))
    offsets = jnp.arange(block_n, dtype=jnp.int32)
    score_scale = scale if soft_cap else scale * LOG2E
    fp8 = is_fp8(pool_ref.dtype)
    if fp8:
        score_scale = score_scale * scale_ref[0, head]
        q = as_operands(q, fp8_operand_dtype(q.dtype))

    def body(j, carry, masked: bool):
        acc, row_max, row_sum = carry
        key_pos = low + j * block_n + offsets
        key_valid = key_pos < high
        k = load_kv_rows(pool_ref, layer, block_table_ref, table_seq, head, 0, key_pos,
                         key_valid, page_size, head_dim, q.dtype)
        scores = plgpu.dot(q, k, trans_b=True, precision=precision) * score_scale
        if soft_cap:
            scores = soft_cap_scores(scores, soft_cap) * LOG2E
        if masked:
            visible = (key_pos[None, :] <= position) & key_valid[None, :]
            visible &= (window <= 0) | (position - key_pos[None, :] < window)
            scores = jnp.where(visible, scores, NEG)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
        alpha = jnp.exp2(row_max - new_max)
        p = jnp.exp2(scores - new_max[:, None])
        if masked:
            p = jnp.where(visible, p, 0.0)
        v = load_kv_rows(pool_ref, layer, block_table_ref, table_seq, head, 1, key_pos,
                         key_valid, page_size, head_dim, q.dtype)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, new_max, row_sum * alpha + jnp.sum(p, axis=1)

    carry = (jnp.zeros((block_m, head_dim), jnp.float32), jnp.full((block_m,), NEG, jnp.float32),
             jnp.zeros((block_m,), jnp.float32))
    carry = lax.fori_loop(0, window_end, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(window_end, causal_end, functools.partial(body, masked=False), carry)
    acc, _, row_sum = lax.fori_loop(causal_end, num_blocks, functools.partial(body, masked=True),
                                    carry)
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None]
    if fp8:
        out = out * scale_ref[1, head]
    plgpu.store(o_ref.at[q_token, q_head, dims], out.astype(o_ref.dtype), mask=row_valid[:, None])


def q_block_map(query_start_loc: jax.Array, num_tokens: int, group: int, block_m: int,
                skip_single_token: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per q-block: its sequence and first (token, head) pair; plus the extended start locs.

    Sequence ``S`` (one past the last) is the padding pseudo-sequence covering tokens
    ``query_start_loc[S]:T``. Blocks past the last real one get a first pair beyond their
    sequence's rows, so they do nothing. ``skip_single_token``: sequences with one new token
    get no block (their rows are left unwritten for the decode kernel's results).
    """
    num_seqs = query_start_loc.shape[0] - 1
    start_loc = jnp.concatenate([query_start_loc.astype(jnp.int32),
                                 jnp.full((1,), num_tokens, jnp.int32)])
    q_lens = start_loc[1:] - start_loc[:-1]
    blocks = (q_lens * group + block_m - 1) // block_m
    if skip_single_token:
        blocks = blocks.at[:num_seqs].set(jnp.where(q_lens[:num_seqs] == 1, 0, blocks[:num_seqs]))
    ends = jnp.cumsum(blocks)
    num_q_blocks = pl.cdiv(num_tokens * group, block_m) + num_seqs + 1
    block_ids = jnp.arange(num_q_blocks, dtype=jnp.int32)
    block_seq = jnp.minimum(jnp.searchsorted(ends, block_ids, side="right"), num_seqs)
    block_seq = block_seq.astype(jnp.int32)
    block_pair = (block_ids - (ends - blocks)[block_seq]) * block_m
    return block_seq, block_pair.astype(jnp.int32), start_loc


@functools.partial(jax.jit, static_argnames=(
    "scale", "soft_cap", "block_m", "block_n", "num_warps", "num_stages", "interpret",
    "skip_single_token"))
def paged_prefill_attention(q: jax.Array, kv_pool: jax.Array, layer: jax.Array | int,
                            block_tables: jax.Array, context_lens: jax.Array,
                            query_start_loc: jax.Array, *, scale: float,
                            soft_cap: float | None = None,
                            sliding_window: jax.Array | int = 0, block_m: int = 64,
                            block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
                            interpret: bool = False, skip_single_token: bool = False,
                            kv_scale: jax.Array | None = None) -> jax.Array:
    """Ragged paged attention of ``q [T, Hq, D]``; batch convention of ``reference``;
    ``kv_scale``: the layer's K and V scales of an FP8 pool, ``[2]`` or ``[2, Hkv]`` (None: 1.0).

    ``skip_single_token``: leave the rows of sequences with one new token unwritten (the
    caller runs those through the decode kernel: here each would fill a ``block_m``-row tile
    with ``group`` useful rows)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = kv_pool.shape[2], kv_pool.shape[4]
    num_seqs = context_lens.shape[0]
    group = num_q_heads // num_kv_heads
    block_seq, block_pair, start_loc = q_block_map(query_start_loc, num_tokens, group, block_m,
                                                   skip_single_token)
    context_lens = jnp.concatenate([context_lens.astype(jnp.int32), jnp.zeros((1,), jnp.int32)])
    params = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(sliding_window, jnp.int32)])
    kernel = functools.partial(
        _prefill_kernel, num_tokens=num_tokens, num_seqs=num_seqs, group=group,
        block_m=block_m, block_n=block_n, page_size=page_size, head_dim=head_dim, scale=scale,
        soft_cap=soft_cap, precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)
    return pl.pallas_call(
        kernel,
        grid=(block_seq.shape[0], num_kv_heads),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="duetjax_paged_prefill",
    )(q, kv_pool, block_tables.astype(jnp.int32), context_lens, start_loc, block_seq,
      block_pair, params, scales_for(kv_pool, kv_scale))
