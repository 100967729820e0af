"""Broken checkpoints fail with a ``CheckpointError`` that says what is wrong, and sharded
checkpoints load to the same model as single-file ones.

Each test copies a real ``save_pretrained`` directory from the oracle (tools/hf_oracle.py)
and breaks one thing in it, with safetensors' numpy API (no torch in this environment).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

BASE_CASE = "llama2"
"""An untied Llama (it has ``lm_head.weight``) saved as one model.safetensors."""


@pytest.fixture
def checkpoint(oracle_cases, tmp_path) -> Path:
    """A private copy of the oracle's Llama checkpoint, free to break."""
    return Path(shutil.copytree(oracle_cases[BASE_CASE], tmp_path / BASE_CASE))


def _read_all(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _load_error(path: Path) -> str:
    from models import CheckpointError, load_model

    with pytest.raises(CheckpointError) as info:
        load_model(path, dtype="float32")
    assert isinstance(info.value, ValueError), "CheckpointError must be a ValueError"
    return str(info.value)


def _shapes_in(message: str) -> set[tuple[int, ...]]:
    """Every shape-like group of integers ("(64, 32)", "[64, 32]", "64x32") in a message."""
    groups = re.findall(r"\d+(?:\s*[,x×]\s*\d+)+", message)
    return {tuple(int(n) for n in re.findall(r"\d+", g)) for g in groups}


def test_missing_config_names_the_file(checkpoint):
    (checkpoint / "config.json").unlink()
    message = _load_error(checkpoint)
    assert "config.json" in message and str(checkpoint) in message, message


def test_unknown_architecture_names_it_and_the_supported_ones(checkpoint):
    from models import ARCHITECTURES

    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"], config["model_type"] = ["FooForCausalLM"], "foo"
    (checkpoint / "config.json").write_text(json.dumps(config))
    message = _load_error(checkpoint)
    assert "FooForCausalLM" in message, message
    missing = [name for name in ARCHITECTURES if name not in message]
    assert not missing, f"supported architectures not listed: {missing}; message: {message}"


@pytest.mark.parametrize("keep", [0.5, 0.999, 16], ids=["half", "last-byte", "in-header"])
def test_truncated_safetensors_names_the_file(checkpoint, keep):
    weights = checkpoint / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(int(size * keep) if keep < 1 else int(keep))
    message = _load_error(checkpoint)
    assert "model.safetensors" in message and "truncat" in message.lower(), message


def test_wrong_shape_names_the_tensor_and_both_shapes(checkpoint):
    weights = checkpoint / "model.safetensors"
    tensors = _read_all(weights)
    name = "model.layers.1.self_attn.k_proj.weight"
    expected = tensors[name].shape
    tensors[name] = tensors[name][:-1]  # one output row short
    save_file(tensors, str(weights), metadata={"format": "pt"})
    message = _load_error(checkpoint)
    assert name in message, message
    shapes = _shapes_in(message)
    assert tuple(expected) in shapes and tuple(tensors[name].shape) in shapes, \
        f"want both {tuple(expected)} and {tuple(tensors[name].shape)} in: {message}"


def test_missing_tensor_is_named(checkpoint):
    weights = checkpoint / "model.safetensors"
    tensors = _read_all(weights)
    name = "model.layers.0.mlp.up_proj.weight"
    del tensors[name]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    message = _load_error(checkpoint)
    assert name in message, message


def _shard(checkpoint: Path) -> dict[str, str]:
    """Splits model.safetensors into two shards plus model.safetensors.index.json (HF layout)."""
    weights = checkpoint / "model.safetensors"
    tensors = _read_all(weights)
    names = sorted(tensors)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for file, part in zip(files, halves):
        save_file({n: tensors[n] for n in part}, str(checkpoint / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    weights.unlink()
    total = sum(t.nbytes for t in tensors.values())
    (checkpoint / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return weight_map


def test_sharded_checkpoint_gives_the_same_logits(checkpoint, oracle_cases, expected_of):
    from models import compute_logits, load_model

    prompts = expected_of(BASE_CASE).prompts
    single = compute_logits(load_model(oracle_cases[BASE_CASE], dtype="float32"), prompts)
    _shard(checkpoint)
    sharded = compute_logits(load_model(checkpoint, dtype="float32"), prompts)
    for a, b in zip(single, sharded):
        np.testing.assert_array_equal(a, b)


def test_sharded_checkpoint_missing_shard_is_named(checkpoint):
    _shard(checkpoint)
    (checkpoint / "model-00002-of-00002.safetensors").unlink()
    message = _load_error(checkpoint)
    assert "model-00002-of-00002.safetensors" in message, message


def test_malformed_generation_config_names_the_file(tiny_llama_dir, tmp_path):
    path = Path(shutil.copytree(tiny_llama_dir, tmp_path / "tiny"))
    (path / "generation_config.json").write_text('{"temperature": 0.7,')
    assert re.search(r"generation_config\.json is not valid JSON", _load_error(path))
