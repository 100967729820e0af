"""Tensor parallelism over the devices of one host, Megatron-style.

A mesh of one axis, ``AXIS``, holds the group. Each decoder layer splits like Megatron-LM's:

- ``qkv_proj`` and ``gate_up_proj`` by output rows (each device computes its own heads and its
  share of the MLP's intermediate features), ``o_proj`` and ``down_proj`` by input columns, so
  each layer's two products end in one all-reduce each, which XLA inserts from the shardings;
- the embedding and the LM head by vocabulary (the lookup becomes a masked gather and an
  all-reduce, the logits are gathered whole before sampling);
- norms, biases after an all-reduce and FP8 scales of the column-split layers are replicated;
- the KV pool by KV heads, and attention runs per device under ``shard_map`` (each device
  attends its own heads over its own share of the pool).

A fused param's rows are stored *shard-major* (``fused_rows``): device d's block of rows is
[its q heads; its k heads; its v heads] (or [its gate rows; its up rows]), so a plain split
of the rows into equal blocks is the Megatron split, and the layer splits its output per
device (``split_fused``). With one device that order is HF's concatenation.

When the group is larger than the number of KV heads, each KV head is repeated so that every
device holds the KV heads its query heads read (``kv_heads_held``), as vLLM does: the KV pool
then holds ``group`` heads, each device one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels.kv_layout import HEAD_AXIS

from .config import ModelConfig

AXIS = "tp"
"""The mesh axis of the tensor-parallel group."""

ROW_SPLIT = ("qkv_proj", "gate_up_proj")
"""Layers whose output rows (weights, biases, FP8 scales) split over the group."""
COLUMN_SPLIT = ("o_proj", "down_proj")
"""Layers whose weights' input columns split over the group (an all-reduce follows)."""
VOCAB_SPLIT = ("embed_tokens", "lm_head")
"""Tables whose vocabulary rows split over the group."""


class TensorParallelError(ValueError):
    """A model or checkpoint that cannot split over the group as asked: ``problem`` follows
    the group size in a sentence (the engine names its option before it)."""

    def __init__(self, problem: str):
        super().__init__(f"tensor_parallel_size {problem}")
        self.problem = problem


def make_mesh(size: int) -> Mesh | None:
    """The group over the first ``size`` local devices; None for one device (no mesh: the
    single-device path, unchanged)."""
    if size == 1:
        return None
    return Mesh(np.asarray(jax.local_devices()[:size]), (AXIS,))


def group_size(mesh: Mesh | None) -> int:
    """Devices in the group (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape[AXIS]


def check(config: ModelConfig, size: int) -> None:
    """TensorParallelError when ``config`` cannot split over ``size`` devices."""
    if size == 1:
        return
    kv = config.num_kv_heads
    problems = [
        f"num_attention_heads ({config.num_heads})" if config.num_heads % size else None,
        f"intermediate_size ({config.intermediate_size})" if config.intermediate_size % size else None,
        f"vocab_size ({config.vocab_size})" if config.vocab_size % size else None,
    ]
    if kv % size and size % kv:
        problems.append(f"num_key_value_heads ({kv}), nor is it a multiple of them")
    problems = [p for p in problems if p]
    if problems:
        raise TensorParallelError(f"{size} does not divide the model's {', '.join(problems)}")


def kv_heads_held(config: ModelConfig, size: int) -> int:
    """KV heads across the group: the model's, or ``size`` when each device needs a copy of
    one (fewer KV heads than devices)."""
    return max(config.num_kv_heads, size)


def held_config(config: ModelConfig, size: int) -> ModelConfig:
    """The geometry the group holds: ``config`` with ``kv_heads_held`` KV heads (the model
    code and the KV pool read it; GQA grouping stays right because each repeated head sits
    beside the query heads that read it)."""
    heads = kv_heads_held(config, size)
    return config if heads == config.num_kv_heads else dataclasses.replace(config, num_kv_heads=heads)


def fused_rows(rows: np.ndarray, members: Sequence[tuple[str, int]], config: ModelConfig,
               size: int) -> np.ndarray:
    """One layer's fused tensor (weight, bias or FP8 scale: its ``members``, (HF name, rows),
    concatenated on axis 0 in that order, for ``config``'s own geometry) in the group's
    layout: KV heads repeated to ``kv_heads_held``, then rows shard-major (the module
    docstring). Unchanged for one device."""
    if size == 1:
        return rows
    names, sizes = zip(*members)
    parts = np.split(rows, np.cumsum(sizes)[:-1], axis=0)
    held = kv_heads_held(config, size)
    parts = [_repeat_heads(part, config.num_kv_heads, held) if m in ("k_proj", "v_proj") else part
             for m, part in zip(names, parts)]
    blocks = zip(*(np.split(part, size, axis=0) for part in parts))
    return np.concatenate([piece for block in blocks for piece in block], axis=0)


def _repeat_heads(rows: np.ndarray, heads: int, held: int) -> np.ndarray:
    """Each head's rows ``held // heads`` times in a row (head h becomes heads h*r .. h*r+r-1)."""
    if held == heads:
        return rows
    per_head = rows.reshape(heads, -1, *rows.shape[1:])
    return np.repeat(per_head, held // heads, axis=0).reshape(-1, *rows.shape[1:])


def split_fused(y: jax.Array, sizes: Sequence[int], size: int) -> list[jax.Array]:
    """A fused layer's output ``[..., sum(sizes)]`` as its members ``[..., sizes[i]]``, for
    rows stored shard-major over ``size`` devices (``fused_rows``): each device's block is
    split locally, so no data moves between devices."""
    if size == 1:
        return jnp.split(y, np.cumsum(sizes)[:-1].tolist(), axis=-1)
    lead = y.shape[:-1]
    local = [s // size for s in sizes]
    blocks = y.reshape(*lead, size, sum(local))
    parts = jnp.split(blocks, np.cumsum(local)[:-1].tolist(), axis=-1)
    return [p.reshape(*lead, s) for p, s in zip(parts, sizes)]


def param_spec(path: Sequence[str], stacked: bool) -> P:
    """The PartitionSpec of one parameter (``path``: its keys in the tree; ``stacked``: it has
    the leading layer axis)."""
    layer = (None,) if stacked else ()
    module, leaf = path[-2], path[-1]
    if module in ROW_SPLIT:
        return P(*layer, AXIS)  # [out, in] weights, [out] biases and scales: by rows
    if module in COLUMN_SPLIT and leaf == "weight":
        return P(*layer, None, AXIS)
    if module in VOCAB_SPLIT:
        return P(AXIS)
    return P()


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding per leaf of a parameter tree (arrays or ShapeDtypeStructs)."""
    def sharding(path, leaf):
        keys = [k.key for k in path]
        return NamedSharding(mesh, param_spec(keys, keys[0] == "layers"))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def kv_pool_spec() -> P:
    """The KV pool (``pallas_kernels.kv_layout``) split by KV heads."""
    return P(*[None] * HEAD_AXIS, AXIS)


def vocab_split(mesh: Mesh) -> NamedSharding:
    """Logits ``[tokens, vocab]`` split by vocabulary, as the LM head computes them."""
    return NamedSharding(mesh, P(None, AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())
