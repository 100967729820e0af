"""Paged decode attention for Hopper, written with Pallas Mosaic GPU.

Same contract as ``decode_attention.paged_decode_attention``: ``q [B, Hq, D]`` (one token per
sequence) over its paged context, GQA, soft-cap, sliding window. Built to keep HBM busy from
few SMs (an MPS client with 20-50 % of them):

- Persistent grid: one program per SM this process runs on (``persistent_grid.sm_share``).
  Work items are (sequence, KV head, key split); they are sorted heaviest first and dealt to
  the programs in snake order, so long and short sequences balance. The split count is static,
  chosen so that the items fill the programs evenly (``persistent_grid.balanced_splits``).
- Three warpgroups. A producer streams K and V of the program's items, one TMA per page (or
  per block when a page holds several blocks), into a ``num_stages``-deep shared-memory ring,
  across item boundaries without a break, and each item's query rows into a 2-slot Q ring.
  Bytes in flight per SM: the ring less the two slots being computed on.
- Two consumers take alternate ring slots (slot parity = consumer), so each waits on every
  phase of its own barriers and neither idles the ring. Decode's query tile has only ``group``
  useful rows of wgmma's 64, so one consumer's matmuls and softmax per block cost about what a
  block takes to arrive from HBM on a 30 % share; two give the headroom.
- Each consumer keeps its own online softmax (base 2); at the end of an item the second hands
  its (max, sum, acc) to the first through shared memory, and the first merges them and writes
  the item's rows with one TMA: the normalized output directly when an item is a whole
  sequence (one split), else a float32 partial and its log2-sum-exp.
- With several splits, a small XLA combine merges the partials (``combine_splits``): a fused
  combine needs cross-program synchronisation, which a grid sharing SMs with other MPS
  clients cannot rely on (pallas_kernels/NOTES.md, "Decode on Mosaic GPU").

The query tile is 64 rows (wgmma's M): the group's rows are loaded with the rows around them
as a box of whole 8-row tiles of ``q`` (a TMA into a tiled tile addresses whole tiles), at a
start clamped to stay inside ``q``; the other rows hold whatever was there and are never stored
(rows of a matmul and of a row softmax do not mix).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .decode_attention import combine_splits
from .paged_tiles import LOG2E, NEG
from .persistent_grid import balanced_splits, sm_share
from .prefill_attention_mgpu import (SHARED_BYTES, _cdiv, _div, _smem_transforms,
                                     accumulate_pv, check_call)

HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.bfloat16, jnp.float16)
ROWS = 64  # wgmma's M: the query tile
STATS = 8  # columns of a row-statistics tile (the narrowest WGMMA-layout tile)
TMA_ALIGN = 128  # bytes: where a TMA copy may start in shared memory
_INTERPRET = plgpu.InterpretGPUParams()


@dataclasses.dataclass(frozen=True)
class MgpuDecodeConfig:
    block_kv: int = 32
    """Keys per ring slot."""
    num_stages: int = 8
    """Ring slots (even: slot parity picks the consumer)."""
    p_in_registers: bool = True
    """PV's A operand from registers; False goes through shared memory (interpret mode)."""

    def shared_bytes(self, head_dim: int, itemsize: int, direct: bool, group: int) -> int:
        ring = self.num_stages * 2 * self.block_kv * head_dim * itemsize
        q = 2 * ROWS * head_dim * itemsize
        exchange = ROWS * head_dim * 4 + 2 * ROWS * stats_columns(group) * 4
        out = ROWS * head_dim * itemsize if direct else 0
        p = 0 if self.p_in_registers else 2 * ROWS * self.block_kv * itemsize
        return ring + q + exchange + out + p


def stats_columns(group: int) -> int:
    """Columns of the row-statistics tiles. A split's log-sum-exp rows leave shared memory by
    TMA from the group's row offset in its tile, which must be 128-byte aligned: 8 float32
    columns (32 bytes a row) align only offsets that are multiples of 4, which groups of 4 and
    8 always start at; other groups get rows of 128 bytes (an H100 faulted with a misaligned
    address on groups of 1 with 32-byte rows)."""
    return STATS if group % 4 == 0 else TMA_ALIGN // 4


def q_box_rows(group: int) -> int:
    """Rows of the Q box: whole 8-row tiles that hold a group wherever it starts. Groups
    start at multiples of ``group``: at most ``8 - gcd(group, 8)`` rows into a tile."""
    return -(-(group + 8 - math.gcd(group, 8)) // 8) * 8


def unsupported_reason(q_shape, q_dtype, kv_pool_shape, kv_dtype,
                       config: MgpuDecodeConfig) -> str | None:
    """Why this kernel cannot run the shape (None when it can)."""
    _, num_q_heads, head_dim = q_shape
    num_kv_heads, page_size = kv_pool_shape[2], kv_pool_shape[4]
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} not in {HEAD_DIMS}"
    if jnp.dtype(q_dtype) not in map(jnp.dtype, DTYPES) or jnp.dtype(kv_dtype) != jnp.dtype(q_dtype):
        return f"q/kv dtypes {q_dtype}/{kv_dtype}: need both bf16 or both f16"
    if num_q_heads % num_kv_heads or q_box_rows(num_q_heads // num_kv_heads) > ROWS:
        return (f"{num_q_heads} q heads over {num_kv_heads} kv heads: need a group whose "
                f"8-row tiles fit {ROWS} rows")
    block_kv = config.block_kv
    if block_kv % 16 or block_kv > 256:
        return f"block_kv {block_kv}: need a multiple of 16 (wgmma's K) up to 256"
    if page_size % 8 or (block_kv % page_size and page_size % block_kv):
        return f"page size {page_size} does not tile block_kv {block_kv} (8-row TMA tiles)"
    if config.num_stages < 2 or config.num_stages % 2:
        return f"num_stages {config.num_stages}: need an even count (one parity per consumer)"
    need = config.shared_bytes(head_dim, jnp.dtype(q_dtype).itemsize, direct=False,
                               group=num_q_heads // num_kv_heads)
    if need > SHARED_BYTES:
        return f"{config} needs {need} bytes of shared memory at d{head_dim}"
    return None


def writes_directly(config: MgpuDecodeConfig, num_splits: int, head_dim: int,
                    itemsize: int, group: int) -> bool:
    """One split writes the output itself when its staging tile fits next to the ring."""
    return (num_splits == 1
            and config.shared_bytes(head_dim, itemsize, True, group) <= SHARED_BYTES)


def item_keys(context_len, window, split, *, num_splits: int, block_kv: int):
    """Key range ``[start, end)`` of one split and its first visible key ``lowest``.

    Splits start on a block boundary (so pages never straddle a ring slot) and share the
    visible keys in equal runs of whole blocks; works on scalars and arrays alike.
    """
    lowest = jnp.where(window > 0, jnp.maximum(context_len - window, 0), 0)
    low = _div(lowest, block_kv) * block_kv
    share = _cdiv(_cdiv(context_len - low, num_splits), block_kv) * block_kv
    start = low + split * share
    end = jnp.minimum(context_len, start + share)
    return start, end, lowest


def _kernel(context_len_ref, block_table_ref, order_ref, params_ref, q_ref, pool_ref, *refs,
            cfg: MgpuDecodeConfig, direct: bool, num_programs: int, num_items: int,
            num_splits: int, num_q_rows: int, num_pages: int, num_q_heads: int,
            num_kv_heads: int, page_size: int, head_dim: int, scale: float,
            soft_cap: float | None):
    if direct:
        o_ref, *refs = refs
    else:
        part_ref, lse_ref, *refs = refs
    (q_smem, k_smem, v_smem, exch_smem, stats_smem, o_smem, p_smem,
     q_ready, q_free, kv_ready, kv_free, exch_ready, exch_free) = refs
    block_kv, stages = cfg.block_kv, cfg.num_stages
    group = num_q_heads // num_kv_heads
    q_box = q_box_rows(group)
    stats = stats_smem.shape[-1]
    dtype = q_smem.dtype
    program = lax.axis_index("programs")
    wg = lax.axis_index("wg")
    layer, window = params_ref[0], params_ref[1]

    # Rounds of this program: items are dealt in snake order (p, 2P-1-p, 2P+p, ...).
    full_rounds, rest = divmod(num_items, num_programs)
    last_is_even = full_rounds % 2 == 0
    lane_in_last = program if last_is_even else num_programs - 1 - program
    num_rounds = full_rounds + (lane_in_last < rest).astype(jnp.int32) if rest else full_rounds

    def item(r):
        """Sequence, KV head, split, key range and first q row of round ``r``'s item."""
        lane = jnp.where(lax.rem(r, 2) == 0, program, num_programs - 1 - program)
        index = order_ref[r * num_programs + lane]
        split = lax.rem(index, jnp.int32(num_splits))
        pair = lax.div(index, jnp.int32(num_splits))
        seq, head = lax.div(pair, jnp.int32(num_kv_heads)), lax.rem(pair, jnp.int32(num_kv_heads))
        context_len = context_len_ref[seq]
        start, end, lowest = item_keys(context_len, window, split, num_splits=num_splits,
                                       block_kv=block_kv)
        num_blocks = _cdiv(end - start, block_kv)
        return seq, head, split, context_len, start, end, lowest, num_blocks

    def q_rows(seq, head):
        """First q row of the group, where its box is loaded, and its offset there."""
        row0 = seq * num_q_heads + head * group
        load_at = jnp.minimum(_div(row0, 8) * 8, num_q_rows - q_box)  # both multiples of 8
        return row0, load_at, row0 - load_at

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def load_block(t, seq, head, context_len, first_key):
            slot = lax.rem(t, jnp.int32(stages))
            pool_row = (layer * num_pages * num_kv_heads + head) * 2  # + page * Hkv * 2 + kv
            last_page = jnp.maximum(_cdiv(context_len, page_size) - 1, 0)
            for kv, smem in ((0, k_smem), (1, v_smem)):
                if page_size >= block_kv:  # the block is a slice of one page
                    page = block_table_ref[seq, _div(first_key, page_size)]
                    rows = pool_ref.at[pool_row + page * num_kv_heads * 2 + kv,
                                       pl.ds(lax.rem(first_key, jnp.int32(page_size)), block_kv)]
                    plgpu.copy_gmem_to_smem(rows, smem.at[slot], kv_ready.at[slot])
                    continue
                for i in range(block_kv // page_size):
                    # Pages past the context repeat the last one (their keys are masked).
                    index = jnp.minimum(_div(first_key, page_size) + i, last_page)
                    page = block_table_ref[seq, index]
                    plgpu.copy_gmem_to_smem(pool_ref.at[pool_row + page * num_kv_heads * 2 + kv],
                                            smem.at[slot, pl.ds(i * page_size, page_size)],
                                            kv_ready.at[slot])

        def produce_item(r, t0):
            seq, head, _, context_len, start, _, _, num_blocks = item(r)
            q_slot = lax.rem(r, 2)

            @pl.when(r >= 2)
            def _():
                plgpu.barrier_wait(q_free.at[q_slot])
            _, load_at, _ = q_rows(seq, head)
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(load_at, q_box)],
                                    q_smem.at[q_slot, pl.ds(0, q_box)], q_ready.at[q_slot])

            @pl.loop(0, num_blocks)
            def _block(j):
                t = t0 + j

                @pl.when(t >= stages)
                def _():
                    plgpu.barrier_wait(kv_free.at[lax.rem(t, jnp.int32(stages))])
                load_block(t, seq, head, context_len, start + j * block_kv)
            return t0 + num_blocks

        steps = lax.fori_loop(0, num_rounds, produce_item, jnp.int32(0))

        # Observe the last releases too: every phase of a barrier has a waiter.
        @pl.loop(jnp.maximum(steps - stages, 0), steps)
        def _drain(t):
            plgpu.barrier_wait(kv_free.at[lax.rem(t, jnp.int32(stages))])

        @pl.loop(jnp.maximum(num_rounds - 2, 0), num_rounds)
        def _drain_q(r):
            plgpu.barrier_wait(q_free.at[lax.rem(r, 2)])

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        shape = (ROWS, block_kv)
        key_offset = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
        score_scale = scale if soft_cap else scale * LOG2E
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        p_tile = None if p_smem is None else p_smem.at[wg]

        def rows_to_tile(x, width):
            return lax.broadcast_in_dim(x, (ROWS, width), [0])

        def consume_item(r, t0):
            seq, head, split, _, start, end, lowest, num_blocks = item(r)
            q_slot = lax.rem(r, 2)
            first = lax.rem(wg + t0, 2)  # this consumer's blocks: t0 + j has its parity

            def attend(i, carry):
                acc, row_max, row_sum = carry
                j = first + 2 * i
                slot = lax.rem(t0 + j, jnp.int32(stages))
                plgpu.barrier_wait(kv_ready.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem.at[q_slot], k_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]
                scores = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32)) * score_scale
                if soft_cap:
                    scores = jnp.tanh(scores * (1.0 / soft_cap)) * (soft_cap * LOG2E)
                key = start + j * block_kv + key_offset
                # Every block holds a visible key, so masked scores get exp2(NEG - max) = 0.
                scores = jnp.where((key >= lowest) & (key < end), scores, NEG)
                new_max = jnp.maximum(row_max, scores.max(axis=1))
                alpha = jnp.exp2(row_max - new_max)
                p = jnp.exp2(scores - rows_to_tile(new_max, block_kv))
                row_sum = row_sum * alpha + p.sum(axis=1)
                acc = acc * rows_to_tile(alpha, head_dim)
                p = p.astype(dtype)
                acc = accumulate_pv(acc, p, v_smem.at[slot], p_tile)
                plgpu.barrier_arrive(kv_free.at[slot])
                return acc, new_max, row_sum

            carry = (plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32),
                                       plgpu.Layout.WGMMA),
                     plgpu.layout_cast(jnp.full((ROWS,), NEG, jnp.float32), row_layout),
                     plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout))
            plgpu.barrier_wait(q_ready.at[q_slot])
            acc, row_max, row_sum = lax.fori_loop(0, _div(num_blocks - first + 1, 2), attend,
                                                  carry)
            plgpu.barrier_arrive(q_free.at[q_slot])

            @pl.when(wg == 1)
            def _hand_over():
                @pl.when(r >= 1)
                def _():
                    plgpu.barrier_wait(exch_free)
                exch_smem[...] = acc
                stats_smem.at[0][...] = rows_to_tile(row_max, stats)
                stats_smem.at[1][...] = rows_to_tile(row_sum, stats)
                plgpu.barrier_arrive(exch_ready)

            @pl.when(wg == 0)
            def _merge_and_store():
                plgpu.barrier_wait(exch_ready)
                # (Mosaic GPU finds no bank-conflict-free transfer of untiled d256 rows: its
                # search for one takes minutes there.)
                other_acc = plgpu.load(exch_smem, layout=plgpu.Layout.WGMMA,
                                       optimized=head_dim <= 128)
                other_max = plgpu.load(stats_smem.at[0], layout=plgpu.Layout.WGMMA).max(axis=1)
                other_sum = plgpu.load(stats_smem.at[1], layout=plgpu.Layout.WGMMA).max(axis=1)
                top = jnp.maximum(row_max, other_max)
                mine, theirs = jnp.exp2(row_max - top), jnp.exp2(other_max - top)
                total = row_sum * mine + other_sum * theirs
                merged = (acc * rows_to_tile(mine, head_dim)
                          + other_acc * rows_to_tile(theirs, head_dim))
                out = merged / rows_to_tile(jnp.where(total > 0, total, 1.0), head_dim)
                row0, _, offset = q_rows(seq, head)
                if direct:
                    o_smem[...] = out.astype(dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(offset, group)],
                                            o_ref.at[pl.ds(row0, group)])
                else:
                    lse = jnp.where(total > 0, top + jnp.log2(jnp.maximum(total, 1e-30)), NEG)
                    exch_smem[...] = out
                    stats_smem.at[0][...] = rows_to_tile(lse, stats)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(exch_smem.at[pl.ds(offset, group)],
                                            part_ref.at[split, pl.ds(row0, group)])
                    plgpu.copy_smem_to_gmem(stats_smem.at[0, pl.ds(offset, group)],
                                            lse_ref.at[split, pl.ds(row0, group)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                plgpu.barrier_arrive(exch_free)
            return t0 + num_blocks

        lax.fori_loop(0, num_rounds, consume_item, jnp.int32(0))

        @pl.when((wg == 1) & (num_rounds >= 1))
        def _drain():
            plgpu.barrier_wait(exch_free)

        @pl.when(wg == 0)
        def _flush():
            plgpu.wait_smem_to_gmem(0)


def work_order(context_lens: jax.Array, window, *, num_kv_heads: int, num_splits: int,
               block_kv: int) -> jax.Array:
    """Work item ids ``(seq * Hkv + head) * splits + split``, most keys first."""
    splits = jnp.arange(num_splits, dtype=jnp.int32)
    start, end, _ = item_keys(context_lens[:, None], window, splits[None, :],
                              num_splits=num_splits, block_kv=block_kv)
    keys = jnp.maximum(end - start, 0)  # [B, splits]
    keys = jnp.broadcast_to(keys[:, None, :], (keys.shape[0], num_kv_heads, num_splits))
    return jnp.argsort(-keys.reshape(-1), stable=True).astype(jnp.int32)


def default_splits(batch: int, num_kv_heads: int, max_context: int, block_kv: int,
                   num_programs: int) -> int:
    return balanced_splits(batch * num_kv_heads, -(-max_context // block_kv), num_programs)


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "config", "num_programs",
                                             "num_splits", "interpret"))
def paged_decode_attention_mgpu(q: jax.Array, kv_pool: jax.Array, layer: jax.Array | int,
                                block_tables: jax.Array, context_lens: jax.Array, *,
                                scale: float, soft_cap: float | None = None,
                                sliding_window: jax.Array | int = 0,
                                config: MgpuDecodeConfig = MgpuDecodeConfig(),
                                num_programs: int | None = None, num_splits: int | None = None,
                                interpret: bool = False) -> jax.Array:
    """Attention of ``q [B, Hq, D]`` (one token per sequence) over its paged context.

    ``context_lens [B]`` counts the keys of each sequence, this token's included; 0 gives
    zeros. ``num_programs``: the persistent grid (default: the SMs this process runs on);
    ``num_splits``: key splits per (sequence, KV head) (default: enough to fill the grid).
    ``interpret``: Mosaic GPU interpret mode (CPU); needs ``p_in_registers=False``.
    """
    check_call("paged_decode_attention_mgpu",
               unsupported_reason(q.shape, q.dtype, kv_pool.shape, kv_pool.dtype, config),
               q, kv_pool, config, interpret)
    batch, num_q_heads, head_dim = q.shape
    num_layers, num_pages, num_kv_heads, _, page_size, _ = kv_pool.shape
    group = num_q_heads // num_kv_heads
    block_kv = config.block_kv
    if num_programs is None:
        num_programs = sm_share()
    if num_splits is None:
        num_splits = default_splits(batch, num_kv_heads, block_tables.shape[1] * page_size,
                                    block_kv, num_programs)
    num_items = batch * num_kv_heads * num_splits
    num_programs = max(1, min(num_programs, num_items))
    itemsize = q.dtype.itemsize
    direct = writes_directly(config, num_splits, head_dim, itemsize, group)
    stats = stats_columns(group)

    window = jnp.asarray(sliding_window, jnp.int32)
    context_lens = context_lens.astype(jnp.int32)
    order = work_order(context_lens, window, num_kv_heads=num_kv_heads, num_splits=num_splits,
                       block_kv=block_kv)
    params = jnp.stack([jnp.asarray(layer, jnp.int32), window])
    # q as rows, whole 8-row tiles of them and at least one Q box.
    q_rows = q.reshape(batch * num_q_heads, head_dim)
    padded_rows = max(-(-q_rows.shape[0] // 8) * 8, q_box_rows(group))
    if padded_rows > q_rows.shape[0]:
        q_rows = jnp.pad(q_rows, ((0, padded_rows - q_rows.shape[0]), (0, 0)))
    # One row per (layer, page, kv head, K or V): a 3D view TMA can address.
    pool = kv_pool.reshape(num_layers * num_pages * num_kv_heads * 2, page_size, head_dim)

    tiled = _smem_transforms(head_dim, itemsize)
    # PV's wgmma takes its K (the keys) in groups as wide as the swizzle: P and V
    # are swizzled to fit block_kv.
    pv_tiled = _smem_transforms(block_kv, itemsize)
    stages = config.num_stages
    copies = 2 * max(1, block_kv // page_size)  # TMAs per ring slot: K and V pages
    scratch = [
        plgpu.SMEM((2, ROWS, head_dim), q.dtype, transforms=tiled),
        plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiled),
        plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=pv_tiled),
        plgpu.SMEM((ROWS, head_dim), jnp.float32),  # untiled: any row range stores
        plgpu.SMEM((2, ROWS, stats), jnp.float32),
        plgpu.SMEM((ROWS, head_dim), q.dtype) if direct else None,
        (None if config.p_in_registers else
         plgpu.SMEM((2, ROWS, block_kv), q.dtype, transforms=pv_tiled)),
        plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_arrivals=2, num_barriers=2),
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(),
        plgpu.Barrier(),
    ]
    rows = batch * num_q_heads
    if direct:
        out_type = jax.ShapeDtypeStruct((rows, head_dim), q.dtype)
    else:
        out_type = (jax.ShapeDtypeStruct((num_splits, rows, head_dim), jnp.float32),
                    jax.ShapeDtypeStruct((num_splits, rows, stats), jnp.float32))
    kernel = functools.partial(
        _kernel, cfg=config, direct=direct, num_programs=num_programs, num_items=num_items,
        num_splits=num_splits, num_q_rows=q_rows.shape[0], num_pages=num_pages,
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, page_size=page_size,
        head_dim=head_dim, scale=scale, soft_cap=soft_cap if soft_cap and soft_cap > 0 else None)
    outs = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(num_programs,),
        grid_names=("programs",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_INTERPRET if interpret else None,
        kernel_name="duetjax_paged_decode_mgpu",
    )(context_lens, block_tables.astype(jnp.int32), order, params, q_rows, pool)
    if direct:
        return outs.reshape(q.shape)
    partial_out, partial_lse = outs
    out = combine_splits(partial_out, partial_lse[..., 0])
    return out.reshape(q.shape).astype(q.dtype)
