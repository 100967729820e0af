"""FP8 KV cache scales of a model: for each layer a K scale and a V scale, each either one
number for the layer (per tensor) or one number per KV head.

``KVScales`` is ``((k, v), ...)``, one pair per layer, in one form for every layer: floats, or
tuples of ``num_kv_heads`` floats. Tuples keep it hashable (the decoder compiles the scales in
as constants). The kernels take either form (``pallas_kernels.kv_layout.scales_for``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .errors import CheckpointError

LayerScale = Union[float, tuple[float, ...]]
KVScales = tuple[tuple[LayerScale, LayerScale], ...]


def checked_kv_scales(k: Sequence[Any], v: Sequence[Any], num_layers: int, num_kv_heads: int,
                      where: str) -> KVScales:
    """``KVScales`` from per-layer K and V scales, each a number or ``num_kv_heads`` numbers
    (arrays of one element count as numbers). Where one layer has per-head scales every
    layer's become per head. A wrong count, or a scale that is not finite and positive, is a
    ``CheckpointError`` that begins with ``where`` (the tensor or file it came from)."""
    if len(k) != num_layers or len(v) != num_layers:
        raise CheckpointError(f"{where}: {len(k)} K and {len(v)} V scales for {num_layers} layers")
    values = []
    for name, per_layer in (("K", k), ("V", v)):
        for i, scale in enumerate(per_layer):
            a = np.asarray(scale, np.float64).reshape(-1)
            if a.size not in (1, num_kv_heads):
                raise CheckpointError(f"{where}: layer {i}'s {name} scale has {a.size} values; "
                                      f"expected 1 (per layer) or {num_kv_heads} (per KV head)")
            if not all(math.isfinite(x) and x > 0 for x in a):
                raise CheckpointError(f"{where}: layer {i}'s {name} scale {a.tolist()} must be "
                                      "finite and positive")
            values.append(a)
    per_head = any(a.size > 1 for a in values)
    if per_head:
        values = [np.broadcast_to(a, (num_kv_heads,)) for a in values]
    forms = [tuple(float(x) for x in a) if per_head else float(a[0]) for a in values]
    return tuple(zip(forms[:num_layers], forms[num_layers:]))


def is_per_head(scales: KVScales) -> bool:
    """Whether ``scales`` hold one number per KV head (else one per layer)."""
    return isinstance(scales[0][0], tuple)


def scales_array(scales: KVScales, num_kv_heads: int) -> jax.Array:
    """float32 ``[layers, 2]`` (per layer) or ``[layers, 2, num_kv_heads]`` (per head). A
    tensor-parallel group that holds each KV head several times (``tensor_parallel.
    kv_heads_held``) gets each head's scale repeated the same way as its weights."""
    array = jnp.asarray(scales, jnp.float32)
    if array.ndim == 3 and array.shape[2] != num_kv_heads:
        array = jnp.repeat(array, num_kv_heads // array.shape[2], axis=2)
    return array


def describe(scales: KVScales) -> str:
    """The scales' range for a log line: per layer or per head, smallest and largest of K and
    of V."""
    k = np.asarray([s for s, _ in scales], np.float64)
    v = np.asarray([s for _, s in scales], np.float64)
    form = "per KV head" if is_per_head(scales) else "per layer"
    return f"{form}, K {k.min():.4g}..{k.max():.4g}, V {v.min():.4g}..{v.max():.4g}"
