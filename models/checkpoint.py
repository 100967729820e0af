"""Builds the stacked parameter tree from any tensor source in Hugging Face naming.

The decoder's parameter paths mirror HF names (``layers/self_attn/q_proj/weight`` is
``model.layers.{i}.self_attn.q_proj.weight`` stacked over i), so one rename rule serves every
family and every source (safetensors directories, GGUF files). Tensors go to the device one at
a time; only one layer group (e.g. all ``up_proj`` weights) is ever stacked at once.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .attention import AttentionMetadata
from .config import ModelConfig
from .decoder import Decoder
from .errors import CheckpointError


class TensorSource(Protocol):
    """Read access to a checkpoint's tensors by Hugging Face name."""

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


def hf_names(path: Sequence[str], num_layers: int) -> list[str]:
    """HF tensor names behind one parameter path (one per layer for stacked weights)."""
    if path[0] == "layers":
        rest = ".".join(path[1:])
        return [f"model.layers.{i}.{rest}" for i in range(num_layers)]
    if path[0] == "lm_head":
        return ["lm_head.weight"]
    return ["model." + ".".join(path)]


def _tiny_inputs(config: ModelConfig):
    """Smallest valid step, for tracing shapes (the pool's size does not affect the params)."""
    from pallas_kernels import kv_pool_shape

    pool = jnp.zeros(kv_pool_shape(config.num_layers, 1, config.num_kv_heads, 16, config.head_dim))
    meta = AttentionMetadata(
        positions=jnp.zeros((1,), jnp.int32), slot_mapping=jnp.zeros((1,), jnp.int32),
        block_tables=jnp.zeros((1, 1), jnp.int32), context_lens=jnp.ones((1,), jnp.int32),
        query_start_loc=jnp.array([0, 1], jnp.int32))
    return jnp.zeros((1,), jnp.int32), pool, meta, jnp.zeros((1,), jnp.int32)


def abstract_params(config: ModelConfig, dtype: Any) -> Any:
    """Shapes and dtypes of the parameter tree, without allocating it."""
    model = Decoder(config, impl="reference", dtype=dtype)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *_tiny_inputs(config)))["params"]


def random_params(config: ModelConfig, dtype: Any, seed: int = 0) -> Any:
    """Random weights of the real shapes, created on the device (no host copy): vLLM's
    ``load_format="dummy"``."""
    model = Decoder(config, impl="reference", dtype=dtype)
    init = jax.jit(lambda key: model.init(key, *_tiny_inputs(config))["params"])
    return init(jax.random.key(seed))


def _path_names(path) -> list[str]:
    return [getattr(k, "key", getattr(k, "name", str(k))) for k in path]


def load_params(config: ModelConfig, source: TensorSource, dtype: Any,
                progress: Callable[[str], None] | None = None) -> Any:
    """Reads every parameter from ``source``, checks its shape, casts and places it on device."""
    available = source.names()
    shapes = abstract_params(config, dtype)

    def load(path, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        names = hf_names(_path_names(path), config.num_layers)
        per_tensor = leaf.shape[1:] if names[0].startswith("model.layers.") else leaf.shape
        pieces = []
        for name in names:
            if name not in available:
                raise CheckpointError(f"tensor {name!r} is missing from the checkpoint "
                                      f"(a {config.architecture} with this config needs it)")
            found = tuple(source.shape(name))
            if found != tuple(per_tensor):
                raise CheckpointError(f"tensor {name!r} has shape {found}, but the config "
                                      f"implies {tuple(per_tensor)}")
            pieces.append(jax.device_put(np.asarray(source.get(name)).astype(leaf.dtype)))
        if progress is not None:
            progress(names[0])
        return jnp.stack(pieces) if len(pieces) > 1 or names[0].startswith("model.layers.") else pieces[0]

    return jax.tree_util.tree_map_with_path(load, shapes)
