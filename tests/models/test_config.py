"""Config parsing: shipped real-shape configs, rope scaling, families, and dummy weights."""
import json
import math

import jax
import numpy as np
import pytest

from models import CheckpointError, ModelConfig, RopeConfig, load_model
from models.checkpoint import abstract_params
from models.loader import SHIPPED_CONFIGS, shipped_configs


@pytest.mark.parametrize("name, billions", [("llama-3-8b", 8.030), ("qwen3-8b", 8.191),
                                            ("gemma-2-9b", 9.241)])
def test_shipped_configs_have_the_published_parameter_counts(name, billions):
    config = ModelConfig.from_hf(json.loads((SHIPPED_CONFIGS / name / "config.json").read_text()))
    shapes = abstract_params(config, np.float32)  # traced, nothing allocated
    count = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))
    assert count == config.num_params
    assert abs(count / 1e9 - billions) < 0.001


def test_gemma2_config_details():
    config = ModelConfig.from_hf(json.loads((SHIPPED_CONFIGS / "gemma-2-9b" / "config.json").read_text()))
    assert config.layer_windows[:4] == (4096, 0, 4096, 0)
    assert config.attn_scale == 256 ** -0.5 and config.attn_logit_softcap == 50.0
    assert config.final_logit_softcap == 30.0 and config.tie_word_embeddings
    assert config.embed_scale == math.sqrt(3584) and config.norm_plus_one and config.sandwich_norm


def test_llama3_rope_scaling_bands():
    rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192)
    plain = RopeConfig(theta=500000.0).inverse_frequencies(128)
    scaled = rope.inverse_frequencies(128)
    assert scaled[0] == plain[0]  # wavelength 2*pi < 2048: kept
    assert scaled[-1] == pytest.approx(plain[-1] / 8)  # longest wavelengths: divided by factor
    medium = [i for i, f in enumerate(plain) if 2048 <= 2 * math.pi / f <= 8192]
    assert medium and all(plain[i] / 8 < scaled[i] < plain[i] for i in medium)


def test_transformers5_rope_parameters_per_layer_type():
    hf = {"architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 1,
          "head_dim": 32, "vocab_size": 100, "sliding_window": 8, "query_pre_attn_scalar": 32,
          "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
          "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    config = ModelConfig.from_hf(hf)
    assert config.rope == RopeConfig(theta=1e6, rope_type="linear", factor=8.0)
    assert config.local_rope == RopeConfig(theta=1e4)
    assert config.uses_local_rope == (True,) * 5 + (False,)
    assert config.layer_windows == (8,) * 5 + (0,)


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(CheckpointError, match="FooForCausalLM.*LlamaForCausalLM"):
        ModelConfig.from_hf({"architectures": ["FooForCausalLM"]})


def test_unsupported_rope_type_is_named():
    hf = json.loads((SHIPPED_CONFIGS / "llama-3-8b" / "config.json").read_text())
    hf["rope_scaling"] = {"rope_type": "longrope", "factor": 4.0}
    with pytest.raises(CheckpointError, match="longrope"):
        ModelConfig.from_hf(hf)


def test_dummy_weights_from_a_config_only_directory(tmp_path):
    from tests.helpers import TINY_LLAMA

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    model = load_model(tmp_path, dtype="bfloat16", load_format="dummy")
    leaves = jax.tree_util.tree_leaves(model.params)
    assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in leaves)
    # Fused q/k/v: 4 query heads + 2 * 2 kv heads of head_dim 16; fused gate/up: 2 * 128.
    assert model.params["layers"]["self_attn"]["qkv_proj"]["weight"].shape == (2, 128, 64)
    assert model.params["layers"]["mlp"]["gate_up_proj"]["weight"].shape == (2, 256, 64)
    assert float(jax.numpy.std(model.params["embed_tokens"]["weight"].astype(np.float32))) > 0.01


def test_shipped_config_names_work_with_dummy_only():
    assert {"llama-3-8b", "qwen3-8b", "gemma-2-9b"} <= set(shipped_configs())
    with pytest.raises(CheckpointError, match="does not exist.*llama-3-8b"):
        load_model("llama-3-8b")
