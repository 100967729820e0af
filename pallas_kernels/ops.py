"""Public entry points: write_kv and paged_attention, dispatched to a kernel or the reference.

``impl``: "auto" (Pallas on GPU, plain XLA elsewhere), "pallas", "interpret" (Pallas in
interpret mode, for CPU tests), "xla" (page loop in plain XLA ops: the CPU path) or
"reference" (the oracle: simple, but its cost grows with the block table's width).

Kernels on the GPU: ``DUETJAX_PREFILL_KERNEL`` and ``DUETJAX_DECODE_KERNEL`` pick each once per
process. "triton" is the Triton-lowered kernel; "mgpu" is the Mosaic GPU kernel on Hopper
(compute capability 9.x) for the shapes it supports, Triton for the rest and on other GPUs
(FP8 pools among them). Defaults: "mgpu" for prefill (1.7x Triton's rate on an H100: 459
against 273 TFLOP/s over 8k causal tokens), "triton" for decode.

``kv_scale``: float32 ``[2]`` or ``[2, num_kv_heads]``, one layer's K and V scales of an FP8
pool, per layer or per KV head (``kv_layout``); None: 1.0. Checked here, once, for every path.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from . import reference, tuning
from .decode_attention import paged_decode_attention
from .decode_attention_mgpu import paged_decode_attention_mgpu
from .kv_layout import scales_for
from .kv_write import write_kv_pallas
from .prefill_attention import paged_prefill_attention
from .prefill_attention_mgpu import paged_prefill_attention_mgpu
from .xla_attention import paged_attention_xla

IMPLS = ("auto", "pallas", "interpret", "xla", "reference")
KERNELS = ("triton", "mgpu")
PREFILL_KERNELS = KERNELS


def _kernel_choice(variable: str, setting: str | None, compute_capability: str | None,
                   default: str) -> str:
    """"triton" or "mgpu" from ``setting``, else the environment ``variable``, else
    ``default``, and the GPU.

    Mosaic GPU's kernels need Hopper's TMA and wgmma: elsewhere "mgpu" falls back to Triton.
    """
    setting = setting or os.environ.get(variable) or default
    if setting not in KERNELS:
        raise ValueError(f"{variable}={setting!r}; choose one of {KERNELS}")
    if compute_capability is None:
        compute_capability = getattr(jax.devices()[0], "compute_capability", "")
    return setting if str(compute_capability).startswith("9.") else "triton"


def prefill_kernel_choice(setting: str | None = None, compute_capability: str | None = None) -> str:
    return _kernel_choice("DUETJAX_PREFILL_KERNEL", setting, compute_capability, "mgpu")


def decode_kernel_choice(setting: str | None = None, compute_capability: str | None = None) -> str:
    return _kernel_choice("DUETJAX_DECODE_KERNEL", setting, compute_capability, "triton")


@functools.cache
def prefill_kernel() -> str:
    """The prefill kernel of this process (decided on first use)."""
    return prefill_kernel_choice()


@functools.cache
def decode_kernel() -> str:
    """The decode kernel of this process (decided on first use)."""
    return decode_kernel_choice()


def kernel_supports(head_dim: int) -> bool:
    """Triton tiles need power-of-two extents: head dims like 80 or 96 take the XLA path."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def resolve_impl(impl: str, head_dim: int | None = None) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        gpu = jax.default_backend() == "gpu"
        return "pallas" if gpu and (head_dim is None or kernel_supports(head_dim)) else "xla"
    if impl in ("pallas", "interpret") and head_dim is not None and not kernel_supports(head_dim):
        raise ValueError(f"the Pallas kernels need a power-of-two head_dim >= 16, got {head_dim}; "
                         "use impl='auto' (falls back to the XLA path) or 'xla'")
    return impl


def _checked_scale(kv_pool: jax.Array, kv_scale: jax.Array | None) -> jax.Array | None:
    """``kv_scale`` as float32 ``[2, num_kv_heads]``; a scale for a pool that is not FP8, or
    of another shape, is a ValueError."""
    return None if kv_scale is None else scales_for(kv_pool, kv_scale)


def write_kv(kv_pool: jax.Array, layer, k: jax.Array, v: jax.Array, slot_mapping: jax.Array, *,
             kv_scale: jax.Array | None = None, impl: str = "auto") -> jax.Array:
    """Writes new K/V ``[T, Hkv, D]`` into the pool at ``slot_mapping [T]`` (in place under
    donation); an FP8 pool stores them quantized with ``kv_scale``."""
    impl = resolve_impl(impl, k.shape[-1])
    kv_scale = _checked_scale(kv_pool, kv_scale)
    if impl in ("reference", "xla"):
        return reference.write_kv_reference(kv_pool, layer, k, v, slot_mapping, kv_scale)
    return write_kv_pallas(kv_pool, layer, k, v, slot_mapping, kv_scale,
                           interpret=impl == "interpret")


def paged_attention(q: jax.Array, kv_pool: jax.Array, layer, block_tables: jax.Array,
                    context_lens: jax.Array, query_start_loc: jax.Array, *, scale: float,
                    soft_cap: float | None = None, sliding_window=0, decode_only: bool = False,
                    kv_scale: jax.Array | None = None, impl: str = "auto") -> jax.Array:
    """Ragged paged attention over the pool; see ``reference`` for the batch convention.

    ``decode_only`` (static) promises one new token per sequence (T == S): the decode kernel
    alone. Otherwise the prefill kernel runs the sequences with several new tokens and the
    decode kernel those with one. The Pallas kernels take their tiles from ``tuning``.
    """
    impl = resolve_impl(impl, q.shape[-1])
    kv_scale = _checked_scale(kv_pool, kv_scale)
    if impl == "reference":
        return reference.paged_attention_reference(
            q, kv_pool, layer, block_tables, context_lens, query_start_loc, scale=scale,
            soft_cap=soft_cap, sliding_window=sliding_window, kv_scale=kv_scale)
    if impl == "xla":
        return paged_attention_xla(
            q, kv_pool, layer, block_tables, context_lens, query_start_loc, scale=scale,
            soft_cap=soft_cap, sliding_window=sliding_window, kv_scale=kv_scale)
    interpret = impl == "interpret"
    if decode_only:
        return _decode(q, kv_pool, layer, block_tables, context_lens, scale=scale,
                       soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret,
                       kv_scale=kv_scale)
    # A mixed batch: sequences with one new token (the decodes riding along) go through the
    # decode kernel, the rest through the prefill kernel. In the prefill kernel each decode
    # would fill a whole block_m-row tile for `group` useful rows: an 8B step with 64 decodes
    # at 2k context spent milliseconds there.
    out = _prefill(q, kv_pool, layer, block_tables, context_lens, query_start_loc, scale=scale,
                   soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret,
                   kv_scale=kv_scale)
    single = query_start_loc[1:] - query_start_loc[:-1] == 1
    token = jnp.maximum(query_start_loc[1:] - 1, 0)
    decoded = _decode(q[token], kv_pool, layer, block_tables,
                      jnp.where(single, context_lens, 0), scale=scale, soft_cap=soft_cap,
                      sliding_window=sliding_window, interpret=interpret, kv_scale=kv_scale)
    rows = jnp.where(single, token, q.shape[0])  # out of range: dropped
    return out.at[rows].set(decoded, mode="drop")


def _prefill(q: jax.Array, kv_pool: jax.Array, layer, block_tables: jax.Array,
             context_lens: jax.Array, query_start_loc: jax.Array, *, scale: float,
             soft_cap: float | None, sliding_window, interpret: bool,
             kv_scale: jax.Array) -> jax.Array:
    """The chosen prefill kernel, one-token sequences skipped (they go to the decode kernel)."""
    if (not interpret and prefill_kernel() == "mgpu"
            and tuning.prefill_mgpu_supports(q.shape, q.dtype, kv_pool.shape, kv_pool.dtype)):
        return paged_prefill_attention_mgpu(
            q, kv_pool, layer, block_tables, context_lens, query_start_loc, scale=scale,
            soft_cap=soft_cap, sliding_window=sliding_window,
            config=tuning.prefill_mgpu_config(q.shape[2]), skip_single_token=True)
    cfg = tuning.prefill_config(q.shape[2], kv_pool.dtype.itemsize)
    return paged_prefill_attention(
        q, kv_pool, layer, block_tables, context_lens, query_start_loc, scale=scale,
        soft_cap=soft_cap, sliding_window=sliding_window, block_m=cfg.block_m,
        block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        interpret=interpret, skip_single_token=True, kv_scale=kv_scale)


def _decode(q: jax.Array, kv_pool: jax.Array, layer, block_tables: jax.Array,
            context_lens: jax.Array, *, scale: float, soft_cap: float | None, sliding_window,
            interpret: bool, kv_scale: jax.Array) -> jax.Array:
    """The chosen decode kernel with the tuning table's tiles for this shape."""
    if (not interpret and decode_kernel() == "mgpu"
            and tuning.decode_mgpu_supports(q.shape, q.dtype, kv_pool.shape, kv_pool.dtype)):
        return paged_decode_attention_mgpu(
            q, kv_pool, layer, block_tables, context_lens, scale=scale, soft_cap=soft_cap,
            sliding_window=sliding_window, config=tuning.decode_mgpu_config(q.shape[2]))
    cfg = tuning.decode_config(q.shape[2], q.shape[0], kv_pool.shape[2],
                               block_tables.shape[1] * kv_pool.shape[4], kv_pool.dtype.itemsize)
    return paged_decode_attention(
        q, kv_pool, layer, block_tables, context_lens, scale=scale, soft_cap=soft_cap,
        sliding_window=sliding_window, block_k=cfg.block_k, num_splits=cfg.num_splits,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, interpret=interpret,
        kv_scale=kv_scale)
