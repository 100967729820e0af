"""duetjax's own Orbax checkpoints split over several devices, checked in a process of their own.

``test_orbax.py`` starts ``python -m tests.models.orbax_tensor_parallel_run OUT.json`` with 8
host devices (``tests.helpers.run_on_host_devices``). Each tiny family of
``tests/duetjax/tensor_parallel_run.py``, and its Llama with FP8 weights, is converted with
``duetjax.convert`` and loaded at every group size; it writes, per checkpoint and size, how far
the float32 logits are from one device's load of the same checkpoint, and how the fused q/k/v
weight is split.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from models import compute_logits, load_model
from models.orbax_writer import convert_to_orbax
from models.tensor_parallel import make_mesh
from tests.duetjax.tensor_parallel_run import FAMILIES, PROMPTS, SIZES, tiny_checkpoint
from tests.models.test_fp8 import _compressed, write_fp8_checkpoint

FP8 = "llama-fp8"
"""The Llama with its linear layers in FP8 (compressed-tensors, a scale per output channel)."""


def checkpoints(root: Path) -> dict[str, tuple[Path, Path]]:
    """{name: (the checkpoint converted from, duetjax's own Orbax checkpoint of it)}."""
    sources = {family: tiny_checkpoint(root / family, case) for family, case in FAMILIES.items()}
    sources[FP8] = root / FP8
    write_fp8_checkpoint(sources["llama"], sources[FP8], "channel", _compressed("channel"))
    return {name: (source, convert_to_orbax(source, root / f"{name}-orbax", dtype="float32"))
            for name, source in sources.items()}


def size_results(source: Path, orbax: Path) -> dict:
    """Per group size: the logits' largest difference from one device's Orbax load (and, at
    one device, from the source checkpoint's), and the qkv weight's split."""
    def load(path: Path, size: int):
        # weight-only FP8: the group's sums differ from one device's in their order alone
        return load_model(path, dtype="float32", mesh=make_mesh(size), fp8_activation="none")

    def logits(loaded) -> np.ndarray:
        return np.concatenate(compute_logits(loaded, PROMPTS))

    base = logits(load(orbax, 1))
    results = {"source_max_diff": float(np.abs(logits(load(source, 1)) - base).max())}
    for size in SIZES:
        loaded = load(orbax, size)
        qkv = loaded.params["layers"]["self_attn"]["qkv_proj"]["weight"]
        results[size] = {
            "logits_max_diff": float(np.abs(logits(loaded) - base).max()),
            "fp8": loaded.quantization is not None,
            "qkv_shape": list(qkv.shape),
            "qkv_shards": [list(s.data.shape) for s in qkv.addressable_shards],
        }
    return results


def main(out: Path) -> None:
    assert jax.device_count() >= max(SIZES), "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: size_results(source, orbax)
                   for name, (source, orbax) in checkpoints(Path(tmp)).items()}
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
