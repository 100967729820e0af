"""Full-sequence logits for a batch of prompts in one ragged step (a checking tool: tests
compare it with reference implementations; serving goes through ``duetjax``)."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels.kv_layout import FP8_KV_DTYPE

from .attention import AttentionMetadata
from .decoder import Decoder, holds_per_layer_weights
from .loader import LoadedModel
from .tensor_parallel import group_size, held_config, kv_pool_spec


@functools.lru_cache(maxsize=16)
def _forward(config, dtype: Any, impl: str, quantization, kv_scales, mesh, per_layer: bool):
    """One jitted forward per (config, dtype, impl, quantization, KV scales, mesh, weight
    layout): repeated calls reuse its compilations."""
    model = Decoder(config, impl=impl, dtype=dtype, quantization=quantization, kv_scales=kv_scales,
                    mesh=mesh, per_layer_weights=per_layer)
    return jax.jit(lambda params, t, kv, m, idx: model.apply({"params": params}, t, kv, m, idx))


def compute_logits(loaded: LoadedModel, prompts: Sequence[Sequence[int]], *, page_size: int = 16,
                   impl: str = "auto", kv_cache_dtype: str = "auto") -> list[np.ndarray]:
    """float32 logits ``[len(prompt), vocab]`` for every position of every prompt;
    ``kv_cache_dtype`` as ``EngineConfig``'s ('fp8': attention reads an e4m3 pool)."""
    if kv_cache_dtype not in ("auto", "fp8"):
        raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {kv_cache_dtype!r}")
    fp8_kv = kv_cache_dtype == "fp8"
    cfg, tokens, pool, meta = prefill_inputs(loaded, prompts, page_size,
                                             FP8_KV_DTYPE if fp8_kv else loaded.dtype)
    forward = _forward(cfg, loaded.dtype, impl, loaded.quantization,
                       loaded.kv_scales if fp8_kv else None, loaded.mesh,
                       holds_per_layer_weights(loaded.params))
    lengths = [len(p) for p in prompts]
    logits, _ = forward(loaded.params, tokens, pool, meta, jnp.arange(sum(lengths), dtype=jnp.int32))
    logits = np.asarray(logits)
    bounds = np.cumsum(lengths)[:-1]
    return list(np.split(logits, bounds))


def prefill_inputs(loaded: LoadedModel, prompts: Sequence[Sequence[int]], page_size: int,
                   pool_dtype: Any) -> tuple[Any, jax.Array, jax.Array, AttentionMetadata]:
    """(the config the devices hold, the prompts' tokens in one ragged step, an empty KV pool
    of ``pool_dtype`` just large enough, the step's metadata)."""
    cfg = held_config(loaded.config, group_size(loaded.mesh))
    lengths = [len(p) for p in prompts]
    if min(lengths, default=0) < 1:
        raise ValueError("every prompt needs at least one token")
    pages_per_seq = [-(-n // page_size) for n in lengths]
    max_pages = max(pages_per_seq)
    block_tables = np.zeros((len(prompts), max_pages), np.int32)
    slots, first_page = [], 0
    for s, (n, p) in enumerate(zip(lengths, pages_per_seq)):
        block_tables[s, :p] = np.arange(first_page, first_page + p)
        slots.extend(first_page * page_size + i for i in range(n))
        first_page += p
    pool = jnp.zeros(pallas_kernels.kv_pool_shape(cfg.num_layers, first_page, cfg.num_kv_heads,
                                                  page_size, cfg.head_dim), pool_dtype)
    if loaded.mesh is not None:
        pool = jax.device_put(pool, jax.sharding.NamedSharding(loaded.mesh, kv_pool_spec()))
    meta = AttentionMetadata(
        positions=jnp.asarray(np.concatenate([np.arange(n) for n in lengths]), jnp.int32),
        slot_mapping=jnp.asarray(slots, jnp.int32),
        block_tables=jnp.asarray(block_tables),
        context_lens=jnp.asarray(lengths, jnp.int32),
        query_start_loc=jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32))
    tokens = jnp.asarray(np.concatenate([np.asarray(p) for p in prompts]), jnp.int32)
    return cfg, tokens, pool, meta
