"""Test helpers that need neither torch nor the network."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from models.checkpoint import FUSED, hf_names, member_features, random_params
from models.config import ModelConfig

TINY_LLAMA = json.loads((Path(__file__).parents[1] / "models" / "configs" / "tiny-llama"
                         / "config.json").read_text())
"""A 2-layer Llama of width 64 (the shipped ``tiny-llama`` config)."""


def write_random_checkpoint(directory: Path, hf_config: dict, seed: int = 0, scale: float = 5.0,
                            fused: bool = True) -> Path:
    """A Hugging Face directory (config.json + model.safetensors) with random weights.

    Weights are scaled up from the 0.02 init so logits are well separated (no greedy ties).
    ``fused``: q/k/v and gate/up as duetjax's fused tensors (``qkv_proj``, ``gate_up_proj``);
    False: split into HF's own members, the same weights in the names transformers loads.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config))
    config = ModelConfig.from_hf(hf_config)
    params = random_params(config, np.float32, seed=seed)
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [k.key for k in path]
        names = hf_names(keys, config.num_layers)
        value = np.asarray(leaf) * (1.0 if "norm" in keys[-2] else scale)
        if len(names) == 1 and not names[0].startswith("model.layers."):
            tensors[names[0]] = value
        else:
            tensors.update({name: value[i] for i, name in enumerate(names)})
        if not fused and keys[-2] in FUSED:
            for name in names:
                tensors.update(_split_fused(tensors.pop(name), name, keys[-2], config))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def _split_fused(value: np.ndarray, name: str, fused_name: str,
                 config: ModelConfig) -> dict[str, np.ndarray]:
    """HF's member tensors of one layer's fused tensor (rows in ``FUSED`` order)."""
    members = FUSED[fused_name]
    ends = np.cumsum([member_features(config, m) for m in members])
    return {name.replace(fused_name, member): part
            for member, part in zip(members, np.split(value, ends[:-1], axis=0))}


HOST_DEVICES = 8
"""Host devices of the processes that check tensor parallelism (``run_on_host_devices``)."""


def run_on_host_devices(module: str, out: Path) -> dict:
    """What ``python -m module OUT.json`` writes, run in a process with ``HOST_DEVICES`` host
    devices: JAX reads the device count once, at start-up, and the test process keeps one."""
    flags = os.environ.get("XLA_FLAGS", "")
    flags += f" --xla_force_host_platform_device_count={HOST_DEVICES}"
    result = subprocess.run([sys.executable, "-m", module, str(out)],
                            cwd=Path(__file__).parents[1], env={**os.environ, "XLA_FLAGS": flags},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())
