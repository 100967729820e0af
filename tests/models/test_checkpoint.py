"""Loading into fused params: ``qkv_proj`` and ``gate_up_proj`` are built per layer from the
HF members (q/k/v_proj, gate/up_proj) concatenated on the out-feature axis."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from models import CheckpointError, ModelConfig
from models.checkpoint import load_params

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 2, 32, 4, 2, 8, 48, 64
TINY_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": VOCAB,
    "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "tie_word_embeddings": False,
}
"""GQA (2 kv heads for 4 query heads) with q/k/v biases, as every Qwen2 has."""


class DictSource:
    """A ``TensorSource`` over an in-memory {HF name: array} dict."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str) -> np.ndarray:
        return self.tensors[name]


def hf_checkpoint(seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors under the names and shapes a Hugging Face Qwen2 checkpoint uses."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        layer = f"model.layers.{i}"
        shapes.update({
            f"{layer}.input_layernorm.weight": (HIDDEN,),
            f"{layer}.post_attention_layernorm.weight": (HIDDEN,),
            f"{layer}.self_attn.q_proj.weight": (q, HIDDEN), f"{layer}.self_attn.q_proj.bias": (q,),
            f"{layer}.self_attn.k_proj.weight": (kv, HIDDEN), f"{layer}.self_attn.k_proj.bias": (kv,),
            f"{layer}.self_attn.v_proj.weight": (kv, HIDDEN), f"{layer}.self_attn.v_proj.bias": (kv,),
            f"{layer}.self_attn.o_proj.weight": (HIDDEN, q),
            f"{layer}.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{layer}.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            f"{layer}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        })
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _load(tensors: dict[str, np.ndarray]):
    return load_params(ModelConfig.from_hf(TINY_QWEN2), DictSource(tensors), np.float32)


def test_fused_params_are_the_concatenated_hf_members():
    tensors = hf_checkpoint()
    params = _load(tensors)
    attn, mlp = params["layers"]["self_attn"], params["layers"]["mlp"]
    assert attn["qkv_proj"]["weight"].shape == (LAYERS, (HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
    assert mlp["gate_up_proj"]["weight"].shape == (LAYERS, 2 * INTERMEDIATE, HIDDEN)
    assert "q_proj" not in attn and "gate_proj" not in mlp
    for i in range(LAYERS):
        layer = f"model.layers.{i}"
        for kind in ("weight", "bias"):
            want = np.concatenate([tensors[f"{layer}.self_attn.{m}_proj.{kind}"] for m in "qkv"])
            np.testing.assert_array_equal(np.asarray(attn["qkv_proj"][kind][i]), want)
        want = np.concatenate([tensors[f"{layer}.mlp.gate_proj.weight"],
                               tensors[f"{layer}.mlp.up_proj.weight"]])
        np.testing.assert_array_equal(np.asarray(mlp["gate_up_proj"]["weight"][i]), want)
        np.testing.assert_array_equal(np.asarray(attn["o_proj"]["weight"][i]),
                                      tensors[f"{layer}.self_attn.o_proj.weight"])


def test_source_holding_fused_tensors_loads_them_as_is():
    """Checkpoints written from the param tree (tests/helpers.py) carry the fused names."""
    params = _load(hf_checkpoint())
    members = (".q_proj.", ".k_proj.", ".v_proj.", ".gate_proj.", ".up_proj.")
    fused = {name: value for name, value in hf_checkpoint().items()
             if not any(m in name for m in members)}
    for i in range(LAYERS):
        for kind in ("weight", "bias"):
            fused[f"model.layers.{i}.self_attn.qkv_proj.{kind}"] = \
                np.asarray(params["layers"]["self_attn"]["qkv_proj"][kind][i])
        fused[f"model.layers.{i}.mlp.gate_up_proj.weight"] = \
            np.asarray(params["layers"]["mlp"]["gate_up_proj"]["weight"][i])
    reloaded = _load(fused)
    for a, b in zip(jax.tree_util.tree_leaves(reloaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_member_is_named():
    tensors = hf_checkpoint()
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.v_proj\.weight' is missing"):
        _load(tensors)


def test_misshapen_member_is_named_with_both_shapes():
    tensors = hf_checkpoint()
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1]  # one output row short
    with pytest.raises(CheckpointError) as info:
        _load(tensors)
    message = str(info.value)
    assert name in message and str((INTERMEDIATE - 1, HIDDEN)) in message \
        and str((INTERMEDIATE, HIDDEN)) in message, message
