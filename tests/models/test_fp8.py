"""FP8 weights: published FP8 checkpoint layouts, quantization on load, and the FP8 GEMM.

Checkpoints are built here the way their tools write them: a tiny random Llama or Qwen3 in
Hugging Face names, its linear layers quantized with numpy and ml_dtypes into the exact tensor
names and ``quantization_config`` of compressed-tensors (per tensor, per channel) and of
block-wise ``fp8`` (Qwen3-FP8's layout). The reference is transformers (the oracle) on the same
weights dequantized, saved as a plain float32 checkpoint.
"""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import CheckpointError, compute_logits, load_model
from models.quantization import fp8_linear
from tests.helpers import TINY_LLAMA, write_random_checkpoint
from tests.oracle import run_prompt_logprobs

E4M3 = ml_dtypes.float8_e4m3fn
LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
PROMPTS = [[5, 17, 42, 99, 7, 3, 250, 11], [1, 2, 3], [200]]
COMPRESSED_TENSORS = {
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "quantization_status": "compressed", "kv_cache_scheme": None, "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                    "strategy": "channel", "group_size": None, "block_structure": None},
        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                              "dynamic": True, "strategy": "token"}}}}
BLOCK_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
             "weight_block_size": [128, 128]}
TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 256,
    "hidden_size": 256, "intermediate_size": 320, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
"""Big enough for several 128 x 128 blocks, some partial (320 = 2.5 blocks)."""


def _quantize(weight: np.ndarray, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 values, scale) of one weight as the published formats store it."""
    if strategy == "block":
        rows, cols = weight.shape
        padded = np.zeros((-(-rows // 128) * 128, -(-cols // 128) * 128), np.float32)
        padded[:rows, :cols] = weight
        blocks = padded.reshape(padded.shape[0] // 128, 128, padded.shape[1] // 128, 128)
        scale = (np.abs(blocks).max(axis=(1, 3)) / 448).astype(np.float32)
        full = np.repeat(np.repeat(scale, 128, axis=0), 128, axis=1)[:rows, :cols]
        return (weight / full).astype(E4M3), scale
    amax = np.abs(weight).max(axis=1, keepdims=True) if strategy == "channel" else np.abs(weight).max()
    scale = np.asarray(amax / 448, np.float32).reshape((-1, 1) if strategy == "channel" else (1,))
    return (weight / scale).astype(E4M3), scale


def _dequantize(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    if scale.ndim == 2 and scale.shape[1] != 1:  # blocks
        full = np.repeat(np.repeat(scale, 128, axis=0), 128, axis=1)
        return values.astype(np.float32) * full[:values.shape[0], :values.shape[1]]
    return values.astype(np.float32) * scale


def write_fp8_checkpoint(source: Path, out: Path, strategy: str, quantization_config: dict,
                         leave_out: str = "") -> dict[str, np.ndarray]:
    """``source``'s linear layers in FP8 at ``out`` (without the tensor ``leave_out``);
    returns the dequantized tensors."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    tensors, dequantized = {}, {}
    scale_suffix = "weight_scale_inv" if quantization_config["quant_method"] == "fp8" else "weight_scale"
    for name, value in load_file(str(source / "model.safetensors")).items():
        if LINEAR.fullmatch(name):
            values, scale = _quantize(value, strategy)
            tensors[name], tensors[name[: -len("weight")] + scale_suffix] = values, scale
            dequantized[name] = _dequantize(values, scale)
        else:
            tensors[name] = dequantized[name] = value
    tensors.pop(leave_out, None)
    save_file(tensors, str(out / "model.safetensors"))
    return dequantized


def write_reference(source: Path, out: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A plain float32 checkpoint of ``tensors`` (what transformers runs)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text((source / "config.json").read_text())
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              str(out / "model.safetensors"))
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))


def relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    return max(float(np.linalg.norm(g - w) / np.linalg.norm(w)) for g, w in zip(got, want))


def effective_weight(params, path: tuple[str, ...], layer: int) -> np.ndarray:
    """A loaded FP8 linear layer's weight as it multiplies: values times per-row scales."""
    node = params
    for key in path:
        node = node[key]
    return np.asarray(node["weight"][layer], np.float32) * np.asarray(node["weight_scale"][layer])[:, None]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("llama"), TINY_LLAMA, fused=False)


@pytest.fixture(scope="module")
def hf_qwen3(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("qwen3"), TINY_QWEN3, fused=False)


def _compressed(strategy: str) -> dict:
    config = copy.deepcopy(COMPRESSED_TENSORS)
    config["config_groups"]["group_0"]["weights"]["strategy"] = strategy
    return config


@pytest.fixture(scope="module")
def fp8_checkpoints(hf_llama, hf_qwen3, tmp_path_factory):
    """{layout: (FP8 checkpoint dir, transformers' log-probs on its dequantized weights,
    the dequantized tensors)}; one oracle run per layout."""
    root = tmp_path_factory.mktemp("fp8")
    layouts = {"tensor": (hf_llama, "tensor", _compressed("tensor")),
               "channel": (hf_llama, "channel", _compressed("channel")),
               "block": (hf_qwen3, "block", BLOCK_FP8)}
    built = {}
    for layout, (source, strategy, qc) in layouts.items():
        tensors = write_fp8_checkpoint(source, root / layout, strategy, qc)
        reference = write_reference(source, root / f"{layout}-dequantized", tensors)
        expected = run_prompt_logprobs(reference, PROMPTS, root / f"{layout}-oracle")
        built[layout] = (root / layout, expected, tensors)
    return built


@pytest.mark.parametrize("layout", ["tensor", "channel"])
def test_compressed_tensors_loads_exactly_and_matches_transformers(layout, fp8_checkpoints):
    """Weight-only, the FP8 GEMM is the dequantized model's: logits as tight as the bf16
    parity tests'. Per-tensor scales of q, k and v differ; fused, each keeps its own."""
    path, expected, tensors = fp8_checkpoints[layout]
    loaded = load_model(path, dtype="float32", fp8_activation="none")
    assert loaded.quantization is not None
    qkv = loaded.params["layers"]["self_attn"]["qkv_proj"]
    assert qkv["weight"].dtype == jnp.float8_e4m3fn and qkv["weight_scale"].dtype == jnp.float32
    assert loaded.params["lm_head"]["weight"].dtype == jnp.float32  # in the ignore list
    for layer in range(2):
        fused = np.concatenate([tensors[f"model.layers.{layer}.self_attn.{m}_proj.weight"]
                                for m in "qkv"])
        np.testing.assert_array_equal(
            effective_weight(loaded.params, ("layers", "self_attn", "qkv_proj"), layer), fused)
    got = [log_softmax(x) for x in compute_logits(loaded, PROMPTS)]
    assert relative_error(got, expected) < 1e-4


def test_block_fp8_requantized_per_channel_stays_close(fp8_checkpoints):
    """Block-wise weights become per-channel ones: each element within one e4m3 rounding
    (1/16 relative to its row's largest block, at most) of the checkpoint's value."""
    path, expected, tensors = fp8_checkpoints["block"]
    loaded = load_model(path, dtype="float32", fp8_activation="none")
    for layer in range(2):
        want = np.concatenate([tensors[f"model.layers.{layer}.mlp.{m}_proj.weight"]
                               for m in ("gate", "up")])
        got = effective_weight(loaded.params, ("layers", "mlp", "gate_up_proj"), layer)
        row_max = np.abs(want).max(axis=1, keepdims=True)
        assert np.all(np.abs(got - want) <= row_max / 16 * 1.001)
        assert not np.array_equal(got, want)  # (the rows really were requantized)
    got = [log_softmax(x) for x in compute_logits(loaded, PROMPTS)]
    assert relative_error(got, expected) < 5e-2
    agree = np.mean([np.mean(g.argmax(-1) == w.argmax(-1)) for g, w in zip(got, expected)])
    assert agree >= 0.8


@pytest.mark.parametrize("layout", ["channel", "block"])
def test_w8a8_close_to_the_dequantized_model(layout, fp8_checkpoints):
    """Quantized activations add error against the dequantized model, a few percent at most."""
    path, expected, _ = fp8_checkpoints[layout]
    loaded = load_model(path, dtype="float32")
    assert loaded.quantization.activation == "dynamic"
    got = [log_softmax(x) for x in compute_logits(loaded, PROMPTS)]
    assert 0 < relative_error(got, expected) < 5e-2


def test_static_activation_scales_are_read_past(hf_llama, fp8_checkpoints, tmp_path):
    """A checkpoint calibrated with one static input_scale per tensor loads and runs as the
    same weights with per-token scales do (its input_scale tensors are not weights)."""
    static = _with(_with(_compressed("channel"),
                         "config_groups.group_0.input_activations.dynamic", False),
                   "config_groups.group_0.input_activations.strategy", "tensor")
    dequantized = write_fp8_checkpoint(hf_llama, tmp_path, "channel", static)
    save_file({name[: -len("weight")] + "input_scale": np.asarray([0.05], np.float32)
               for name in dequantized if LINEAR.fullmatch(name)},
              str(tmp_path / "input_scales.safetensors"))  # (a second file of the same model)
    got = compute_logits(load_model(tmp_path, dtype="float32"), PROMPTS)
    want = compute_logits(load_model(fp8_checkpoints["channel"][0], dtype="float32"), PROMPTS)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_fp8_linear_w8a8_matches_a_numpy_reference():
    """Per-token e4m3 activations times per-channel e4m3 weights, scales after the product."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 64)).astype(np.float32) * np.array([[1], [10], [0.01], [0], [3]], np.float32)
    w = (rng.normal(size=(48, 64)) * 0.3).astype(E4M3)
    w_scale = rng.uniform(0.01, 0.1, 48).astype(np.float32)
    x_scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-12) / 448
    xq = (x / x_scale).astype(E4M3).astype(np.float32)
    want = (xq @ w.astype(np.float32).T) * x_scale * w_scale
    got = np.asarray(fp8_linear(jnp.asarray(x), jnp.asarray(w), jnp.asarray(w_scale), "dynamic"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    weight_only = np.asarray(fp8_linear(jnp.asarray(x), jnp.asarray(w), jnp.asarray(w_scale), "none"))
    np.testing.assert_allclose(weight_only, x @ (w.astype(np.float32) * w_scale[:, None]).T,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, weight_only, rtol=1e-4)  # activations really were rounded


@pytest.mark.parametrize("leading", [(1,), (2, 3), (16,)])
def test_fp8_gemm_rows_are_a_multiple_of_16(leading):
    """cuBLASLt's FP8 matmul takes only multiples of 16: a small decode batch's activation rows
    are padded, so XLA keeps the float8 dot instead of upcasting every layer's weights."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(*leading, 64)), jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(48, 64)), jnp.float8_e4m3fn)
    scale = jnp.full((48,), 0.05, jnp.float32)
    hlo = jax.jit(fp8_linear, static_argnums=3).lower(x, w, scale, "dynamic").as_text()
    rows = [int(m) for m in re.findall(r"dot_general.*: \(tensor<(\d+)x64xf8E4M3FN>, tensor<48x", hlo)]
    assert rows and all(r % 16 == 0 for r in rows), hlo
    got = fp8_linear(x, w, scale, "dynamic")
    assert got.shape == (*leading, 48)
    want = fp8_linear(x.reshape(-1, 64)[None].repeat(16, 0).reshape(-1, 64), w, scale, "dynamic")
    np.testing.assert_array_equal(np.asarray(got).reshape(-1, 48),
                                  np.asarray(want)[:math.prod(leading)])


def test_quantization_fp8_keeps_greedy_tokens_and_halves_the_weights(smollm2_dir):
    """The embedded SmolLM2 quantized on load: FP8 linear layers in memory, and the unquantized
    model's greedy tokens. Once a greedy path takes another token everything after it differs,
    so beyond the first tokens agreement is counted with the unquantized path as the input."""
    from duetjax import Engine, SamplingParams

    options = dict(dtype="float32", max_num_seqs=4, compile_on_start=False, show_progress=False)
    full = Engine(smollm2_dir, **options)
    fp8 = Engine(smollm2_dir, quantization="fp8", **options)
    assert full.quantization is None and fp8.quantization == "fp8"
    leaves = jax.tree_util.tree_leaves_with_path(fp8.model.params)
    linear = [leaf for path, leaf in leaves if "proj" in jax.tree_util.keystr(path)
              and jax.tree_util.keystr(path).endswith("['weight']")]
    assert len(linear) == 4 and all(leaf.dtype == jnp.float8_e4m3fn for leaf in linear)
    assert fp8.model.params["embed_tokens"]["weight"].dtype == jnp.float32
    nbytes = lambda params: sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    assert nbytes(fp8.model.params) < 0.6 * nbytes(full.model.params)
    prompts = [{"prompt_token_ids": full.tokenizer.encode(text)} for text in
               ("The capital of France is", "def fibonacci(n):", "Once upon a time")]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in full.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in fp8.generate(prompts, params, use_tqdm=False)]
    assert all(g[:2] == w[:2] for g, w in zip(got, want)) and got != want
    paths = [p["prompt_token_ids"] + w for p, w in zip(prompts, want)]
    agree = [np.mean(logits[len(p["prompt_token_ids"]) - 1:-1].argmax(-1) == w)
             for logits, p, w in zip(compute_logits(fp8.model, paths), prompts, want)]
    assert np.mean(agree) >= 0.8, agree


def _config_with(quantization_config: dict) -> dict:
    return {**TINY_LLAMA, "quantization_config": quantization_config}


def _with(base: dict, path: str, value) -> dict:
    config = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[last] = value
    return config


@pytest.mark.parametrize("quantization_config, field", [
    ({"quant_method": "awq"}, "quant_method"),
    (_with(COMPRESSED_TENSORS, "format", "pack-quantized"), "format"),
    (_with(COMPRESSED_TENSORS, "config_groups.group_0.weights.num_bits", 4), "weights.num_bits"),
    (_with(COMPRESSED_TENSORS, "config_groups.group_0.weights.type", "int"), "weights.type"),
    (_with(COMPRESSED_TENSORS, "config_groups.group_0.weights.strategy", "group"), "weights.strategy"),
    (_with(_with(COMPRESSED_TENSORS, "config_groups.group_0.input_activations.dynamic", False),
           "config_groups.group_0.input_activations.strategy", "channel"),
     "input_activations.strategy"),
    (_with(COMPRESSED_TENSORS, "kv_cache_scheme", {"num_bits": 8, "type": "float",
                                                   "strategy": "channel"}),
     "kv_cache_scheme.strategy"),
    (_with(COMPRESSED_TENSORS, "kv_cache_scheme", {"num_bits": 8, "type": "int"}),
     "kv_cache_scheme.type"),
    (_with(COMPRESSED_TENSORS, "ignore", ["lm_head", "model.layers.0.mlp.down_proj"]), "ignore"),
    (_with(BLOCK_FP8, "weight_block_size", [64, 64]), "weight_block_size"),
    (_with(BLOCK_FP8, "activation_scheme", "per-group"), "activation_scheme"),
])
def test_unsupported_quantization_names_the_field(quantization_config, field, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_config_with(quantization_config)))
    with pytest.raises(CheckpointError, match=re.escape(field)):
        load_model(tmp_path, dtype="float32")


def test_float8_weight_without_a_scale_is_refused(hf_llama, tmp_path):
    write_fp8_checkpoint(hf_llama, tmp_path, "tensor", _compressed("tensor"),
                         leave_out="model.layers.1.mlp.down_proj.weight_scale")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*no scale"):
        load_model(tmp_path, dtype="float32")
