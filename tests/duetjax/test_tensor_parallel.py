"""Tensor parallelism (``tensor_parallel_size``): every group size gives the tokens and logits
of one device, each device holds only its slices, and bad sizes are refused by name.

The multi-device checks run in one process with 8 host devices (the ``tensor_parallel_results``
fixture, ``tensor_parallel_run.py``); the layout and the errors run here."""
from __future__ import annotations

import numpy as np
import pytest

from duetjax import Engine
from duetjax.config import ConfigError, EngineConfig
from models import ModelConfig
from models.tensor_parallel import (TensorParallelError, check, fused_rows, held_config,
                                    kv_pool_spec, param_spec, split_fused)
from tests.helpers import TINY_LLAMA

from .tensor_parallel_run import FAMILIES, SIZES

LLAMA = ModelConfig.from_hf(TINY_LLAMA)  # 4 q heads, 2 kv heads, head_dim 16


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_group_size_gives_the_tokens_and_logits_of_one_device(tensor_parallel_results,
                                                                    family):
    runs = tensor_parallel_results["families"][family]
    for size in map(str, SIZES):
        assert runs[size]["tokens"] == runs["1"]["tokens"], size
        assert runs[size]["logits_max_diff"] <= 1e-5, size
        assert runs[size]["logprobs_max_diff"] <= 1e-5, size
        assert runs[size]["prompt_logprobs_max_diff"] <= 1e-5, size


@pytest.mark.parametrize("case", ["fp8", "fp8_per_layer"])
def test_fp8_weights_split_too(tensor_parallel_results, case):
    """FP8 weights, stacked or with arrays of their own per layer (each layer split over the
    group as its stack was)."""
    tokens = tensor_parallel_results[case]["tokens"]
    assert tokens["2"] == tokens["1"]
    per_layer = case == "fp8_per_layer"
    arrays = tensor_parallel_results[case]["shards"]
    assert any(name.startswith("layers_1/") for name in arrays) is per_layer
    assert_each_device_holds_its_slice(arrays, 2)


@pytest.mark.parametrize("form", ["per-layer", "per-head"])
def test_fp8_kv_cache_scales_split_with_the_heads(tensor_parallel_results, form):
    """An e4m3 pool with KV scales per layer or per KV head: every group size gives one
    device's logits (at 4 devices each KV head, and its scale, is held twice)."""
    results = tensor_parallel_results["fp8_kv"]
    diffs = results[form]
    assert set(diffs) == set(map(str, SIZES))
    # An element near an e4m3 rounding boundary may round the other way after the group's
    # differently ordered sums (5e-4 measured with a clamped head, 2e-6 without); a head
    # that reads another's scale moves the logits by about 1.4.
    assert all(diff <= 2e-3 for diff in diffs.values()), diffs
    assert results["swapped"] > 100 * max(diffs.values()), (results["swapped"], diffs)


def assert_each_device_holds_its_slice(arrays: dict, size: int) -> None:
    """``arrays`` (``shard_shapes``) split over ``size`` devices as ``param_spec`` says."""
    for name, array in arrays.items():
        keys = name.split("/")
        spec = kv_pool_spec() if name == "kv_pool" else param_spec(keys, keys[0] == "layers")
        split = [s // size if i < len(spec) and spec[i] else s
                 for i, s in enumerate(array["shape"])]
        assert array["devices"] == list(range(size)), name
        assert array["shards"] == [split] * size, (size, name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_device_holds_only_its_slice(tensor_parallel_results, family):
    for size, arrays in tensor_parallel_results["shards"][family].items():
        size = int(size)
        assert_each_device_holds_its_slice(arrays, size)
        # the Megatron split: heads and MLP rows, o/down columns and the vocabulary are split
        assert arrays["layers/self_attn/o_proj/weight"]["shards"][0][2] * size == \
            arrays["layers/self_attn/o_proj/weight"]["shape"][2]
        assert arrays["embed_tokens/weight"]["shards"][0][0] * size == \
            arrays["embed_tokens/weight"]["shape"][0]


def test_fused_rows_put_each_devices_heads_together():
    """Rows numbered in HF's [q; k; v] order: at 4 devices each device's block is its q head,
    then a copy of the kv head its q head reads (2 kv heads for 4 devices), k then v."""
    d = LLAMA.head_dim
    members = [("q_proj", 4 * d), ("k_proj", 2 * d), ("v_proj", 2 * d)]
    rows = np.arange(8 * d)
    head = lambda first: list(range(first, first + d))
    q, k, v = (lambda h: head(h * d)), (lambda h: head((4 + h) * d)), (lambda h: head((6 + h) * d))
    want = [r for dev in range(4) for r in q(dev) + k(dev // 2) + v(dev // 2)]
    assert fused_rows(rows, members, LLAMA, 4).tolist() == want
    assert fused_rows(rows, members, LLAMA, 1) is rows
    # the layer reads them back per device: q in HF's order, each kv head twice in a row
    q_out, k_out, v_out = split_fused(np.asarray(want)[None], (4 * d, 4 * d, 4 * d), 4)
    assert q_out[0].tolist() == list(range(4 * d))
    assert k_out[0].tolist() == [r for h in (0, 0, 1, 1) for r in k(h)]
    assert v_out[0].tolist() == [r for h in (0, 0, 1, 1) for r in v(h)]
    assert held_config(LLAMA, 4).num_kv_heads == 4 and held_config(LLAMA, 2) is LLAMA


def test_sizes_that_do_not_divide_the_model_are_refused_by_name():
    check(LLAMA, 2)
    check(LLAMA, 4)
    with pytest.raises(TensorParallelError, match="3 does not divide .*num_attention_heads"):
        check(LLAMA, 3)
    with pytest.raises(TensorParallelError, match="num_key_value_heads"):
        check(ModelConfig.from_hf(dict(TINY_LLAMA, num_attention_heads=6,
                                       num_key_value_heads=3, hidden_size=96)), 2)


def test_engine_options_are_checked_before_loading(tiny_llama_dir):
    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="duet mode") as duet:
        EngineConfig(tensor_parallel_size=2, mode="duet")
    assert duet.value.flag == "--tensor-parallel-size"
    with pytest.raises(ConfigError, match="tbt_slo_ms"):
        EngineConfig(tensor_parallel_size=2, tbt_slo_ms=50)
    with pytest.raises(ConfigError, match="more than the 1 local devices"):
        Engine(tiny_llama_dir, tensor_parallel_size=2)


def test_command_lines_take_the_flag():
    from duetjax import generate, serve

    assert generate.parse_args(["hi", "--tensor-parallel-size", "2"]).tensor_parallel_size == 2
    args = serve.parse_args(["--tensor-parallel-size", "4"])
    assert serve.engine_options(args)["tensor_parallel_size"] == 4
    assert "tensor_parallel_size" not in serve.engine_options(serve.parse_args([]))
