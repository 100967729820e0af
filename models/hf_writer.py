"""Writes a parameter tree as a Hugging Face checkpoint: HF tensor names, sharded safetensors
files with ``model.safetensors.index.json``, as HF releases are (the inverse of ``load_params``:
stacked layers split per layer, fused q/k/v and gate/up split into their HF members)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from .checkpoint import FUSED, hf_names, member_features
from .config import ModelConfig
from .gguf_loader import write_safetensors_streaming
from .hf_loader import INDEX_FILE

HF_SHARD_BYTES = 5 * 1024**3
"""Hugging Face's default ``max_shard_size`` (5 GB)."""


def hf_tensor_readers(params: Any, config: ModelConfig) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    """HF name -> (shape, read the tensor to host), in the tree's order, nothing read yet."""
    tensors: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [k.key for k in path]
        names = hf_names(keys, config.num_layers)
        stacked = names[0].startswith("model.layers.")
        for layer, name in enumerate(names):
            def piece(leaf=leaf, layer=layer if stacked else None):
                return np.asarray(leaf if layer is None else leaf[layer])

            shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
            fused = keys[-2] if len(keys) >= 2 and keys[-2] in FUSED else None
            if fused is None:
                tensors[name] = (shape, piece)
                continue
            start = 0
            for member in FUSED[fused]:
                rows = member_features(config, member)
                tensors[name.replace(f".{fused}.", f".{member}.")] = (
                    (rows,) + shape[1:], lambda piece=piece, a=start, b=start + rows: piece()[a:b])
                start += rows
    return tensors


def save_hf_safetensors(params: Any, config: ModelConfig, hf_config: dict, out_dir: str | Path,
                        dtype: str = "bfloat16", max_shard_bytes: int = HF_SHARD_BYTES) -> Path:
    """Writes config.json, ``model-0000i-of-0000n.safetensors`` (each at most
    ``max_shard_bytes``, one tensor read at a time) and the index into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    itemsize = jax.numpy.dtype(dtype).itemsize
    tensors = hf_tensor_readers(params, config)
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, _) in tensors.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(out_dir / file, {n: tensors[n][0] for n in names},
                                    lambda n: tensors[n][1](), dtype)
        weight_map |= dict.fromkeys(names, file)
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return out_dir
