"""Per-layer K and V scales of an FP8 KV cache computed from the model's own keys and values
over a calibration text, for checkpoints that ship none (``EngineConfig.calculate_kv_scales``).

The text runs through the model in one prefill with a high-precision pool; each layer's largest
key and value magnitudes then map to at most ``FP8_MAX / HEADROOM``, leaving room for prompts
whose activations run larger than the text's.

One scale per layer, not per KV head (which the kernels also take, from checkpoints): e4m3's
normal range spans 2^15, so a head whose values run 1000x below the layer's largest still
rounds at full precision under the layer's scale, while a per-head scale fitted to a head that
is quiet on the calibration text would clamp it on a prompt that is not.

Scales are powers of two: within e4m3's normal range a scale changes where values round, not
how finely (the relative step is the same everywhere in [2^-6, 448]), so a power of two moves
the range to the model's activations and rounds exactly as a unit scale would inside it.
Without computed scales an FP8 pool scales by 1.0: fine where keys and values sit in
[2^-6, 448], coarse for a model whose activations are much smaller (a unit scale flushes them
toward zero) or larger (it clamps them).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

from .decoder import Decoder
from .kv_scales import KVScales
from .loader import LoadedModel
from .logits import prefill_inputs
from .quantization import FP8_MAX

HEADROOM = 4.0
"""How many times the text's largest key (value) a prompt's may be before e4m3 clamps it."""
MAX_TOKENS = 512
"""Tokens of the text run through the model."""
CALIBRATION_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a screw press adapted from wine "
    "making. Books that had taken a scribe months to copy could be printed by the hundred in "
    "weeks, and within fifty years presses were running in more than two hundred European "
    "cities.\n\nQ: What is the capital of France?\nA: Paris is the capital and largest city of "
    "France, on the Seine.\n\ndef fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\nPhotosynthesis turns light, water and carbon "
    "dioxide into sugar and oxygen. In the light reactions, chlorophyll absorbs photons and "
    "splits water; in the Calvin cycle, the energy stored in ATP and NADPH fixes carbon into "
    "three-carbon sugars.\n\n| city | population |\n| --- | ---: |\n| Tokyo | 37,400,068 |\n"
    "| Delhi | 28,514,000 |\n\nUser: Can you summarise the plot of Hamlet in two sentences?\n"
    "Assistant: Prince Hamlet learns that his uncle murdered his father to take the throne, "
    "and his hesitation to avenge him sets off a chain of deaths. By the end, Hamlet, his "
    "mother, his uncle and Laertes all lie dead, and Fortinbras of Norway takes the crown.\n")


@functools.lru_cache(maxsize=4)
def _amax_forward(config, dtype: Any, impl: str, quantization, mesh):
    model = Decoder(config, impl=impl, dtype=dtype, quantization=quantization, mesh=mesh)

    def run(params, tokens, kv_pool, meta):
        _, state = model.apply({"params": params}, tokens, kv_pool, meta,
                               method=Decoder.hidden_states, mutable=["intermediates"])
        return state["intermediates"]["layers"]["self_attn"]["kv_amax"][0]  # [layers, 2, Hkv]
    return jax.jit(run)


def kv_amax(loaded: LoadedModel, token_ids: Sequence[int], impl: str = "auto") -> np.ndarray:
    """float32 ``[layers, 2, num_kv_heads]``: each layer's largest key and value magnitude per
    KV head over one prefill of ``token_ids`` (a high-precision pool)."""
    cfg, tokens, pool, meta = prefill_inputs(loaded, [list(token_ids)], 16, loaded.dtype)
    forward = _amax_forward(cfg, loaded.dtype, impl, loaded.quantization, loaded.mesh)
    amax = np.asarray(forward(loaded.params, tokens, pool, meta))
    heads = loaded.config.num_kv_heads  # a tensor-parallel group may hold each head r times
    return amax.reshape(*amax.shape[:2], heads, -1).max(axis=-1)


def calibration_tokens(loaded: LoadedModel) -> list[int]:
    """The calibration text in the model's tokens (at most ``MAX_TOKENS``); without a
    tokenizer, a fixed random draw of its vocabulary."""
    if loaded.tokenizer is not None:
        return list(loaded.tokenizer.encode(CALIBRATION_TEXT))[:MAX_TOKENS]
    rng = np.random.default_rng(0)
    return rng.integers(0, loaded.config.vocab_size, MAX_TOKENS).tolist()


def calculate_kv_scales(loaded: LoadedModel) -> KVScales:
    """(K scale, V scale) per layer: the power of two at or above the calibration text's
    largest magnitude over ``FP8_MAX / HEADROOM`` (a layer whose keys or values are all zero
    keeps 1.0)."""
    return power_of_two_scales(kv_amax(loaded, calibration_tokens(loaded)).max(axis=2))


def power_of_two_scales(amax: np.ndarray) -> KVScales:
    """The power-of-two scales of the largest magnitudes ``amax``: ``[layers, 2]`` gives
    scales per layer (``calculate_kv_scales``), ``[layers, 2, num_kv_heads]`` per KV head."""
    wanted = np.where(amax > 0, amax * HEADROOM / FP8_MAX, 1.0)
    scales = np.exp2(np.ceil(np.log2(wanted)))
    if scales.ndim == 2:
        return tuple((float(k), float(v)) for k, v in scales)
    return tuple((tuple(map(float, k)), tuple(map(float, v))) for k, v in scales)
