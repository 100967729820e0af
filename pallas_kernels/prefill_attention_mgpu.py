"""Ragged paged prefill attention for Hopper, written with Pallas Mosaic GPU.

Same contract as ``prefill_attention.paged_prefill_attention`` (batch convention of
``reference``), with an FA3-style schedule:

- A program owns one query head and ``2 * block_q`` consecutive new tokens of one sequence,
  and runs three warpgroups. Two consumer warpgroups take ``block_q`` (64, wgmma's M) tokens
  each; a producer warpgroup streams K/V tiles of ``block_kv`` keys into a ``num_stages``-deep
  shared-memory ring.
- Rows are tokens of one head, not (token, group head) pairs: a Q or O tile is then one 2D TMA
  box (tokens x head_dim, strided by the heads), the causal mask is one compare of two iotas,
  and at 128 rows x 128 keys a tile already does 128 FLOP per byte it brings into shared
  memory. The group's heads are adjacent programs, so a K/V tile read by one is in L2 for the
  others.
- K/V come in whole pages: one TMA per page (a 16-token page of d128 bf16 is 4 KiB) into its
  rows of the tile, all copies of a tile counted on one barrier. Pages past the sequence's
  last are never read; the tile's keys past the context get zero weight.
- Online softmax in registers (base 2), masks only on the causal diagonal and the sliding
  window's edge: each warpgroup walks its steps in five ranges (skipped before its window,
  window edge, unmasked, diagonal, skipped after its last key). Skipped steps still wait for
  the data and release the slot, so every barrier's phases stay in step.
- A schedule barrier alternates the two consumers, so one's softmax overlaps the other's
  matmuls (``schedule_barrier``).
- PV takes P from registers (``p_in_registers``, what the GPU should run) or through shared
  memory: Mosaic GPU interpret mode (the CPU tests) supports neither a register A operand of
  wgmma nor ``pl.run_state``, so the CPU tests run the second form.
- Ragged rows: Q tiles are loaded at a start clamped to stay inside ``q`` (rows outside the
  warpgroup's tokens compute and are dropped) and outputs are stored with a ladder of
  power-of-two TMA boxes that covers exactly the valid rows, so neighbours are never written.
  A TMA into a tiled (wgmma) tile addresses whole 8-row tiles of ``q``, so a Q tile, which
  starts at any token, lands in an untiled tile and registers copy it into the tiled one.
- Programs run heaviest first (the last q blocks of a sequence see the most keys).

Tokens of the padding pseudo-sequence (past ``query_start_loc[S]``) come out as zeros;
``skip_single_token`` leaves the rows of one-token sequences unwritten, as the Triton kernel.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .kv_layout import is_fp8
from .paged_tiles import LOG2E, NEG
from .prefill_attention import q_block_map

HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class MgpuPrefillConfig:
    block_q: int = 64
    """Tokens per consumer warpgroup (wgmma's M); a program takes two such tiles."""
    block_kv: int = 128
    """Keys per pipeline step."""
    num_stages: int = 2
    """K/V tiles in flight in the shared-memory ring."""
    p_in_registers: bool = True
    """PV's A operand from registers (FA3); False goes through shared memory."""
    schedule_barrier: bool = True
    """Alternate the two consumers' matmuls and softmax."""

    def shared_bytes(self, head_dim: int, itemsize: int) -> int:
        q_and_o = 2 * 2 * self.block_q * head_dim * itemsize
        kv = self.num_stages * 2 * self.block_kv * head_dim * itemsize
        p = 0 if self.p_in_registers else 2 * self.block_q * self.block_kv * itemsize
        return q_and_o + kv + p


# Hopper gives a block 227 KiB of shared memory; keep a little for barriers.
SHARED_BYTES = 225 * 1024
_INTERPRET = plgpu.InterpretGPUParams()


def unsupported_reason(q_shape, q_dtype, kv_pool_shape, kv_dtype,
                       config: MgpuPrefillConfig) -> str | None:
    """Why this kernel cannot run the shape (None when it can)."""
    _, num_q_heads, head_dim = q_shape
    num_kv_heads, page_size = kv_pool_shape[2], kv_pool_shape[4]
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} not in {HEAD_DIMS}"
    if is_fp8(kv_dtype):
        return ("an FP8 KV pool: TMA lands K/V tiles in shared memory as wgmma reads them, so "
                "dequantizing would need a second pass through shared memory (Triton runs it)")
    if jnp.dtype(q_dtype) not in map(jnp.dtype, DTYPES) or jnp.dtype(kv_dtype) != jnp.dtype(q_dtype):
        return f"q/kv dtypes {q_dtype}/{kv_dtype}: need both bf16 or both f16"
    if num_q_heads % num_kv_heads:
        return f"{num_q_heads} q heads not a multiple of {num_kv_heads} kv heads"
    if page_size % 8 or (config.block_kv % page_size and page_size % config.block_kv):
        return f"page size {page_size} does not tile block_kv {config.block_kv} (8-row TMA tiles)"
    if config.block_q != 64 or config.block_kv % 32:
        return f"block_q must be 64 and block_kv a multiple of 32, got {config}"
    need = config.shared_bytes(head_dim, jnp.dtype(q_dtype).itemsize)
    if need > SHARED_BYTES:
        return f"{config} needs {need} bytes of shared memory at d{head_dim}"
    return None


def _smem_transforms(minor: int, itemsize: int):
    """Tiling and swizzle wgmma reads: rows of up to 128 bytes, 8-row tiles."""
    swizzle = min(128, minor * itemsize)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _div(a, b: int):
    """Floor division of a scalar clamped at zero (Mosaic lowers only truncating division)."""
    return lax.div(jnp.maximum(a, 0), jnp.int32(b))


def _cdiv(a, b: int):
    return _div(a + b - 1, b)


def accumulate_pv(acc, p, v_tile, p_smem=None):
    """``acc + p @ v_tile`` on the tensor cores: P straight from registers (the GPU's path), or
    through ``p_smem`` when given (Mosaic GPU interpret mode takes no register operand for
    wgmma)."""
    if p_smem is None:
        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p, v_tile)
        return pl.run_state(pv)(plgpu.ACC.init(acc))
    p_smem[...] = p
    plgpu.commit_smem()

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, v_tile)
        return acc_ref[...]
    return acc + pl.run_scoped(pv, plgpu.ACC(acc.shape, jnp.float32))


def check_call(kernel: str, reason: str | None, q: jax.Array, kv_pool: jax.Array, config,
               interpret: bool) -> None:
    """Refuses a call ``kernel`` cannot run: ``reason`` (its ``unsupported_reason``), or P in
    registers in interpret mode."""
    if reason:
        raise ValueError(f"{kernel}: {reason} (q {q.shape} {q.dtype}, "
                         f"pool {kv_pool.shape} {kv_pool.dtype})")
    if interpret and config.p_in_registers:
        raise ValueError("Mosaic GPU interpret mode runs neither wgmma with a register operand "
                         "nor pl.run_state: use p_in_registers=False")


def _kernel(start_loc_ref, context_len_ref, block_table_ref, block_seq_ref, block_first_ref,
            params_ref, q_ref, pool_ref, o_ref,
            q_smem, k_smem, v_smem, rows_smem, p_smem,
            q_ready, k_ready, v_ready, k_free, v_free, schedule,
            *, cfg: MgpuPrefillConfig, num_seqs: int, num_blocks: int, num_tokens: int,
            num_pages: int, num_kv_heads: int, group: int, page_size: int, head_dim: int,
            scale: float, soft_cap: float | None):
    block_q, block_kv, stages = cfg.block_q, cfg.block_kv, cfg.num_stages
    dtype = q_smem.dtype
    head = lax.axis_index("heads")
    block = num_blocks - 1 - lax.axis_index("blocks")  # heaviest blocks first
    wg = lax.axis_index("wg")
    layer, window = params_ref[0], params_ref[1]

    # The program's sequence and key range (every warpgroup computes the same scalars).
    seq, first = block_seq_ref[block], block_first_ref[block]
    table_seq = jnp.minimum(seq, num_seqs - 1)  # the padding pseudo-sequence reads no keys
    q_start = start_loc_ref[seq]
    q_len = start_loc_ref[seq + 1] - q_start
    prefix = context_len_ref[seq] - q_len  # position of the sequence's first new token
    high = jnp.where(first < q_len,
                     jnp.maximum(prefix + jnp.minimum(first + 2 * block_q, q_len), 0), 0)
    low = jnp.where(window > 0, jnp.maximum(prefix + first - window + 1, 0), 0)
    low = _div(low, block_kv) * block_kv  # steps start on a page boundary
    num_steps = _cdiv(high - low, block_kv)

    def perform_schedule_barrier():
        if cfg.schedule_barrier:
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, jnp.int32(group))
        last_page = jnp.maximum(_cdiv(high, page_size) - 1, 0)
        pool_row = (layer * num_pages * num_kv_heads + kv_head) * 2  # + page * Hkv * 2 + kv

        def load_tile(step, kv: int, smem, ready):
            first_key = low + step * block_kv
            if page_size >= block_kv:  # the tile is a slice of one page
                page = block_table_ref[table_seq, _div(first_key, page_size)]
                rows = pool_ref.at[pool_row + page * num_kv_heads * 2 + kv,
                                   pl.ds(lax.rem(first_key, jnp.int32(page_size)), block_kv)]
                plgpu.copy_gmem_to_smem(rows, smem, ready)
                return
            for i in range(block_kv // page_size):
                # Pages past the context repeat the last one (its keys get zero weight).
                index = jnp.minimum(_div(first_key, page_size) + i, last_page)
                page = block_table_ref[table_seq, index]
                plgpu.copy_gmem_to_smem(pool_ref.at[pool_row + page * num_kv_heads * 2 + kv],
                                        smem.at[pl.ds(i * page_size, page_size)], ready)

        @pl.loop(0, num_steps)
        def _step(step):
            slot = lax.rem(step, jnp.int32(stages))

            @pl.when(step >= stages)
            def _():
                plgpu.barrier_wait(k_free.at[slot])
            load_tile(step, 0, k_smem.at[slot], k_ready.at[slot])

            @pl.when(step >= stages)
            def _():
                plgpu.barrier_wait(v_free.at[slot])
            load_tile(step, 1, v_smem.at[slot], v_ready.at[slot])

        # Observe the last releases too: every phase of a barrier has a waiter.
        @pl.loop(jnp.maximum(num_steps - stages, 0), num_steps)
        def _drain(step):
            slot = lax.rem(step, jnp.int32(stages))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        token0 = first + wg * block_q  # within the sequence
        rows = jnp.clip(q_len - token0, 0, block_q)
        row0 = q_start + token0  # in q
        load_at = jnp.minimum(row0, num_tokens - block_q)  # the Q box stays inside q
        offset = row0 - load_at
        # Into the untiled tile: the box starts at any token (see the module docstring).
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(load_at, block_q), head], rows_smem.at[wg],
                                q_ready.at[wg])

        # Step ranges of this warpgroup (see the module docstring).
        pos_min = prefix + token0
        pos_max = pos_min + rows - 1
        end = jnp.where(rows > 0, _cdiv(pos_max + 1 - low, block_kv), 0)
        has_window = window > 0
        skip_end = jnp.where(has_window, jnp.minimum(_div(pos_min - window + 1 - low, block_kv), end), 0)
        window_end = jnp.where(has_window, jnp.clip(_cdiv(pos_max - window + 1 - low, block_kv),
                                                    skip_end, end), 0)
        causal_start = jnp.maximum(window_end, jnp.minimum(_div(pos_min + 1 - low, block_kv), end))

        shape = (block_q, block_kv)
        p_tile = None if p_smem is None else p_smem.at[wg]
        position = (pos_min - offset) + plgpu.broadcasted_iota(
            jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
        key_offset = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
        score_scale = scale if soft_cap else scale * LOG2E

        def skip(step, carry):
            slot = lax.rem(step, jnp.int32(stages))
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            perform_schedule_barrier()
            perform_schedule_barrier()
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            return carry

        def attend(step, carry, masked: bool):
            acc, row_max, row_sum = carry
            slot = lax.rem(step, jnp.int32(stages))
            plgpu.barrier_wait(k_ready.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
                perform_schedule_barrier()
                return acc_ref[...]
            scores = pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])

            scores = scores * score_scale
            if soft_cap:
                scores = jnp.tanh(scores * (1.0 / soft_cap)) * (soft_cap * LOG2E)
            if masked:
                key = low + step * block_kv + key_offset
                visible = (key <= position) & ((window <= 0) | (position - key < window))
                scores = jnp.where(visible, scores, NEG)
            new_max = jnp.maximum(row_max, scores.max(axis=1))
            alpha = jnp.exp2(row_max - new_max)
            p = jnp.exp2(scores - lax.broadcast_in_dim(new_max, shape, [0]))
            if masked:  # a row with no visible key here would get exp2(NEG - NEG) = 1
                p = jnp.where(visible, p, 0.0)
            row_sum = row_sum * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p = p.astype(dtype)

            if cfg.schedule_barrier:
                plgpu.barrier_arrive(schedule)  # softmax done
            plgpu.barrier_wait(v_ready.at[slot])
            if cfg.schedule_barrier:
                plgpu.barrier_wait(schedule)  # the tensor cores are free
            acc = accumulate_pv(acc, p, v_smem.at[slot], p_tile)
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, new_max, row_sum

        carry = (plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA),
                 plgpu.layout_cast(jnp.full((block_q,), NEG, jnp.float32),
                                   plgpu.Layout.WGMMA.reduce(1)),
                 plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32),
                                   plgpu.Layout.WGMMA.reduce(1)))
        plgpu.barrier_wait(q_ready.at[wg])
        # (Mosaic GPU has no bank-conflict-free transfer of untiled d256 rows.)
        q_smem.at[wg][...] = plgpu.load(rows_smem.at[wg], layout=plgpu.Layout.WGMMA,
                                        optimized=head_dim <= 128)
        plgpu.commit_smem()
        pl.when(wg == 1)(perform_schedule_barrier)
        masked = functools.partial(attend, masked=True)
        unmasked = functools.partial(attend, masked=False)
        lax.fori_loop(0, skip_end, skip, None)
        carry = lax.fori_loop(skip_end, window_end, masked, carry)
        carry = lax.fori_loop(window_end, causal_start, unmasked, carry)
        acc, _, row_sum = lax.fori_loop(causal_start, end, masked, carry)
        lax.fori_loop(end, num_steps, skip, None)
        pl.when(wg == 0)(perform_schedule_barrier)

        out = acc / lax.broadcast_in_dim(jnp.where(row_sum > 0, row_sum, 1.0), acc.shape, [0])
        rows_smem.at[wg][...] = out.astype(dtype)
        plgpu.commit_smem()
        # TMA boxes have static sizes: store `rows` rows as a ladder of power-of-two boxes.
        start = offset
        size = block_q
        while size:
            @pl.when(rows & size != 0)
            def _store(start=start, size=size):
                plgpu.copy_smem_to_gmem(rows_smem.at[wg, pl.ds(start, size)],
                                        o_ref.at[pl.ds(load_at + start, size), head])
            start = start + (rows & size)
            size //= 2
        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "config", "interpret",
                                             "skip_single_token"))
def paged_prefill_attention_mgpu(q: jax.Array, kv_pool: jax.Array, layer: jax.Array | int,
                                 block_tables: jax.Array, context_lens: jax.Array,
                                 query_start_loc: jax.Array, *, scale: float,
                                 soft_cap: float | None = None,
                                 sliding_window: jax.Array | int = 0,
                                 config: MgpuPrefillConfig = MgpuPrefillConfig(),
                                 interpret: bool = False,
                                 skip_single_token: bool = False) -> jax.Array:
    """Ragged paged attention of ``q [T, Hq, D]``; batch convention of ``reference``.

    ``interpret``: run in Mosaic GPU interpret mode (CPU); needs ``p_in_registers=False``.
    """
    check_call("paged_prefill_attention_mgpu",
               unsupported_reason(q.shape, q.dtype, kv_pool.shape, kv_pool.dtype, config),
               q, kv_pool, config, interpret)
    num_tokens, num_q_heads, head_dim = q.shape
    num_layers, num_pages, num_kv_heads, _, page_size, _ = kv_pool.shape
    num_seqs = context_lens.shape[0]
    block_q, block_kv = config.block_q, config.block_kv
    # Rows are clamped into q for loading: give q at least one full tile.
    padded_tokens = max(num_tokens, block_q)
    if padded_tokens > num_tokens:
        q = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    block_seq, block_first, start_loc = q_block_map(query_start_loc, num_tokens, 1, 2 * block_q,
                                                    skip_single_token)
    num_blocks = block_seq.shape[0]
    context_lens = jnp.concatenate([context_lens.astype(jnp.int32), jnp.zeros((1,), jnp.int32)])
    params = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(sliding_window, jnp.int32)])
    # One row per (layer, page, kv head, K or V): a 3D view TMA can address (it takes <= 5D).
    pool = kv_pool.reshape(num_layers * num_pages * num_kv_heads * 2, page_size, head_dim)

    itemsize = q.dtype.itemsize
    tiled = _smem_transforms(head_dim, itemsize)
    # PV's wgmma takes its K (the keys) in groups as wide as the swizzle: P and V
    # are swizzled to fit block_kv.
    pv_tiled = _smem_transforms(block_kv, itemsize)
    scratch = [
        plgpu.SMEM((2, block_q, head_dim), q.dtype, transforms=tiled),
        plgpu.SMEM((config.num_stages, block_kv, head_dim), q.dtype, transforms=tiled),
        plgpu.SMEM((config.num_stages, block_kv, head_dim), q.dtype, transforms=pv_tiled),
        plgpu.SMEM((2, block_q, head_dim), q.dtype),  # untiled: Q in and O out at any row
        (None if config.p_in_registers else
         plgpu.SMEM((2, block_q, block_kv), q.dtype, transforms=pv_tiled)),
        plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_arrivals=max(1, block_kv // page_size), num_barriers=config.num_stages),
        plgpu.Barrier(num_arrivals=max(1, block_kv // page_size), num_barriers=config.num_stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=config.num_stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=config.num_stages),
        plgpu.Barrier(num_arrivals=2),
    ]
    kernel = functools.partial(
        _kernel, cfg=config, num_seqs=num_seqs, num_blocks=num_blocks,
        num_tokens=padded_tokens, num_pages=num_pages, num_kv_heads=num_kv_heads,
        group=num_q_heads // num_kv_heads, page_size=page_size, head_dim=head_dim, scale=scale,
        soft_cap=soft_cap if soft_cap and soft_cap > 0 else None)
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((padded_tokens, num_q_heads, head_dim), q.dtype),
        scratch_types=scratch,
        grid=(num_q_heads, num_blocks),
        grid_names=("heads", "blocks"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_INTERPRET if interpret else None,
        kernel_name="duetjax_paged_prefill_mgpu",
    )(start_loc, context_lens, block_tables.astype(jnp.int32), block_seq, block_first, params,
      q, pool)
    return out[:num_tokens]
