"""Builds the stacked parameter tree from any tensor source in Hugging Face naming.

The decoder's parameter paths mirror HF names (``layers/self_attn/o_proj/weight`` is
``model.layers.{i}.self_attn.o_proj.weight`` stacked over i), so one rename rule serves every
family and every source (safetensors directories, GGUF files). The exceptions are the fused
params in ``FUSED``: ``self_attn/qkv_proj`` holds HF's q_proj, k_proj and v_proj rows
concatenated on the out-feature axis (axis 0), ``mlp/gate_up_proj`` holds gate_proj then
up_proj, weights and biases alike; each layer's piece is concatenated on the host from the HF
members (each checked against the shape the config implies for it). Tensors go to the device
one layer at a time; only one layer group (e.g. all ``gate_up_proj`` weights) is ever stacked
at once.

With a tensor-parallel mesh (``models.tensor_parallel``) each layer's tensor goes straight
into its sharding, each device receiving only its slice; fused params are laid out
shard-major first (``tensor_parallel.fused_rows``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from .attention import AttentionMetadata
from .config import ModelConfig
from .decoder import Decoder
from .errors import CheckpointError
from .quantization import FP8_DTYPE, Fp8Config, quantize_weight
from . import tensor_parallel


class TensorSource(Protocol):
    """Read access to a checkpoint's tensors by Hugging Face name."""

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


FUSED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
"""Fused param name -> its HF members, in concatenation order along axis 0. Fused once at load
time so a decode step runs one GEMM per group; unfused, XLA either concatenated the weights on
every step or ran skinny k/v GEMMs far below the memory roofline."""


def member_features(config: ModelConfig, member: str) -> int:
    """Out-features (rows) of one HF member of a fused param."""
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size,
            "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size}[member]


def hf_names(path: Sequence[str], num_layers: int) -> list[str]:
    """HF tensor names behind one parameter path (one per layer for stacked weights), by the
    rename rule alone: for a fused param these are the fused names, and ``load_params`` reads
    its ``FUSED`` members instead when the source lacks them."""
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


def abstract_params(config: ModelConfig, dtype: Any, quantization: Fp8Config | None = None) -> Any:
    """Shapes and dtypes of the parameter tree, without allocating it."""
    model = Decoder(config, impl="reference", dtype=dtype, quantization=quantization)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *_tiny_inputs(config)))["params"]


def random_params(config: ModelConfig, dtype: Any, seed: int = 0,
                  quantization: Fp8Config | None = None, mesh: Mesh | None = None) -> Any:
    """Random weights of the real shapes, created on the device (no host copy): vLLM's
    ``load_format="dummy"``. With ``quantization`` the linear layers' weights are made in FP8
    directly; with ``mesh``, each device makes its own slices (of ``held_config``'s shapes)."""
    if mesh is None:
        model = Decoder(config, impl="reference", dtype=dtype, quantization=quantization)
        init = jax.jit(lambda key: model.init(key, *_tiny_inputs(config))["params"])
        return init(jax.random.key(seed))
    held = tensor_parallel.held_config(config, tensor_parallel.group_size(mesh))
    model = Decoder(held, impl="reference", dtype=dtype, quantization=quantization)
    shardings = tensor_parallel.param_shardings(abstract_params(held, dtype, quantization), mesh)
    init = jax.jit(lambda key: model.init(key, *_tiny_inputs(held))["params"],
                   out_shardings=shardings)
    return init(jax.random.key(seed))


def load_params(config: ModelConfig, source: TensorSource, dtype: Any,
                progress: Callable[[str], None] | None = None,
                quantization: Fp8Config | None = None, mesh: Mesh | None = None) -> Any:
    """Reads every parameter from ``source``, checks its shape, casts and places it on device.

    A fused param (``FUSED``) is built per layer from its HF members, concatenated on the host;
    a source that already holds the fused tensor (e.g. written from this tree) is read as is.

    With ``quantization``, each decoder linear layer's weight is FP8 (``models.quantization``):
    read as is where the source holds its per-channel ``weight_scale`` (an FP8 checkpoint, seen
    through ``fp8_checkpoint``), else quantized per output channel on the device, one layer at
    a time, so the high-precision weights are never all in memory.

    With ``mesh`` (a tensor-parallel group), every tensor is placed into its sharding as it
    is read: each device receives only its slice, never the whole tensor.
    """
    available = source.names()
    shapes = abstract_params(config, dtype, quantization)  # the checkpoint's own geometry
    size = tensor_parallel.group_size(mesh)

    def place(host: np.ndarray, keys: list[str]) -> jax.Array:
        """One tensor (a layer's piece of a stacked param) onto the device(s)."""
        if mesh is None:
            return jax.device_put(host)
        spec = tensor_parallel.param_spec(keys, stacked=False)
        return jax.device_put(host, NamedSharding(mesh, spec))

    def stack(pieces: list[jax.Array], keys: list[str]) -> jax.Array:
        if mesh is None:
            return jnp.stack(pieces)
        sharding = NamedSharding(mesh, tensor_parallel.param_spec(keys, stacked=True))
        return jax.jit(lambda *p: jnp.stack(p), out_shardings=sharding)(*pieces)

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in available:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint "
                                  f"(a {config.architecture} with this config needs it)")
        found = tuple(source.shape(name))
        if found != shape:
            raise CheckpointError(f"tensor {name!r} has shape {found}, but the config "
                                  f"implies {shape}")
        return np.asarray(source.get(name))

    def members(name: str, fused_name: str | None) -> list[tuple[str, str]]:
        """(member, its tensor name) of a fused param's layer piece; [] when not fused."""
        if fused_name is None:
            return []
        return [(m, name.replace(f".{fused_name}.", f".{m}.")) for m in FUSED[fused_name]]

    def present(name: str, fused_name: str | None) -> bool:
        """The source holds ``name``, or every fused member of it."""
        parts = members(name, fused_name)
        return name in available or bool(parts) and all(n in available for _, n in parts)

    def tensor(name: str, fused_name: str | None, shape: tuple[int, ...]) -> np.ndarray:
        """One layer's tensor; a fused one from its HF members concatenated on axis 0 (in the
        tensor-parallel group's row order)."""
        if fused_name is None:
            return read(name, shape)
        if name in available:
            host = read(name, shape)
        else:
            host = np.concatenate([read(n, (member_features(config, m),) + shape[1:])
                                   for m, n in members(name, fused_name)])
            assert host.shape == shape, (name, host.shape, shape)
        parts = [(m, member_features(config, m)) for m in FUSED[fused_name]]
        return tensor_parallel.fused_rows(host, parts, config, size)

    def stacked_names(keys: list[str]) -> tuple[list[str], bool]:
        names = hf_names(keys, config.num_layers)
        return names, names[0].startswith("model.layers.")

    def fused_of(keys: list[str]) -> str | None:
        return keys[-2] if len(keys) >= 2 and keys[-2] in FUSED else None

    def gather(pieces: list[jax.Array], stacked: bool, names: list[str],
               keys: list[str]) -> jax.Array:
        if progress is not None:
            progress(names[0])
        return stack(pieces, keys) if stacked else pieces[0]

    def load(keys: list[str], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        names, stacked = stacked_names(keys)
        per_tensor = tuple(leaf.shape[1:] if stacked else leaf.shape)
        fused_name = fused_of(keys)
        pieces = [place(tensor(n, fused_name, per_tensor).astype(leaf.dtype), keys) for n in names]
        return gather(pieces, stacked, names, keys)

    def load_fp8(keys: list[str], weight: jax.ShapeDtypeStruct) -> tuple[jax.Array, jax.Array]:
        """(weight, weight_scale) of one FP8 linear layer, stacked over the layers."""
        names, stacked = stacked_names(keys + ["weight"])
        per_tensor = tuple(weight.shape[1:] if stacked else weight.shape)
        fused_name = fused_of(keys + ["weight"])
        weights, scales = [], []
        for name in names:
            scale_name = name[: -len("weight")] + "weight_scale"
            if present(scale_name, fused_name):
                w = place(tensor(name, fused_name, per_tensor).astype(FP8_DTYPE),
                          keys + ["weight"])
                s = place(tensor(scale_name, fused_name, per_tensor[:1]).astype(np.float32),
                          keys + ["weight_scale"])
            else:
                w, s = quantize_weight(place(tensor(name, fused_name, per_tensor).astype(dtype),
                                             keys + ["weight"]))
            weights.append(w)
            scales.append(s)
        return (gather(weights, stacked, names, keys + ["weight"]),
                stack(scales, keys + ["weight_scale"]) if stacked else scales[0])

    def walk(keys: list[str], node: Any) -> Any:
        if not isinstance(node, Mapping):
            return load(keys, node)
        if "weight_scale" in node:  # an FP8 linear layer: its weight and scale read together
            out = {k: load(keys + [k], v) for k, v in node.items()
                   if k not in ("weight", "weight_scale")}
            out["weight"], out["weight_scale"] = load_fp8(keys, node["weight"])
            return out
        return {k: walk(keys + [k], v) for k, v in node.items()}

    return walk([], shapes)
