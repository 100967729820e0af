"""``layer_weights='per-layer'``: each decoder layer with arrays of its own, in an unrolled
loop, gives the stacked model's tokens and log-probabilities (sliding windows and Gemma 3's
local rope included, and with FP8 weights and an FP8 KV cache); 'auto' picks it for FP8
weights on GPUs. Tensor-parallel groups: ``tensor_parallel_run.py``."""
from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from duetjax import Engine, EngineConfig, SamplingParams
from duetjax.config import ConfigError
from duetjax.core.model_runner import uses_per_layer_weights
from models import compute_logits
from models.decoder import unstack_layers
from tests.models.test_hf_parity import ENGINE_LIMITS


def run(path, **options):
    engine = Engine(model=str(path), dtype="float32", **ENGINE_LIMITS, **options)
    prompts = [[1, 5, 9, 14, 3, 7], list(range(2, 40))]  # (the second passes the window)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    outputs = engine.generate([{"prompt_token_ids": ids} for ids in prompts], params,
                              use_tqdm=False)
    return engine, [(list(o.outputs[0].token_ids),
                     [next(iter(step.values())) for step in o.outputs[0].logprobs])
                    for o in outputs]


@pytest.mark.parametrize("case, options", [
    ("gemma3", {}),
    ("llama2", dict(quantization="fp8", kv_cache_dtype="fp8")),
])
def test_per_layer_weights_give_the_stacked_models_outputs(case, options, oracle_cases):
    _, stacked = run(oracle_cases[case], **options)
    engine, per_layer = run(oracle_cases[case], layer_weights="per-layer", **options)
    num_layers = engine.runner.model.config.num_layers
    assert "layers" not in engine.runner.params
    assert sorted(k for k in engine.runner.params if k.startswith("layers_")) == sorted(
        f"layers_{i}" for i in range(num_layers))
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(per_layer, stacked):
        assert tokens == want_tokens
        np.testing.assert_allclose(logprobs, want_logprobs, rtol=1e-5, atol=1e-5)
    # the checking tool's forward reads the engine's per-layer tree too
    prompt = [[1, 5, 9, 14, 3, 7, 11]]
    want = compute_logits(run(oracle_cases[case], layer_weights="stacked", **options)[0].model,
                          prompt)
    np.testing.assert_allclose(compute_logits(engine.model, prompt)[0], want[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setting, fp8, tp, backend, want", [
    ("auto", True, 1, "gpu", True),
    ("auto", False, 1, "gpu", False),  # bf16 gains nothing from it
    ("auto", True, 2, "gpu", True),  # (each layer split over the group as its stack)
    ("auto", True, 1, "cpu", False),  # CPU keeps its rolled loop (small executables)
    ("per-layer", False, 1, "cpu", True),
    ("stacked", True, 1, "gpu", False),
])
def test_auto_layer_weights_are_per_layer_for_fp8_weights_on_gpus(
        setting, fp8, tp, backend, want, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    config = EngineConfig(layer_weights=setting, tensor_parallel_size=tp)
    model = types.SimpleNamespace(quantization=object() if fp8 else None)
    assert uses_per_layer_weights(config, model) is want


def test_unstack_layers_slices_every_leaf_and_frees_the_stack():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4, 2)).astype(np.float32)
    b = rng.standard_normal((3, 2)).astype(np.float32)
    stacked = {"embed": np.ones(2), "layers": {"mlp": {"w": jax.numpy.asarray(w),
                                                       "b": jax.numpy.asarray(b)}}}
    out = unstack_layers(stacked, 3, delete=True)
    assert sorted(out) == ["embed", "layers_0", "layers_1", "layers_2"]
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(out[f"layers_{i}"]["mlp"]["w"]), w[i])
        np.testing.assert_array_equal(np.asarray(out[f"layers_{i}"]["mlp"]["b"]), b[i])
    assert stacked["layers"]["mlp"]["w"].is_deleted()
    with pytest.raises(ValueError, match="does not hold 4 layers"):
        unstack_layers({"layers": {"w": np.zeros((3, 2))}}, 4)


def test_per_layer_weights_are_checked():
    with pytest.raises(ConfigError, match="auto, stacked, per-layer"):
        Engine(model="tiny-llama", load_format="dummy", layer_weights="layered")
