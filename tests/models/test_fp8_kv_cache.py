"""An FP8 KV cache: checkpoint scales (compressed-tensors ``kv_cache_scheme``), the model over
an e4m3 pool, and the engine's greedy tokens against a high-precision cache."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from models import CheckpointError, compute_logits, load_model
from tests.models.test_fp8 import _compressed, write_fp8_checkpoint

KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                   "symmetric": True}


def with_kv_scales(source: Path, out: Path, scales: dict[str, Any],
                   strategy: str = "tensor") -> Path:
    """``source`` as a compressed-tensors FP8 checkpoint declaring ``KV_CACHE_SCHEME`` (with
    ``strategy``), with ``model.layers.{i}.self_attn.NAME`` = value * (1 + i) for every layer
    and every ``scales`` entry (a number, or one per KV head)."""
    config = {**_compressed("channel"), "kv_cache_scheme": {**KV_CACHE_SCHEME, "strategy": strategy}}
    write_fp8_checkpoint(source, out, "channel", config)
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    scales = {f"model.layers.{i}.self_attn.{name}": np.asarray(value * (1 + i), np.float32)
              for i in range(layers) for name, value in scales.items()}
    save_file(scales, str(out / "kv_scales.safetensors"))  # a second shard, as tools write them
    return out


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    from tests.helpers import TINY_LLAMA, write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("llama"), TINY_LLAMA, fused=False)


def test_checkpoint_kv_scales_are_read_per_layer(hf_llama, tmp_path):
    model = load_model(with_kv_scales(hf_llama, tmp_path / "kv", {"k_scale": 0.5, "v_scale": 0.25}),
                       dtype="float32")
    assert model.kv_scales == ((0.5, 0.25), (1.0, 0.5))
    older = load_model(with_kv_scales(hf_llama, tmp_path / "older", {"kv_scale": 0.125}),
                       dtype="float32")
    assert older.kv_scales == ((0.125, 0.125), (0.25, 0.25))  # one scale for K and V
    assert load_model(hf_llama, dtype="float32").kv_scales is None


def test_converted_checkpoint_keeps_its_kv_scales(hf_llama, tmp_path):
    """``duetjax.convert`` carries an FP8 checkpoint's KV cache scales: the Orbax checkpoint
    loads them, and its logits over an e4m3 pool equal the source's."""
    from models.orbax_writer import convert_to_orbax

    source = with_kv_scales(hf_llama, tmp_path / "kv", {"k_scale": 0.05, "v_scale": 0.03})
    converted = load_model(convert_to_orbax(source, tmp_path / "orbax", dtype="float32"),
                           dtype="float32")
    original = load_model(source, dtype="float32")
    assert converted.kv_scales == original.kv_scales
    np.testing.assert_allclose(converted.kv_scales, [(0.05, 0.03), (0.1, 0.06)], rtol=1e-6)
    prompts = [[5, 17, 42, 99, 7, 3, 250, 11] * 2]
    for got, want in zip(compute_logits(converted, prompts, kv_cache_dtype="fp8"),
                         compute_logits(original, prompts, kv_cache_dtype="fp8")):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    (tmp_path / "orbax" / "kv_scales.json").write_text('{"k_scale": [1.0], "v_scale": [1.0]}')
    with pytest.raises(CheckpointError, match="1 K and 1 V scales for 2 layers"):
        load_model(tmp_path / "orbax", dtype="float32")


def test_per_head_kv_scales_are_read_kept_and_applied_per_head(hf_llama, tmp_path):
    """``kv_cache_scheme.strategy: attn_head``: one K and V scale per KV head. They load per
    head, survive conversion, and each head's scale is its own: scales equal across heads give
    the per-layer checkpoint's logits exactly, and scales that differ give other logits."""
    from models.orbax_writer import convert_to_orbax

    heads = json.loads((hf_llama / "config.json").read_text())["num_key_value_heads"]
    assert heads >= 2
    per_head = {"k_scale": np.linspace(0.03, 0.09, heads), "v_scale": np.full(heads, 0.04)}
    model = load_model(with_kv_scales(hf_llama, tmp_path / "heads", per_head, "attn_head"),
                       dtype="float32")
    np.testing.assert_allclose(model.kv_scales[1][0], 2 * per_head["k_scale"], rtol=1e-6)
    assert len(model.kv_scales) == 2 and all(len(k) == len(v) == heads for k, v in model.kv_scales)
    converted = load_model(convert_to_orbax(tmp_path / "heads", tmp_path / "orbax", dtype="float32"),
                           dtype="float32")
    assert converted.kv_scales == model.kv_scales

    equal = load_model(with_kv_scales(hf_llama, tmp_path / "equal",
                                      {"k_scale": np.full(heads, 0.05), "v_scale": np.full(heads, 0.04)},
                                      "attn_head"), dtype="float32")
    layer = load_model(with_kv_scales(hf_llama, tmp_path / "layer", {"k_scale": 0.05, "v_scale": 0.04}),
                       dtype="float32")
    prompts = [[5, 17, 42, 99, 7, 3, 250, 11] * 2]
    logits = lambda m: np.asarray(compute_logits(m, prompts, kv_cache_dtype="fp8")[0])
    np.testing.assert_array_equal(logits(equal), logits(layer))
    assert np.abs(logits(model) - logits(layer)).max() > 0
    with pytest.raises(CheckpointError, match="3 values; expected 1 .per layer. or 2 .per KV head."):
        load_model(with_kv_scales(hf_llama, tmp_path / "bad", {"kv_scale": np.ones(3)}),
                   dtype="float32")


@pytest.mark.parametrize("scales, match", [
    ({"k_scale": 0.5}, r"model\.layers\.0\.self_attn\.v_scale.*missing"),
    ({"k_scale": -1.0, "v_scale": 1.0}, "finite and positive"),
])
def test_bad_kv_scales_are_refused_by_name(hf_llama, tmp_path, scales, match):
    with pytest.raises(CheckpointError, match=match):
        load_model(with_kv_scales(hf_llama, tmp_path, scales), dtype="float32")


def test_fp8_pool_follows_the_checkpoint_scales(hf_llama, tmp_path):
    """Logits over an e4m3 pool stay near the float32 pool's (about 9 % relative on this random
    model, which amplifies its K/V rounding); scales far too small for the activations (most
    elements clamped) move them by more than their own size: the scales are applied."""
    prompts = [[5, 17, 42, 99, 7, 3, 250, 11] * 3, [1, 2, 3]]
    fitted = load_model(with_kv_scales(hf_llama, tmp_path / "fit", {"k_scale": 0.05, "v_scale": 0.05}),
                        dtype="float32")
    clamped = load_model(with_kv_scales(hf_llama, tmp_path / "clamp", {"k_scale": 1e-4, "v_scale": 1e-4}),
                         dtype="float32")
    exact = compute_logits(fitted, prompts)
    err = lambda got: max(np.linalg.norm(g - w) / np.linalg.norm(w) for g, w in zip(got, exact))
    near, far = (err(compute_logits(m, prompts, kv_cache_dtype="fp8")) for m in (fitted, clamped))
    assert 0 < near < 0.15 and far > 0.5, (near, far)


def test_fp8_kv_cache_keeps_greedy_tokens_and_halves_the_pool(smollm2_dir):
    """The embedded SmolLM2 with an e4m3 KV cache (scales 1.0): half the pool's bytes per
    token, and the high-precision cache's greedy tokens. Once a greedy path takes another token
    everything after it differs, so beyond the first tokens agreement is counted with the
    high-precision path as the input (teacher forcing)."""
    import jax.numpy as jnp

    from duetjax import Engine, SamplingParams

    options = dict(dtype="bfloat16", max_num_seqs=4, compile_on_start=False, show_progress=False,
                   kv_cache_tokens=4096, max_model_len=512)
    full = Engine(smollm2_dir, **options)
    fp8 = Engine(smollm2_dir, kv_cache_dtype="fp8", **options)
    assert fp8.kv_cache_dtype == jnp.float8_e4m3fn and full.kv_cache_dtype == jnp.bfloat16
    assert fp8.runner.kv_pool.dtype == jnp.float8_e4m3fn
    assert fp8.runner.kv_pool.nbytes * 2 == full.runner.kv_pool.nbytes
    prompts = [{"prompt_token_ids": full.tokenizer.encode(text)} for text in
               ("The capital of France is", "def fibonacci(n):", "Once upon a time")]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in full.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in fp8.generate(prompts, params, use_tqdm=False)]
    assert all(g[:2] == w[:2] for g, w in zip(got, want))
    paths = [p["prompt_token_ids"] + w for p, w in zip(prompts, want)]
    logits = compute_logits(fp8.model, paths, kv_cache_dtype="fp8")
    agree = [np.mean(row[len(p["prompt_token_ids"]) - 1:-1].argmax(-1) == w)
             for row, p, w in zip(logits, prompts, want)]
    assert np.mean(agree) >= 0.8, agree
