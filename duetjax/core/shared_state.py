"""The device state DuetServe's processes share: weights, the paged KV pool, penalty counts and
slot tables.

The engine process allocates them once (``SharedState.create``) and its workers attach
(``SharedState.attach``), each through its runner's ``DeviceState`` (``device_state.py``), so the GPU holds one copy of the weights and one KV pool whatever the
number of workers: the pages a prefill worker writes are the pages a decode worker reads. The
scheduler keeps the processes apart: two concurrent steps never touch the same KV slot or the
same penalty row.

On GPU (CUDA IPC) a donated step updates the shared pool in place; ``after_step`` checks once
per executable that XLA really aliased it. On CPU (shared memory, tests) XLA copies donated
imported buffers, so ``after_step`` writes the step's KV slots and penalty rows back.

Slot tables (``sampler.SlotTables``) are written by the engine process only, once per request
before its first step, and only read by steps: ``after_fill`` makes such a write visible to the
workers (on GPU it waits for it, since a worker's step does not follow the engine's on one
stream).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from .sampler import SlotTables, slot_rows
from .shared_buffers import CPU_SHM, AttachedBuffers, BufferSpec, SharedBuffers, SharedHandles, attach
from .step_inputs import StepInputs

KV_POOL = "kv_pool"
TOKEN_COUNTS = "token_counts"
SLOT_TABLE_PREFIX = "slot:"
PARAM_PREFIX = "param:"


def _param_paths(params: Any) -> list[tuple[str, ...]]:
    return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _nest(paths: list[tuple[str, ...]], leaves: list[Any]) -> dict:
    tree: dict = {}
    for path, leaf in zip(paths, leaves):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


@dataclasses.dataclass(frozen=True)
class SharedLayout:
    """What a worker needs to rebuild the shared state: picklable, sent over a private pipe."""

    handles: SharedHandles
    param_paths: tuple[tuple[str, ...], ...]
    """Key path of each parameter in the Flax tree, in the order of the buffers."""


class SharedState:
    def __init__(self, buffers: SharedBuffers | AttachedBuffers, param_paths: list[tuple[str, ...]]):
        self.buffers = buffers
        self.param_paths = list(param_paths)
        self.on_cpu = buffers.backend == CPU_SHM
        self._checked: set[Any] = set()

    @classmethod
    def create(cls, params: Any, kv_pool_shape: tuple[int, ...], kv_dtype: Any,
               token_counts_shape: tuple[int, int]) -> "SharedState":
        """Allocates the shared buffers (zeroed) and copies ``params`` in (the caller drops its
        copy)."""
        paths = _param_paths(params)
        leaves = jax.tree_util.tree_leaves(params)
        specs = [BufferSpec(PARAM_PREFIX + "/".join(p), leaf.shape, leaf.dtype.name)
                 for p, leaf in zip(paths, leaves)]
        specs += [BufferSpec(KV_POOL, kv_pool_shape, np.dtype(kv_dtype).name),
                  BufferSpec(TOKEN_COUNTS, token_counts_shape, "int32")]
        tables = SlotTables.zeros(*token_counts_shape)  # (one row per penalty slot)
        specs += [BufferSpec(SLOT_TABLE_PREFIX + name, leaf.shape, leaf.dtype.name)
                  for name, leaf in _slot_table_items(tables)]
        buffers = SharedBuffers.allocate(specs)
        try:
            for spec, leaf in zip(specs, leaves):
                buffers.fill(spec.name, leaf)
            for name, leaf in _slot_table_items(tables):  # (the bias ids' padding is not 0)
                buffers.fill(SLOT_TABLE_PREFIX + name, leaf)
        except BaseException:
            buffers.close()
            raise
        return cls(buffers, paths)

    @classmethod
    def attach(cls, layout: SharedLayout) -> "SharedState":
        return cls(attach(layout.handles), list(layout.param_paths))

    def layout(self) -> SharedLayout:
        assert isinstance(self.buffers, SharedBuffers), "only the owner hands out its layout"
        return SharedLayout(self.buffers.handles(), tuple(self.param_paths))

    def params(self) -> dict:
        """The parameter tree as zero-copy views (transport dtypes: bfloat16 travels as uint16)."""
        return _nest(self.param_paths, [self.buffers.array(PARAM_PREFIX + "/".join(p))
                                        for p in self.param_paths])

    def kv_pool(self) -> jax.Array:
        return self.buffers.array(KV_POOL)

    def token_counts(self) -> jax.Array:
        return self.buffers.array(TOKEN_COUNTS)

    def slot_tables(self) -> SlotTables:
        return SlotTables(**{name: self.buffers.array(SLOT_TABLE_PREFIX + name)
                             for name in _slot_table_names()})

    @property
    def owner(self) -> bool:
        """The engine process (it allocated the buffers), not a worker."""
        return isinstance(self.buffers, SharedBuffers)

    def after_step(self, kv_pool: jax.Array, token_counts: jax.Array, key: Any,
                   inputs: StepInputs, num_steps: int, page_size: int) -> tuple[jax.Array, jax.Array]:
        """Makes a launched step's writes visible to the other processes (see module doc):
        the KV pool and counts to keep (``kv_pool`` and ``token_counts``: what the step
        returned; ``key`` names its executable)."""
        if not self.on_cpu:
            if key not in self._checked:  # the first run of each executable
                for name, array in ((KV_POOL, kv_pool), (TOKEN_COUNTS, token_counts)):
                    if array.unsafe_buffer_pointer() != self.buffers.array(name).unsafe_buffer_pointer():
                        raise RuntimeError(f"XLA did not update the shared {name} in place "
                                           f"(executable {key}): the processes would diverge")
                self._checked.add(key)
            return kv_pool, token_counts
        pages, offsets = _written_slots(inputs, num_steps, page_size)
        view = self.buffers.numpy_view(KV_POOL)
        pool = np.asarray(kv_pool)  # waits for the step
        view[:, pages, :, :, offsets, :] = pool[:, pages, :, :, offsets, :]
        rows = np.unique(np.asarray(inputs.penalties.slots)[slot_rows(inputs.penalties)])
        if rows.size:
            self.buffers.numpy_view(TOKEN_COUNTS)[rows] = np.asarray(token_counts)[rows]
        return self.kv_pool(), self.token_counts()

    def after_fill(self, tables: SlotTables, slot: int) -> SlotTables:
        """Makes the slot-table row the engine just wrote (``ModelRunner.fill_slot``) visible
        to the workers before any of them runs a step that reads it: the tables to keep."""
        items = _slot_table_items(tables)
        if not self.on_cpu:
            if "fill_slot" not in self._checked:
                for name, array in items:
                    if (array.unsafe_buffer_pointer()
                            != self.buffers.array(SLOT_TABLE_PREFIX + name).unsafe_buffer_pointer()):
                        raise RuntimeError(f"XLA did not update the shared slot table {name} in "
                                           "place: the processes would diverge")
                self._checked.add("fill_slot")
            jax.block_until_ready(tables)
            return tables
        for name, array in items:
            self.buffers.numpy_view(SLOT_TABLE_PREFIX + name)[slot] = np.asarray(array)[slot]
        return self.slot_tables()

    def close(self) -> None:
        self.buffers.close()


def _slot_table_names() -> list[str]:
    return [field.name for field in dataclasses.fields(SlotTables)]


def _slot_table_items(tables: SlotTables) -> list[tuple[str, Any]]:
    return [(name, getattr(tables, name)) for name in _slot_table_names()]


def _written_slots(x: StepInputs, num_steps: int, page: int) -> tuple[np.ndarray, np.ndarray]:
    """(page, offset) of every KV slot a step wrote."""
    if num_steps == 1:
        slots = np.asarray(x.meta.slot_mapping)
        slots = slots[slots >= 0]
    else:
        meta = x.meta
        slots = []
        for row in np.flatnonzero(np.asarray(meta.context_lens) > 0):
            for j in range(min(int(x.valid_steps[row]), num_steps)):
                pos = int(meta.positions[row]) + j
                slots.append(int(meta.block_tables[row, pos // page]) * page + pos % page)
        slots = np.asarray(slots, np.int64)
    return slots // page, slots % page
