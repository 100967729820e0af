"""Tensor-parallel checks that need several devices, run in one process of their own.

``test_tensor_parallel.py`` starts ``python -m tests.duetjax.tensor_parallel_run OUT.json``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (JAX reads it once, at start-up,
and the rest of the suite runs on one device). It runs every case and writes what the tests
assert on as JSON: per family, the tokens and logits of each group size against one device;
the shards each device holds; the compilations while serving at 2 devices.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from duetjax import Engine, SamplingParams
from models import compute_logits, load_model
from models.tensor_parallel import make_mesh
from tests.helpers import write_random_checkpoint
from tests.oracle import oracle_module

FAMILIES = {"llama": "llama_bias", "qwen3": "qwen3", "gemma": "gemma"}
"""Family -> the oracle's tiny case: Llama (4 q / 2 kv heads: at 4 devices each kv head is held
twice; q/k/v, o and MLP biases), Qwen3 (q/k norms, head_dim 32), Gemma (1 kv head, tied
embeddings, GeGLU)."""
SIZES = (1, 2, 4)
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 27)), list(range(40, 73)), [3]]
ENGINE = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, show_progress=False)


def tiny_checkpoint(directory: Path, case_name: str) -> Path:
    case = next(c for c in oracle_module().CASES if c.name == case_name)
    hf_config = dict(case.kwargs, architectures=[case.model_class], model_type=case.family)
    return write_random_checkpoint(directory, hf_config, fused=False)


def family_results(checkpoint: Path) -> tuple[dict, dict]:
    """Greedy tokens, logprobs and raw logits at each group size, against one device; and the
    shards (``shard_shapes``) of each group's engine."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3,
                            prompt_logprobs=3)
    runs, shards = {}, {}
    for size in SIZES:
        engine = Engine(checkpoint, tensor_parallel_size=size, compile_on_start=False, **ENGINE)
        outputs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                  use_tqdm=False)
        logits = compute_logits(load_model(checkpoint, dtype="float32", mesh=make_mesh(size)),
                                PROMPTS)
        runs[size] = (outputs, np.concatenate(logits))
        shards[size] = shard_shapes(engine)
    base_outputs, base_logits = runs[1]
    result = {}
    for size, (outputs, logits) in runs.items():
        result[size] = {
            "tokens": [o.outputs[0].token_ids for o in outputs],
            "logits_max_diff": float(np.abs(logits - base_logits).max()),
            "logprobs_max_diff": max(_logprob_diff(o.outputs[0].logprobs, b.outputs[0].logprobs)
                                     for o, b in zip(outputs, base_outputs)),
            "prompt_logprobs_max_diff": max(_logprob_diff(o.prompt_logprobs[1:],
                                                          b.prompt_logprobs[1:])
                                            for o, b in zip(outputs, base_outputs)),
        }
    return result, shards


def _logprob_diff(got: list[dict], want: list[dict]) -> float:
    """Largest difference of the logprobs two runs give the same tokens (inf: other tokens)."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if set(g) != set(w):
            return float("inf")
        worst = max(worst, *(abs(_value(g[t]) - _value(w[t])) for t in g))
    return worst


def _value(logprob) -> float:
    return float(getattr(logprob, "logprob", logprob))


def shard_shapes(engine: Engine) -> dict:
    """Each param's (and the KV pool's) global shape and the shapes of its per-device shards."""
    leaves = jax.tree_util.tree_flatten_with_path(engine.runner.params)[0]
    arrays = {"/".join(k.key for k in path): leaf for path, leaf in leaves}
    arrays["kv_pool"] = engine.runner.kv_pool
    return {name: {"shape": list(a.shape),
                   "devices": sorted(s.device.id for s in a.addressable_shards),
                   "shards": [list(s.data.shape) for s in a.addressable_shards]}
            for name, a in arrays.items()}


def fp8_tokens(checkpoint: Path, **options) -> dict:
    """Greedy tokens with FP8 weights (quantized as they load) at each group size, and the
    shards of the 2-device group's engine."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for size in (1, 2):
        engine = Engine(checkpoint, tensor_parallel_size=size, quantization="fp8",
                        compile_on_start=False, **ENGINE, **options)
        outputs = engine.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                  use_tqdm=False)
        tokens[size] = [o.outputs[0].token_ids for o in outputs]
    return {"tokens": tokens, "shards": shard_shapes(engine)}


def fp8_kv_logits(checkpoint: Path) -> dict:
    """Logits over an e4m3 pool at each group size against one device, with KV scales per
    layer and per KV head (heads with scales of their own: at 4 devices each of Llama's 2 KV
    heads is held twice, and each copy must keep its head's scale). The per-head scales fit
    head 0's keys and values (about 3 at most) and clamp head 1's, so a head that reads
    another's scale changes the logits: "swapped", one device with the heads' scales
    reversed, is the size of such a mix-up."""
    def logits(size: int, form: str) -> np.ndarray:
        loaded = load_model(checkpoint, dtype="float32", mesh=make_mesh(size))
        layers, heads = loaded.config.num_layers, loaded.config.num_kv_heads
        if form == "per-layer":
            scales = tuple((0.02 * (i + 1), 0.03) for i in range(layers))
        else:
            fits = [h % 2 == 0 for h in range(heads)]
            if form == "swapped":
                fits = fits[::-1]
            scales = tuple((tuple(0.02 * (i + 1) if fit else 0.002 for fit in fits),
                            tuple(0.03 if fit else 0.003 for fit in fits)) for i in range(layers))
        loaded = dataclasses.replace(loaded, kv_scales=scales)
        return np.concatenate(compute_logits(loaded, PROMPTS, kv_cache_dtype="fp8"))

    result = {}
    for form in ("per-layer", "per-head"):
        runs = {size: logits(size, form) for size in SIZES}
        result[form] = {size: float(np.abs(runs[size] - runs[1]).max()) for size in SIZES}
        if form == "per-head":
            result["swapped"] = float(np.abs(logits(1, "swapped") - runs[1]).max())
    return result


def compiles_while_serving(checkpoint: Path, size: int) -> list[str]:
    """Compilations while an engine that compiled at start-up serves a varied batch; then
    the GPU start-up's warm-up runs every executable once (on padding) on the group."""
    engine = Engine(checkpoint, tensor_parallel_size=size, **ENGINE)
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(6)
        batch = [{"prompt_token_ids": rng.integers(3, 300, size=n).tolist()}
                 for n in (1, 5, 17, 40, 70, 3)]  # chunked, mixed, decode
        params = [SamplingParams(temperature=t, max_tokens=m, ignore_eos=True, logprobs=lp,
                                 seed=1, repetition_penalty=r, prompt_logprobs=plp)
                  for t, m, lp, r, plp in zip([0, 1, 0.5, 0, 0.7, 1], [1, 20, 5, 12, 9, 7],
                                              [None, 2, None, 0, None, None],
                                              [1, 1, 1.3, 1, 1, 1.1],
                                              [None, 1, None, 0, None, 2])]
        engine.generate(batch, params, use_tqdm=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    engine.runner.warm_up(engine.compiled_buckets())
    return compiles


def main(out: Path) -> None:
    assert jax.device_count() >= max(SIZES), "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = {family: tiny_checkpoint(Path(tmp) / family, case)
                       for family, case in FAMILIES.items()}
        families = {family: family_results(path) for family, path in checkpoints.items()}
        results = {
            "families": {family: runs for family, (runs, _) in families.items()},
            "shards": {family: shards for family, (_, shards) in families.items()},
            "compiles": compiles_while_serving(checkpoints["llama"], 2),
            "fp8": fp8_tokens(checkpoints["llama"]),
            "fp8_per_layer": fp8_tokens(checkpoints["llama"], layer_weights="per-layer"),
            "fp8_kv": fp8_kv_logits(checkpoints["llama"]),
        }
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
