"""Orbax parameter trees read as Hugging Face tensors: MaxText's, Gemma's Flax releases' and
duetjax's own (for a tensor-parallel group; one device restores it whole, ``orbax_loader``).

Each layout is a table from HF tensor name to where that tensor sits in the tree and how its
stored array becomes HF's ``[out_features, in_features]`` weight; ``LayoutSource`` serves them
as a ``models.checkpoint.TensorSource``, so ``load_params`` and its one rename rule load every
layout. Every stored array is checked against the shape the config implies before any is read.

MaxText (``MaxText/llama_or_mistral_ckpt.py``, ``convert_gemma*_chkpt.py``), under
``params/params/``: ``token_embedder/embedding`` [V, D], ``decoder/decoder_norm/scale``,
``decoder/logits_dense/kernel`` [D, V] (absent when tied), and per layer
``self_attention/{query,key,value}/kernel`` [D, heads, head_dim], ``self_attention/out/kernel``
[heads, head_dim, D], ``mlp/{wi_0,wi_1,wo}/kernel`` ([D, I], [D, I], [I, D]) and the norms'
``scale``. With ``scan_layers`` a layer leaf is stacked on axis 1 under ``decoder/layers/``;
without it each layer is ``decoder/layers_{i}/``. Gemma 2 pairs a local and a global layer per
block (``self_attention_local``, ``mlp_global``, ...). MaxText folds the softmax scale into the
query kernel (except for Gemma 3, which scales at run time), stores Gemma's norms as
``1 + w`` and Gemma's embedding multiplied by sqrt(D), and runs Llama 3.1-style rope
(``LLaMARotaryEmbedding``) on interleaved pairs (Meta's layout), where HF rotates halves: each
of these is undone here.

Gemma's Flax releases (the ``gemma`` library), under ``transformer/``:
``embedder/input_embedding`` [V, D], ``final_norm/scale`` and per ``layer_{i}``:
``attn/q_einsum/w`` [heads, D, head_dim] with ``attn/kv_einsum/w`` [2, kv_heads, D, head_dim]
(or ``attn/qkv_einsum/w`` [3, heads, D, head_dim] when heads == kv heads),
``attn/attn_vec_einsum/w`` [heads, head_dim, D], ``mlp/gating_einsum/w`` ([2, I, D], or
[2, D, I] in older releases), ``mlp/linear/w`` [I, D], ``attn/_query_norm`` and
``attn/_key_norm`` (Gemma 3) and the norms. Its rope, norms and scales are HF's own.

duetjax's own (``python -m duetjax.convert``) is the model's parameter tree: each leaf is an HF
tensor by ``checkpoint``'s rename rule, stacked over the layers on axis 0, with q/k/v (gate/up)
fused in HF's row order and, converted from an FP8 checkpoint, e4m3 weights beside a
``weight_scale`` each. Each layer's slice is served under the fused name, which ``load_params``
reads as is and lays out for the group itself.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from .checkpoint import hf_names
from .config import ModelConfig
from .errors import CheckpointError
from .orbax_tree import OrbaxTree

MAXTEXT_FAMILIES = ("llama", "mistral", "gemma", "gemma2", "gemma3")
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")
MAXTEXT_EMBEDDING = "token_embedder/embedding"
GEMMA_EMBEDDING = "transformer/embedder/input_embedding"


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Where one HF tensor sits in a tree and how its stored array becomes HF's."""

    path: str
    """'/'-joined tree path of the stored array."""
    shape: tuple[int, ...]
    """The whole stored array's shape, as the config implies it."""
    to_hf: Callable[[np.ndarray], np.ndarray]
    """The selected stored array -> the HF tensor."""
    select: tuple[int, int] | None = None
    """(axis, index) taken from the stored array first: a layer of a stacked leaf, or one of
    the q/k/v (gate/up) of a fused one; None: the whole array."""
    padded_rows: bool = False
    """The stored array may have more rows than the config's (a padded vocabulary); they are cut."""

    def matches(self, found: tuple[int, ...]) -> bool:
        if self.padded_rows and found and found[0] >= self.shape[0]:
            return found[1:] == self.shape[1:]
        return found == self.shape


class LayoutSource:
    """A ``TensorSource`` over one layout's ``StoredTensor`` table."""

    def __init__(self, tree: OrbaxTree, layout: str, tensors: dict[str, StoredTensor]):
        self.tree, self.layout, self.tensors = tree, layout, tensors
        for hf_name, stored in tensors.items():
            if stored.path not in tree.shapes:
                raise CheckpointError(
                    f"{layout} checkpoint {tree.path} lacks {stored.path!r} (for {hf_name}); "
                    "the tree is incomplete or config.json describes another model")
            found = tree.shapes[stored.path]
            if not stored.matches(found):
                raise CheckpointError(
                    f"{layout} checkpoint {tree.path}: {stored.path!r} has shape {found}, but "
                    f"config.json implies {stored.shape}")
        self._last: tuple[str, np.ndarray] | None = None

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get(name).shape)

    def get(self, name: str) -> np.ndarray:
        if self._last is not None and self._last[0] == name:  # load_params asks shape, then get
            return self._last[1]
        stored = self.tensors[name]
        if stored.select is not None:
            array = self.tree.read_index(stored.path, *stored.select)
        else:
            array = self.tree.read(stored.path)
        if stored.padded_rows:
            array = array[: stored.shape[0]]
        tensor = np.ascontiguousarray(stored.to_hf(array.astype(np.float32)))
        self._last = (name, tensor)
        return tensor


def _heads_in_to_hf(x: np.ndarray) -> np.ndarray:
    """[D, heads, head_dim] (an input-major projection kernel) -> HF [heads * head_dim, D]."""
    return x.reshape(x.shape[0], -1).T


def _interleaved_to_halves(x: np.ndarray) -> np.ndarray:
    """Rope pairs (2i, 2i + 1) of the last axis -> HF's pairs (i, i + head_dim / 2)."""
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def _find_root(tree: OrbaxTree, marker: str, layout: str) -> str:
    roots = [name[: -len(marker)] for name in tree.shapes if name.endswith(marker)]
    if len(roots) != 1:
        raise CheckpointError(f"{layout} checkpoint {tree.path} has {len(roots)} {marker!r} arrays, "
                              "not one")
    return roots[0]


def _check_family(config: ModelConfig, families: tuple[str, ...], layout: str) -> None:
    if config.family not in families:
        raise CheckpointError(f"duetjax reads {layout} checkpoints of {', '.join(families)}; "
                              f"config.json says {config.architecture}")


def _layer_names(config: ModelConfig, i: int) -> dict[str, str]:
    """Short names -> HF names of layer i's tensors that this config has."""
    prefix = f"model.layers.{i}."
    names = {short: prefix + f"self_attn.{short}_proj.weight" for short in "qkvo"}
    names |= {short: prefix + f"mlp.{short}_proj.weight" for short in ("gate", "up", "down")}
    norms = ["input_layernorm", "post_attention_layernorm"]
    if config.sandwich_norm:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    names |= {norm: prefix + f"{norm}.weight" for norm in norms}
    if config.qk_norm:
        names |= {"q_norm": prefix + "self_attn.q_norm.weight",
                  "k_norm": prefix + "self_attn.k_norm.weight"}
    return names


def maxtext_tensors(config: ModelConfig, tree: OrbaxTree) -> dict[str, StoredTensor]:
    """The MaxText layout (see the module docstring) for this config."""
    _check_family(config, MAXTEXT_FAMILIES, "MaxText")
    root = _find_root(tree, MAXTEXT_EMBEDDING, "MaxText")
    d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    inter, vocab = config.intermediate_size, config.vocab_size
    gemma = config.family in GEMMA_FAMILIES
    norm_offset = 1.0 if gemma else 0.0  # MaxText stores Gemma's (1 + w)
    query_fold = 1.0 if config.family == "gemma3" else config.attn_scale
    rope = _interleaved_to_halves if config.rope.rope_type == "llama3" else (lambda x: x)
    per_block = 2 if config.family == "gemma2" else 1
    if config.num_layers % per_block:
        raise CheckpointError(f"MaxText's Gemma 2 pairs layers, but config.json has "
                              f"{config.num_layers} layers")
    blocks = config.num_layers // per_block
    stacked = any(name.startswith(f"{root}decoder/layers/") for name in tree.shapes)

    def unnorm(x):
        return x - norm_offset

    tensors = {
        "model.embed_tokens.weight": StoredTensor(
            root + MAXTEXT_EMBEDDING, (vocab, d), lambda x: x / config.embed_scale,
            padded_rows=True),
        "model.norm.weight": StoredTensor(root + "decoder/decoder_norm/scale", (d,), unnorm),
    }
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = StoredTensor(root + "decoder/logits_dense/kernel", (d, vocab),
                                                 lambda x: x.T)
    if gemma:
        norm_modules = {"input_layernorm": "pre_self_attention_norm",
                        "post_attention_layernorm": "pre_ffw_norm"}
        if config.sandwich_norm:
            norm_modules |= {"post_attention_layernorm": "post_self_attention_norm",
                             "pre_feedforward_layernorm": "pre_ffw_norm",
                             "post_feedforward_layernorm": "post_ffw_norm"}
    else:
        norm_modules = {"input_layernorm": "pre_self_attention_layer_norm",
                        "post_attention_layernorm": "post_self_attention_layer_norm"}

    for i in range(config.num_layers):
        block = i // per_block
        suffix = ("_local", "_global")[i % 2] if per_block == 2 else ""

        def at(module: str, shape: tuple[int, ...], to_hf) -> StoredTensor:
            if stacked:  # MaxText's param_scan_axis: the layer axis is 1
                return StoredTensor(f"{root}decoder/layers/{module}",
                                    shape[:1] + (blocks,) + shape[1:], to_hf, select=(1, block))
            return StoredTensor(f"{root}decoder/layers_{block}/{module}", shape, to_hf)

        attn = f"self_attention{suffix}"
        parts = {
            "q": at(f"{attn}/query/kernel", (d, h, hd),
                    lambda x: _heads_in_to_hf(rope(x) / query_fold)),
            "k": at(f"{attn}/key/kernel", (d, kv, hd), lambda x: _heads_in_to_hf(rope(x))),
            "v": at(f"{attn}/value/kernel", (d, kv, hd), _heads_in_to_hf),
            "o": at(f"{attn}/out/kernel", (h, hd, d), lambda x: x.reshape(h * hd, d).T),
            "gate": at(f"mlp{suffix}/wi_0/kernel", (d, inter), lambda x: x.T),
            "up": at(f"mlp{suffix}/wi_1/kernel", (d, inter), lambda x: x.T),
            "down": at(f"mlp{suffix}/wo/kernel", (inter, d), lambda x: x.T),
            "q_norm": at(f"{attn}/query_norm/scale", (hd,), unnorm),
            "k_norm": at(f"{attn}/key_norm/scale", (hd,), unnorm),
        }
        parts |= {norm: at(f"{module}{suffix}/scale", (d,), unnorm)
                  for norm, module in norm_modules.items()}
        tensors |= {hf: parts[short] for short, hf in _layer_names(config, i).items()}
    return tensors


def gemma_flax_tensors(config: ModelConfig, tree: OrbaxTree) -> dict[str, StoredTensor]:
    """The layout of Gemma's Flax releases (see the module docstring) for this config."""
    _check_family(config, GEMMA_FAMILIES, "Gemma Flax")
    prefix = _find_root(tree, GEMMA_EMBEDDING, "Gemma Flax")
    root = prefix + "transformer/"
    d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    inter = config.intermediate_size

    def heads_to_hf(x):  # [heads, D, head_dim] -> [heads * head_dim, D]
        return x.transpose(0, 2, 1).reshape(-1, d)

    tensors = {
        "model.embed_tokens.weight": StoredTensor(prefix + GEMMA_EMBEDDING, (config.vocab_size, d),
                                                  lambda x: x, padded_rows=True),
        "model.norm.weight": StoredTensor(root + "final_norm/scale", (d,), lambda x: x),
    }
    norm_modules = {"input_layernorm": "pre_attention_norm",
                    "post_attention_layernorm": "pre_ffw_norm"}
    if config.sandwich_norm:
        norm_modules |= {"post_attention_layernorm": "post_attention_norm",
                         "pre_feedforward_layernorm": "pre_ffw_norm",
                         "post_feedforward_layernorm": "post_ffw_norm"}
    for i in range(config.num_layers):
        layer = f"{root}layer_{i}/"
        if f"{layer}attn/qkv_einsum/w" in tree.shapes:
            fused = (f"{layer}attn/qkv_einsum/w", (3, h, d, hd))
            q, k, v = (StoredTensor(*fused, heads_to_hf, select=(0, j)) for j in range(3))
        else:
            q = StoredTensor(f"{layer}attn/q_einsum/w", (h, d, hd), heads_to_hf)
            k, v = (StoredTensor(f"{layer}attn/kv_einsum/w", (2, kv, d, hd), heads_to_hf,
                                 select=(0, j)) for j in range(2))
        gating = f"{layer}mlp/gating_einsum/w"
        if tree.shapes.get(gating) == (2, d, inter) and d != inter:  # older releases
            gate, up = (StoredTensor(gating, (2, d, inter), lambda x: x.T, select=(0, j))
                        for j in range(2))
        else:
            gate, up = (StoredTensor(gating, (2, inter, d), lambda x: x, select=(0, j))
                        for j in range(2))
        parts = {
            "q": q, "k": k, "v": v, "gate": gate, "up": up,
            "o": StoredTensor(f"{layer}attn/attn_vec_einsum/w", (h, hd, d),
                              lambda x: x.reshape(h * hd, d).T),
            "down": StoredTensor(f"{layer}mlp/linear/w", (inter, d), lambda x: x.T),
            "q_norm": StoredTensor(f"{layer}attn/_query_norm/scale", (hd,), lambda x: x),
            "k_norm": StoredTensor(f"{layer}attn/_key_norm/scale", (hd,), lambda x: x),
        }
        parts |= {norm: StoredTensor(f"{layer}{module}/scale", (d,), lambda x: x)
                  for norm, module in norm_modules.items()}
        tensors |= {hf: parts[short] for short, hf in _layer_names(config, i).items()}
    return tensors


def duetjax_tensors(config: ModelConfig, abstract: Any) -> dict[str, StoredTensor]:
    """duetjax's own layout (see the module docstring) of the tree ``abstract`` (the config's
    ``checkpoint.abstract_params``, with FP8 scales when the tree holds them)."""
    tensors = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = [str(k.key) for k in key_path]
        path, names = "/".join(keys), hf_names(keys, config.num_layers)
        if keys[0] == "layers":
            tensors |= {name: StoredTensor(path, leaf.shape, lambda x: x, select=(0, i))
                        for i, name in enumerate(names)}
        else:
            tensors[names[0]] = StoredTensor(path, leaf.shape, lambda x: x)
    return tensors
