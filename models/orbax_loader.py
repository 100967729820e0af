"""Orbax checkpoints: duetjax's own, MaxText's and Gemma's Flax releases.

- duetjax's own (``python -m duetjax.convert``): ``DIR/params/`` is the decoder's parameter
  tree exactly as the model holds it for one device (stacked layers, fused q/k/v and gate/up;
  FP8 weights and their scales when converted from an FP8 checkpoint). One device restores
  it straight onto the device, a few GB at a time, each leaf into its own sharding and the
  requested dtype. A tensor-parallel group reads it one layer of one array at a time (the
  writer stores stacked arrays a chunk per layer; older checkpoints, whole) through the
  table of ``orbax_layouts.duetjax_tensors`` instead, like the layouts below, since its fused
  rows must be laid out for the group (``tensor_parallel.fused_rows``) on the way.
  ``DIR/config.json`` (Hugging Face's) and the tokenizer files sit beside it, and
  ``DIR/kv_scales.json`` when the source checkpoint had FP8 KV cache scales.
- MaxText and Gemma's Flax releases: read one array at a time through the tables of
  ``orbax_layouts`` and loaded like any other ``TensorSource``. Neither carries a Hugging Face
  config: ``config.json`` must sit in the checkpoint directory or its parent; the tokenizer
  (``tokenizer.json``, or SentencePiece's ``tokenizer.model``) is looked for there too.

A MaxText step directory (``.../checkpoints/0``) may be given for its ``items`` folder.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax

from . import tensor_parallel
from .checkpoint import abstract_params, load_params
from .config import ModelConfig
from .errors import CheckpointError
from .hf_loader import read_hf_config
from .kv_scales import KVScales, checked_kv_scales
from .orbax_layouts import (GEMMA_EMBEDDING, MAXTEXT_EMBEDDING, LayoutSource, duetjax_tensors,
                            gemma_flax_tensors, maxtext_tensors)
from .orbax_tree import OrbaxTree, is_orbax_tree
from .quantization import Fp8Config

PARAMS_DIR = "params"
"""duetjax's own layout: the folder holding the parameter tree."""
KV_SCALES_FILE = "kv_scales.json"
"""duetjax's own layout: the FP8 KV cache's scales of the checkpoint it was converted from,
``{"k_scale": [...], "v_scale": [...]}`` with a number (or a list, one per KV head) per layer
(absent when that checkpoint had none)."""
STEP_ITEMS = ("items", "default")
"""Item folders of an Orbax CheckpointManager step (MaxText writes 'items')."""
LAYOUTS = {"duetjax": "duetjax's own", "maxtext": "MaxText", "gemma": "Gemma Flax"}


def tree_dir(path: Path) -> Path | None:
    """The folder holding the Orbax tree of a checkpoint path (None: not an Orbax checkpoint)."""
    path = Path(path)
    for candidate in (path / PARAMS_DIR, path, *(path / item for item in STEP_ITEMS)):
        if is_orbax_tree(candidate):
            return candidate
    return None


def detect_layout(tree: OrbaxTree) -> str:
    """'duetjax', 'maxtext' or 'gemma', from the tree's paths."""
    if "embed_tokens/weight" in tree.shapes:
        return "duetjax"
    if any(name.endswith(MAXTEXT_EMBEDDING) for name in tree.shapes):
        return "maxtext"
    if any(name.endswith(GEMMA_EMBEDDING) for name in tree.shapes):
        return "gemma"
    sample = ", ".join(sorted(tree.shapes)[:6])
    raise CheckpointError(
        f"{tree.path} is an Orbax checkpoint of an unknown tree (first paths: {sample}); duetjax "
        f"reads duetjax's own ('embed_tokens/weight', ...), MaxText's ('.../{MAXTEXT_EMBEDDING}', "
        f"'.../decoder/...') and Gemma's Flax releases ('{GEMMA_EMBEDDING}', ...)")


@dataclasses.dataclass(frozen=True)
class OrbaxCheckpoint:
    """An Orbax checkpoint restored onto the device."""

    hf_config: dict[str, Any]
    """The Hugging Face config.json it was read with."""
    config: ModelConfig
    """Architecture."""
    params: Any
    """Parameter tree on the device."""
    layout: str
    """One of ``LAYOUTS``."""
    files_dir: Path
    """Where config.json (and the tokenizer files, if any) were found."""
    quantization: Fp8Config | None = None
    """FP8 linear layers (duetjax's own layout converted from an FP8 checkpoint); None: every
    weight in the requested dtype."""
    kv_scales: KVScales | None = None
    """(K scale, V scale) per layer for an FP8 KV cache (``KV_SCALES_FILE``); None: none kept."""


def companion_dir(path: Path, tree: Path, filename: str) -> Path | None:
    """The first of the checkpoint directory, its tree folder and its parent holding
    ``filename``."""
    for directory in dict.fromkeys((Path(path), Path(tree), Path(path).parent)):
        if (directory / filename).is_file():
            return directory
    return None


def load_orbax(path: Path, dtype: Any,
               sharding_of: Callable[[str], jax.sharding.Sharding] | None = None,
               mesh: jax.sharding.Mesh | None = None,
               fp8: Fp8Config = Fp8Config()) -> OrbaxCheckpoint:
    """Restores an Orbax checkpoint of any of the three layouts.

    sharding_of: '/'-joined parameter path -> its sharding (duetjax's own layout without a
    mesh); default, every leaf on the first device. mesh: a tensor-parallel group to split the
    weights over as they load. fp8: how FP8 weights multiply, for a duetjax checkpoint that
    holds them.
    """
    path = Path(path)
    folder = tree_dir(path)
    if folder is None:
        raise CheckpointError(f"{path} is not an Orbax checkpoint (no Orbax metadata in it, in "
                              f"{path / PARAMS_DIR} or in {path / STEP_ITEMS[0]})")
    tree = OrbaxTree(folder)
    layout = detect_layout(tree)
    files_dir = companion_dir(path, folder, "config.json")
    if files_dir is None:
        raise CheckpointError(
            f"the {LAYOUTS[layout]} checkpoint {path} has no config.json: a Hugging Face "
            f"config.json of the model (its architecture, sizes, rope) must sit in {path} or "
            f"{path.parent}; e.g. the original model's from its hub page")
    hf_config = read_hf_config(files_dir)
    config = ModelConfig.from_hf(hf_config)
    tensor_parallel.check(config, tensor_parallel.group_size(mesh))
    quantization = fp8 if layout == "duetjax" and holds_fp8(tree) else None
    if layout == "duetjax" and mesh is None:  # the tree as the device holds it: restored as is
        params = restore_params(tree, config, dtype, sharding_of, quantization)
    else:
        if layout == "duetjax":  # its fused rows are laid out for the group as they load
            tensors = duetjax_tensors(config, abstract_params(config, dtype, quantization))
        else:
            table = {"maxtext": maxtext_tensors, "gemma": gemma_flax_tensors}[layout]
            tensors = table(config, tree)
        params = load_params(config, LayoutSource(tree, LAYOUTS[layout], tensors), dtype,
                             quantization=quantization, mesh=mesh)
    kv_scales = read_kv_scales_file(files_dir / KV_SCALES_FILE, config.num_layers,
                                    config.num_kv_heads) \
        if layout == "duetjax" else None
    return OrbaxCheckpoint(hf_config=hf_config, config=config, params=params, layout=layout,
                           files_dir=files_dir, quantization=quantization, kv_scales=kv_scales)


def read_kv_scales_file(path: Path, num_layers: int, num_kv_heads: int) -> KVScales | None:
    """The per-layer (K, V) scales ``KV_SCALES_FILE`` holds (per layer, or per KV head),
    checked; None when it is absent."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        k, v = list(data["k_scale"]), list(data["v_scale"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: expected {{\"k_scale\": [...], \"v_scale\": [...]}} "
                              f"with a number (or one per KV head) per layer ({err!r})") from None
    try:
        return checked_kv_scales(k, v, num_layers, num_kv_heads, str(path))
    except CheckpointError:
        raise
    except (ValueError, TypeError) as err:  # (an entry that is not a number)
        raise CheckpointError(f"{path}: a scale is not a number ({err})") from None


def holds_fp8(tree: OrbaxTree) -> bool:
    """Whether a duetjax tree holds FP8 linear layers (a ``weight_scale`` beside each weight)."""
    return any(name.endswith("/weight_scale") for name in tree.shapes)


def restore_params(tree: OrbaxTree, config: ModelConfig, dtype: Any,
                   sharding_of: Callable[[str], jax.sharding.Sharding] | None = None,
                   quantization: Fp8Config | None = None) -> Any:
    """duetjax's own layout: every leaf restored onto the device as its dtype (``dtype``, or
    FP8 values and float32 scales in the linear layers with ``quantization``), after checking
    the tree against the shapes the config implies."""
    abstract = abstract_params(config, dtype, quantization)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    device = jax.sharding.SingleDeviceSharding(_default_device())
    targets = {}
    for key_path, leaf in leaves:
        name = "/".join(str(getattr(k, "key", k)) for k in key_path)
        if name not in tree.shapes:
            raise CheckpointError(f"Orbax checkpoint {tree.path} lacks {name!r} (a "
                                  f"{config.architecture} with this config.json needs it)")
        if tree.shapes[name] != tuple(leaf.shape):
            raise CheckpointError(f"Orbax checkpoint {tree.path}: {name!r} has shape "
                                  f"{tree.shapes[name]}, but config.json implies {tuple(leaf.shape)}")
        sharding = sharding_of(name) if sharding_of is not None else device
        targets[name] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    restored = tree.restore(targets)
    return jax.tree_util.tree_unflatten(treedef, [restored[name] for name in targets])


def _default_device() -> jax.Device:
    """The device arrays go to when no sharding says otherwise: the one a
    ``jax.default_device`` context names (duet mode loads on the host), else the first."""
    default = jax.config.jax_default_device
    if isinstance(default, str):
        return jax.devices(default)[0]
    return default if default is not None else jax.devices()[0]
