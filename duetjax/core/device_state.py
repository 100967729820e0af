"""The device arrays of one process's runner: weights, the paged KV pool, the penalty counts
and the slot tables.

``DeviceState.allocate`` sizes and allocates them in this process's device memory or, for
DuetServe (``shared=True``), in buffers the worker processes attach to (``shared_state.py``:
CUDA IPC through CuPy on GPU, shared memory on CPU); a worker's runner attaches to those
(``DeviceState.attach``). The ``ModelRunner`` that holds a state is its only writer: every
compiled step or slot fill returns the arrays it updated and the runner stores them here, then
calls ``after_step`` / ``after_fill``, which make shared writes visible to the other
processes.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

import pallas_kernels
from models import LoadedModel
from models.kv_scales import KVScales
from models.tensor_parallel import group_size, held_config, kv_pool_spec, replicated
from pallas_kernels.kv_layout import FP8_KV_DTYPE

from ..config import EngineConfig
from .sampler import SlotTables
from .shared_state import SharedLayout, SharedState
from .step_inputs import StepInputs

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class DeviceState:
    params: Any
    """The weights' parameter tree (in shared buffers: transport dtypes, bfloat16 as uint16)."""
    kv_pool: jax.Array
    token_counts: jax.Array
    """int32[max_num_seqs, vocab]: generated-token counts of penalized requests, one row per
    penalty slot."""
    slot_tables: SlotTables
    """What repetition penalties and logit biases read, one row per penalty slot."""
    shared: SharedState | None = None
    """The buffers shared with DuetServe's other processes (None: this process's alone)."""

    @classmethod
    def allocate(cls, params: Any, kv_pool_shape: tuple[int, ...], kv_dtype: Any,
                 token_counts_shape: tuple[int, int], shared: bool = False,
                 mesh: Mesh | None = None) -> "DeviceState":
        """A zeroed KV pool, counts and slot tables beside ``params``; ``shared``: all of them
        in shared buffers, ``params`` copied in (the caller drops its copy). ``mesh``: a
        tensor-parallel group: the pool split by KV heads over it (each device makes its own
        share), the counts and tables on every device."""
        if shared:
            return cls._over(SharedState.create(params, kv_pool_shape, kv_dtype, token_counts_shape))
        if mesh is None:
            return cls(params, jnp.zeros(kv_pool_shape, kv_dtype),
                       jnp.zeros(token_counts_shape, jnp.int32),
                       SlotTables.zeros(*token_counts_shape))
        pool = jax.jit(lambda: jnp.zeros(kv_pool_shape, kv_dtype),
                       out_shardings=NamedSharding(mesh, kv_pool_spec()))()
        everywhere = replicated(mesh)
        return cls(params, pool,
                   jax.device_put(jnp.zeros(token_counts_shape, jnp.int32), everywhere),
                   jax.device_put(SlotTables.zeros(*token_counts_shape), everywhere))

    @classmethod
    def attach(cls, layout: SharedLayout) -> "DeviceState":
        """A worker's view of the engine's shared state."""
        return cls._over(SharedState.attach(layout))

    @classmethod
    def _over(cls, shared: SharedState) -> "DeviceState":
        return cls(shared.params(), shared.kv_pool(), shared.token_counts(), shared.slot_tables(),
                   shared)

    @property
    def owner(self) -> bool:
        """This process allocated the state (the engine's, not a worker's)."""
        return self.shared is None or self.shared.owner

    def after_step(self, key: Any, inputs: StepInputs | None, num_steps: int,
                   page_size: int) -> None:
        """After the runner stored a launched step's KV pool and counts: makes its writes
        visible to the other processes where the state is shared (``key`` names the step's
        executable, ``inputs`` are what it ran)."""
        if self.shared is not None:
            self.kv_pool, self.token_counts = self.shared.after_step(
                self.kv_pool, self.token_counts, key, inputs, num_steps, page_size)

    def after_fill(self, slot: int) -> None:
        """After the runner stored the slot tables with ``slot``'s row written: makes the row
        visible to the workers where the state is shared."""
        if self.shared is not None:
            self.slot_tables = self.shared.after_fill(self.slot_tables, slot)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()


def kv_dtype(model: LoadedModel, config: EngineConfig) -> Any:
    """The KV pool's element type: e4m3 for ``kv_cache_dtype='fp8'``, else the model's dtype."""
    return FP8_KV_DTYPE if config.kv_cache_dtype == "fp8" else model.dtype


def kv_scales(model: LoadedModel, config: EngineConfig) -> KVScales | None:
    """The (K, V) scales the decoder applies, per layer or per layer and KV head: the
    model's for an FP8 pool (None there: 1.0); none for any other pool."""
    return model.kv_scales if config.kv_cache_dtype == "fp8" else None


def _kv_bytes_per_token(model: LoadedModel, config: EngineConfig) -> int:
    """KV bytes of one token on each device: a tensor-parallel group splits its KV heads over
    its devices."""
    devices = group_size(model.mesh)
    cfg = held_config(model.config, devices)
    return pallas_kernels.kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads // devices,
                                             cfg.head_dim, np.dtype(kv_dtype(model, config)).itemsize)


def plan_num_pages(model: LoadedModel, config: EngineConfig, free_bytes: int | None = None) -> int:
    """KV pool pages: ``kv_cache_tokens``, else a share of the free GPU memory (``free_bytes``,
    default what XLA reports), else the CPU default."""
    per_token = _kv_bytes_per_token(model, config)
    tokens = config.kv_cache_tokens
    if tokens is None and jax.default_backend() == "gpu":
        if free_bytes is None:
            stats = jax.devices()[0].memory_stats() or {}
            free_bytes = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
        tokens = int(free_bytes * config.kv_cache_memory_fraction) // per_token
    if tokens is None:
        tokens = config.cpu_kv_cache_tokens
    pages = tokens // config.page_size
    log.info("KV pool: %d pages of %d tokens (%.2f GiB%s)", pages, config.page_size,
             pages * config.page_size * per_token / 2**30, " per device" if group_size(model.mesh) > 1 else "")
    return pages


def shared_kv_bytes(model: LoadedModel, config: EngineConfig) -> int | None:
    """GPU memory a shared KV pool may take (``duet_kv_bytes``); None off the GPU."""
    if jax.default_backend() != "gpu":
        return None
    import cupy

    pairs = config.active_duet_pairs
    return duet_kv_bytes(
        free_bytes=cupy.cuda.runtime.memGetInfo()[0],
        weight_bytes=sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(model.params)),
        workers=len({p for p, _ in pairs}) + len({d for _, d in pairs}),
        worker_reserve_gib=config.duet_worker_reserve_gib,
        kv_tokens=config.kv_cache_tokens, kv_bytes_per_token=_kv_bytes_per_token(model, config))


def duet_kv_bytes(free_bytes: int, weight_bytes: int, workers: int, worker_reserve_gib: float,
                  kv_tokens: int | None, kv_bytes_per_token: int) -> int:
    """GPU memory the KV pool may take in duet mode: what is free once the weights' shared copy
    and every worker's reserve are set aside (the engine loads its weights on the host in duet
    mode, so the free memory holds no other copy). ValueError,
    before anything is allocated, when ``kv_tokens`` asks for more than that."""
    gib = 2**30
    reserve = int(workers * worker_reserve_gib * gib)
    left = free_bytes - weight_bytes - reserve
    if left <= 0 or (kv_tokens is not None and kv_tokens * kv_bytes_per_token > left):
        fits = max(left, 0) // kv_bytes_per_token
        asked = (f"a KV pool of {kv_tokens} tokens ({kv_tokens * kv_bytes_per_token / gib:.1f} GiB)"
                 if kv_tokens is not None else "a KV pool")
        raise ValueError(
            f"duet mode cannot fit {asked}: the GPU has {free_bytes / gib:.1f} GiB free, the "
            f"weights' shared copy takes {weight_bytes / gib:.1f} GiB and {workers} workers "
            f"reserve {reserve / gib:.1f} GiB (duet_worker_reserve_gib), which leaves room for "
            f"{fits} tokens: lower --kv-cache-tokens, or start fewer worker pairs "
            f"(--duet-pairs)")
    return left
