"""FP8 weights: e4m3 values with a float32 scale per output channel, and the GEMM over them.

One runtime layout serves every source (FP8 checkpoints in their published formats, and
high-precision checkpoints quantized on load): a quantized ``Linear`` holds ``weight``
(``float8_e4m3fn``, ``[out, in]``) and ``weight_scale`` (float32, ``[out]``), the real weight
being ``weight * weight_scale[:, None]``.

The W8A8 GEMM is written in the form XLA:GPU's ``GemmRewriter`` turns into one cuBLASLt FP8
matmul (``__cublas$lt$matmul$f8``, Ada/Hopper and later): a ``dot`` whose operands are both
float8. The rewriter fuses only *scalar* operand scales into that call, so the per-token and
per-channel scales multiply the product afterwards, an elementwise epilogue that XLA fuses into
whatever consumes the GEMM's output. The product comes out in the compute dtype (bf16 on GPU),
accumulated in float32 inside cuBLASLt, so it writes no more than a bf16 GEMM does. On a CPU,
XLA upcasts the float8 operands and the same code runs (for correctness, not speed).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn
"""The weights' and quantized activations' dtype: e4m3, finite only (no infinities)."""
FP8_MAX = 448.0
"""Largest finite e4m3 value: a row's largest magnitude maps to it."""
FP8_GEMM_ROWS = 16
"""cuBLASLt's FP8 matmul takes only dimensions that are multiples of 16: XLA rewrites a float8
``dot`` with fewer rows (a small decode batch) into a bf16 one over upcast weights, and hoists
those upcasts out of the layer loop (a whole bf16 copy of the weights). Activation rows are
padded to a multiple of this instead."""
MIN_AMAX = 1e-12
"""Floor of a row's largest magnitude, so an all-zero row (padding) gets a finite scale."""
ACTIVATION_MODES = ("dynamic", "none")
QUANTIZATION_METHODS = ("fp8",)
"""Values of ``quantization`` (EngineConfig, ``load_model``)."""
PLACEHOLDER_SCALE = 0.02
"""``weight_scale`` of freshly initialised (random, dummy) FP8 weights: with e4m3 values drawn
from a unit normal, the real weights have the standard deviation of ``layers.WEIGHT_INIT``."""


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """How the decoder's linear layers hold and multiply FP8 weights. Embeddings, norms and the
    LM head stay in the compute dtype: the embedding is a gather (no GEMM to speed up) read one
    row per token, norms are vectors, and the LM head's logits feed sampling directly, where
    e4m3's 3-bit mantissa would visibly move probabilities (every FP8 checkpoint we load keeps
    ``lm_head`` out of quantization too)."""

    activation: str = "dynamic"
    """'dynamic': W8A8, each token's activations quantized to e4m3 with their own scale and
    the GEMM run in FP8 (twice bf16's matmul rate on Hopper). 'none': weight-only, the weight
    upcast to the compute dtype inside the GEMM (no activation rounding; it reads half the
    bytes of bf16 only where XLA fuses the upcast into the GEMM, e.g. ``gemm_backend='triton'``:
    cuBLAS takes no mixed float8 x bf16 operands)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATION_MODES:
            raise ValueError(f"fp8_activation must be one of {', '.join(ACTIVATION_MODES)}, "
                             f"got {self.activation!r}")


def quantize_rows(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(``a`` in e4m3, float32 scales ``[..., 1]``), one scale per row (the last axis is
    scaled together): ``a ≈ q * scale``, each row's largest magnitude mapped to ``FP8_MAX``."""
    a = a.astype(jnp.float32)
    amax = jnp.max(jnp.abs(a), axis=-1, keepdims=True)
    scale = jnp.maximum(amax, MIN_AMAX) / FP8_MAX
    # The clip keeps rounding at the edge from leaving e4m3's range (it has no infinity).
    return jnp.clip(a / scale, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE), scale


@jax.jit
def quantize_weight(weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A high-precision ``[out, in]`` weight as (e4m3 ``[out, in]``, float32 ``[out]``): per
    output channel, on the device holding it."""
    q, scale = quantize_rows(weight)
    return q, scale[..., 0]


def fp8_linear(x: jax.Array, weight: jax.Array, weight_scale: jax.Array,
               activation: str) -> jax.Array:
    """``x @ (weight * weight_scale[:, None]).T`` in ``x``'s dtype. ``x``: ``[..., in]``;
    ``weight``: e4m3 ``[out, in]``; ``weight_scale``: float32 ``[out]``. Both operands contract
    their last axis, the "TN" layout cuBLASLt's FP8 kernels require (no transpose is made)."""
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    if activation == "dynamic":
        xq, x_scale = quantize_rows(x)
        rows = xq.reshape(-1, xq.shape[-1])
        padded = -rows.shape[0] % FP8_GEMM_ROWS
        if padded:
            rows = jnp.pad(rows, ((0, padded), (0, 0)))
        y = jax.lax.dot_general(rows, weight, (((1,), (1,)), ((), ())),
                                preferred_element_type=x.dtype)
        y = y[:y.shape[0] - padded].reshape(*x.shape[:-1], weight.shape[0])
        return (y.astype(jnp.float32) * x_scale * weight_scale).astype(x.dtype)
    y = jax.lax.dot_general(x, weight.astype(x.dtype), dims, preferred_element_type=x.dtype)
    return (y.astype(jnp.float32) * weight_scale).astype(x.dtype)


def random_fp8_weight(key: jax.Array, shape: tuple[int, ...], dtype=FP8_DTYPE) -> jax.Array:
    """Initialiser of FP8 weights (``load_format='dummy'``): unit-normal values in e4m3, made
    directly in their 1-byte dtype (an 8B model never exists in high precision)."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def placeholder_scale(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Initialiser of ``weight_scale`` beside ``random_fp8_weight``."""
    del key
    return jnp.full(shape, PLACEHOLDER_SCALE, dtype)
