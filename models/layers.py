"""Small Flax (Linen) building blocks. Parameter names mirror Hugging Face's, so loading a
checkpoint is a mechanical rename (except the fused ``qkv_proj`` and ``gate_up_proj``, see
``models.checkpoint``); kernels keep HF's ``[out_features, in_features]`` layout
(the matmul contracts the last axis of both, so no transpose is ever materialized)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .quantization import FP8_DTYPE, Fp8Config, fp8_linear, placeholder_scale, random_fp8_weight
from .tensor_parallel import split_fused

WEIGHT_INIT = nn.initializers.normal(stddev=0.02)


class Linear(nn.Module):
    """y = x @ W^T (+ b), W stored as [features, in_features] like torch.nn.Linear. With
    ``quantization``, W is FP8: ``weight`` in e4m3 and ``weight_scale`` per output feature
    (``models.quantization``)."""

    features: int
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    quantization: Fp8Config | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.features, x.shape[-1])
        if self.quantization is not None:
            weight = self.param("weight", random_fp8_weight, shape, FP8_DTYPE)
            scale = self.param("weight_scale", placeholder_scale, (self.features,), jnp.float32)
            y = fp8_linear(x, weight, scale, self.quantization.activation)
        else:
            weight = self.param("weight", WEIGHT_INIT, shape, self.dtype)
            y = jnp.einsum("...i,oi->...o", x, weight)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        return y


class RMSNorm(nn.Module):
    """RMSNorm in float32. ``plus_one``: Gemma's (1 + w) scale, applied before the downcast;
    otherwise Llama's order (normalize, downcast, then scale)."""

    eps: float
    plus_one: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        weight = self.param("weight", init, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
        return weight * y.astype(x.dtype)


class Embedding(nn.Module):
    """Token embedding table [vocab, hidden]; also the LM head when embeddings are tied."""

    vocab_size: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.weight = self.param("weight", WEIGHT_INIT, (self.vocab_size, self.features), self.dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight, tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("sd,vd->sv", x, self.weight, preferred_element_type=jnp.float32)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (Llama, Qwen, Mistral) or GeGLU (Gemma). Params:
    ``gate_up_proj`` ([gate; up] rows) and ``down_proj``."""

    hidden_size: int
    intermediate_size: int
    activation: str
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    quantization: Fp8Config | None = None
    shards: int = 1
    """Devices the intermediate features are split over (``gate_up_proj``'s rows are stored
    shard-major then: ``tensor_parallel.fused_rows``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # gate_proj and up_proj fused into one GEMM (HF's rows concatenated at load time).
        gate_up = Linear(2 * self.intermediate_size, self.use_bias, self.dtype, self.quantization,
                         name="gate_up_proj")(x)
        gate, up = split_fused(gate_up, (self.intermediate_size,) * 2, self.shards)
        act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return Linear(self.hidden_size, self.use_bias, self.dtype, self.quantization,
                      name="down_proj")(act * up)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, HF ``rotate_half`` convention. x: [T, H, D]; positions: [T]."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = jnp.cos(freqs).astype(x.dtype)[:, None, :]
    sin = jnp.sin(freqs).astype(x.dtype)[:, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
