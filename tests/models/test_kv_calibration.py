"""FP8 KV scales computed from the model's own keys and values (``calculate_kv_scales``): a
model whose keys and values sit far below e4m3's normal range loses its attention with unit
scales and keeps it with computed ones."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from duetjax import Engine
from duetjax.config import ConfigError
from models import compute_logits, load_model
from models.kv_calibration import (FP8_MAX, HEADROOM, calculate_kv_scales, calibration_tokens,
                                   kv_amax, power_of_two_scales)
from pallas_kernels.kv_layout import quantize_kv

PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11, 64, 31, 8, 120], [1, 2, 3, 4, 5, 6]]


def with_small_keys_and_values(loaded, factor: float, head: int | None = None):
    """``loaded`` with its k and v projection rows (of the fused qkv weight) times ``factor``:
    every KV head's, or ``head``'s only."""
    cfg = loaded.config
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    params = dict(loaded.params)
    layers = dict(params["layers"])
    attn = dict(layers["self_attn"])
    qkv = dict(attn["qkv_proj"])
    weight = np.array(qkv["weight"])
    if head is None:
        weight[:, q_size:] *= factor  # ([layers, out, in]: the rows of k and v)
    else:
        for start in (q_size, q_size + kv_size):
            rows = slice(start + head * cfg.head_dim, start + (head + 1) * cfg.head_dim)
            weight[:, rows] *= factor
    qkv["weight"] = weight
    attn["qkv_proj"], layers["self_attn"], params["layers"] = qkv, attn, layers
    return dataclasses.replace(loaded, params=params)


def relative_error(got, want) -> float:
    return max(float(np.linalg.norm(g - w) / np.linalg.norm(w)) for g, w in zip(got, want))


def test_computed_scales_keep_small_keys_and_values(tiny_llama_hf_dir):
    loaded = with_small_keys_and_values(load_model(tiny_llama_hf_dir, dtype="float32"), 1e-3)
    amax = kv_amax(loaded, calibration_tokens(loaded))
    cfg = loaded.config
    assert amax.shape == (cfg.num_layers, 2, cfg.num_kv_heads) and (amax > 0).all()
    assert amax.max() < 2 ** -6  # below e4m3's normal range at a unit scale
    scales = calculate_kv_scales(loaded)
    assert scales == power_of_two_scales(amax.max(axis=2))

    want = compute_logits(loaded, PROMPTS)
    unit = relative_error(compute_logits(loaded, PROMPTS, kv_cache_dtype="fp8"), want)
    computed = relative_error(compute_logits(dataclasses.replace(loaded, kv_scales=scales),
                                             PROMPTS, kv_cache_dtype="fp8"), want)
    assert computed < 0.02 and unit > 5 * computed, (unit, computed)


def test_a_quiet_kv_head_keeps_full_precision_under_the_layers_scale(tiny_llama_hf_dir):
    """Why computed scales are per layer: one KV head's keys and values made 1000x smaller
    than the others' still round-trip through e4m3 at its full precision (half a 3-bit
    mantissa step) under the layer's scale, set by the large heads. Its own per-head scale,
    1000x smaller, rounds no finer."""
    cfg = load_model(tiny_llama_hf_dir, dtype="float32").config
    assert cfg.num_kv_heads >= 2
    small = with_small_keys_and_values(load_model(tiny_llama_hf_dir, dtype="float32"), 1e-3,
                                       head=1)
    amax = kv_amax(small, calibration_tokens(small))  # [layers, 2, heads]
    assert (amax[:, :, 1] * 100 < amax[:, :, 0]).all()
    layer_scales = np.asarray(calculate_kv_scales(small))  # [layers, 2]
    assert layer_scales.shape == (cfg.num_layers, 2)
    np.testing.assert_array_equal(layer_scales, power_of_two_scales(amax.max(axis=2)))
    head_scales = np.asarray(power_of_two_scales(amax))  # [layers, 2, heads]
    assert head_scales.shape == (cfg.num_layers, 2, cfg.num_kv_heads)

    values = np.random.default_rng(0).uniform(0.3, 1.0, 1000) * amax[0, 1, 1]  # head 1's V
    def worst_relative_error(scale):
        stored = np.asarray(quantize_kv(jnp.asarray(values), jnp.float32(scale)), np.float32)
        return float(np.max(np.abs(stored * scale - values) / values))
    assert layer_scales[0, 1] > 256 * head_scales[0, 1, 1]
    assert worst_relative_error(layer_scales[0, 1]) <= 1 / 16
    assert worst_relative_error(head_scales[0, 1, 1]) <= 1 / 16


def test_scales_are_the_powers_of_two_that_leave_the_headroom():
    amax = np.asarray([[FP8_MAX / HEADROOM, 3.0], [0.0, 1e-4]], np.float32)
    scales = np.asarray(power_of_two_scales(amax))
    np.testing.assert_array_equal(scales, [[1.0, 2.0 ** -5], [1.0, 2.0 ** -20]])
    assert (amax <= scales * FP8_MAX / HEADROOM).all()  # the headroom holds
    assert (scales * FP8_MAX / HEADROOM < 2 * np.maximum(amax, 1e-30))[amax > 0].all()  # tight


def test_the_engine_computes_scales_only_where_the_checkpoint_has_none(tiny_llama_hf_dir):
    options = dict(dtype="float32", kv_cache_dtype="fp8", max_num_seqs=4,
                   max_num_batched_tokens=64, kv_cache_tokens=1024, compile_on_start=False)
    engine = Engine(str(tiny_llama_hf_dir), calculate_kv_scales=True, **options)
    scales = engine.runner.model.kv_scales
    assert scales is not None and len(scales) == engine.runner.model.config.num_layers
    assert Engine(str(tiny_llama_hf_dir), **options).runner.model.kv_scales is None
    with pytest.raises(ConfigError, match="aggregated mode only"):
        Engine(str(tiny_llama_hf_dir), calculate_kv_scales=True, mode="duet", **options)
