"""The decoder skeleton shared by every family (Llama, Mistral, Qwen2/3, Gemma 1/2/3).

Layer weights are stacked on axis 0 and the layer loop is ``nn.scan``; the paged KV pool rides
in the scan carry, so XLA updates it in place (a scan *output* would rewrite it every step).
Per-layer differences (sliding window, Gemma 3's local rope, an FP8 pool's KV scales) enter the
scan as data. With ``per_layer_weights`` each layer has arrays of its own instead (the tree's
``layers_0`` ... ``layers_{L-1}``, made from the stacked tree by ``unstack_layers``) and the
loop is unrolled in Python: no layer's weights are sliced out of a stack, which XLA:GPU copies
before a GEMM it cannot read a slice in place for (cuBLASLt's FP8 GEMM).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .attention import AttentionMetadata, attend
from .config import ModelConfig
from .kv_scales import KVScales, scales_array
from .layers import Embedding, GatedMLP, Linear, RMSNorm, apply_rope
from .quantization import Fp8Config
from .tensor_parallel import group_size, replicated, split_fused, vocab_split


class Attention(nn.Module):
    config: ModelConfig
    impl: str
    dtype: jnp.dtype
    quantization: Fp8Config | None
    mesh: Mesh | None

    @nn.compact
    def __call__(self, x, kv_pool, layer, window, local_rope, kv_scale, meta: AttentionMetadata):
        cfg = self.config
        num_tokens = x.shape[0]
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # One fused GEMM for q, k and v (HF's q_proj, k_proj, v_proj rows concatenated at load
        # time): three skinny GEMMs, or XLA concatenating the weights every step, cost more.
        qkv = Linear(q_size + 2 * kv_size, cfg.qkv_bias, self.dtype, self.quantization,
                     name="qkv_proj")(x)
        q, k, v = split_fused(qkv, (q_size, kv_size, kv_size), group_size(self.mesh))
        q = q.reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, self.dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, self.dtype, name="k_norm")(k)
        inv_freq = jnp.asarray(cfg.rope.inverse_frequencies(cfg.head_dim), jnp.float32)
        if cfg.local_rope is not None:
            local = jnp.asarray(cfg.local_rope.inverse_frequencies(cfg.head_dim), jnp.float32)
            inv_freq = jnp.where(local_rope, local, inv_freq)
        q = apply_rope(q, meta.positions, inv_freq)
        k = apply_rope(k, meta.positions, inv_freq)
        # What the pool stores, for FP8 KV scales computed from the model (``kv_calibration``);
        # only kept where "intermediates" is mutable, else dropped.
        self.sow("intermediates", "kv_amax",  # [2, Hkv]
                 jnp.stack([jnp.max(jnp.abs(k), axis=(0, 2)),
                            jnp.max(jnp.abs(v), axis=(0, 2))]).astype(jnp.float32))
        out, kv_pool = attend(q, k, v, kv_pool, layer, meta, scale=cfg.attn_scale,
                              soft_cap=cfg.attn_logit_softcap, sliding_window=window,
                              kv_scale=kv_scale, impl=self.impl, mesh=self.mesh)
        out = out.reshape(num_tokens, cfg.num_heads * cfg.head_dim)
        o_proj = Linear(cfg.hidden_size, cfg.o_bias, self.dtype, self.quantization, name="o_proj")
        return o_proj(out), kv_pool


class DecoderLayer(nn.Module):
    """One pre-norm block; names follow HF. Without sandwich norms, HF's
    ``post_attention_layernorm`` is the norm *before* the MLP; with them (Gemma 2/3) it follows
    attention and ``pre_feedforward_layernorm`` precedes the MLP."""

    config: ModelConfig
    impl: str
    dtype: jnp.dtype
    quantization: Fp8Config | None
    mesh: Mesh | None

    @nn.compact
    def __call__(self, carry, per_layer, meta: AttentionMetadata):
        cfg = self.config
        x, kv_pool = carry
        layer, window, local_rope, kv_scale = per_layer

        def norm(name):
            return RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, self.dtype, name=name)

        h, kv_pool = Attention(cfg, self.impl, self.dtype, self.quantization, self.mesh,
                               name="self_attn")(
            norm("input_layernorm")(x), kv_pool, layer, window, local_rope, kv_scale, meta)
        mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation, cfg.mlp_bias,
                       self.dtype, self.quantization, group_size(self.mesh), name="mlp")
        if cfg.sandwich_norm:
            x = x + norm("post_attention_layernorm")(h)
            x = x + norm("post_feedforward_layernorm")(mlp(norm("pre_feedforward_layernorm")(x)))
        else:
            x = x + h
            x = x + mlp(norm("post_attention_layernorm")(x))
        return (x, kv_pool), None


class Decoder(nn.Module):
    """Causal LM over a paged KV pool. ``__call__`` runs one ragged step and returns float32
    logits for the tokens at ``logits_indices`` plus the updated pool; ``hidden_states`` and
    ``logits`` are its two halves, for callers that need the logits of other tokens too."""

    config: ModelConfig
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    scan_unroll: int = 1
    """Layers per iteration of the layer loop (``num_layers`` unrolls it fully)."""
    quantization: Fp8Config | None = None
    """FP8 weights in the decoder layers' linear layers (``models.quantization``); None:
    every weight in ``dtype``."""
    kv_scales: KVScales | None = None
    """(K scale, V scale) per layer, or per layer and KV head, of an FP8 KV pool
    (``LoadedModel.kv_scales``), compiled in as constants; None: an FP8 pool scales by 1.0,
    and any other pool takes none."""
    mesh: Mesh | None = None
    """The tensor-parallel group the weights and the KV pool are split over
    (``models.tensor_parallel``; ``config`` is then its ``held_config``); None: one device."""
    per_layer_weights: bool = False
    """Arrays of its own for each layer (``unstack_layers``), in an unrolled loop; False: one
    stacked array per weight, in ``nn.scan`` (``scan_unroll``)."""

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, self.dtype)
        if self.per_layer_weights:  # (named layers_0, layers_1, ...)
            self.layers = [DecoderLayer(cfg, self.impl, self.dtype, self.quantization, self.mesh)
                           for _ in range(cfg.num_layers)]
        else:
            layers = nn.scan(DecoderLayer, variable_axes={"params": 0, "intermediates": 0},
                             split_rngs={"params": True}, in_axes=(0, nn.broadcast),
                             length=cfg.num_layers, unroll=self.scan_unroll)
            self.layers = layers(cfg, self.impl, self.dtype, self.quantization, self.mesh)
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, self.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.vocab_size, False, self.dtype)

    def __call__(self, tokens: jax.Array, kv_pool: jax.Array, meta: AttentionMetadata,
                 logits_indices: jax.Array) -> tuple[jax.Array, jax.Array]:
        hidden, kv_pool = self.hidden_states(tokens, kv_pool, meta)
        return self.logits(hidden[logits_indices]), kv_pool

    def hidden_states(self, tokens: jax.Array, kv_pool: jax.Array,
                      meta: AttentionMetadata) -> tuple[jax.Array, jax.Array]:
        """(the last layer's output for every token, before the final norm; the updated pool)."""
        cfg = self.config
        x = self.embed_tokens(tokens)
        if cfg.embed_scale != 1.0:
            x = x * jnp.asarray(cfg.embed_scale, x.dtype)  # rounded to the dtype, as HF does
        per_layer = (jnp.arange(cfg.num_layers, dtype=jnp.int32),
                     jnp.asarray(cfg.layer_windows, jnp.int32),
                     jnp.asarray(cfg.uses_local_rope, bool),
                     None if self.kv_scales is None else scales_array(self.kv_scales,
                                                                  cfg.num_kv_heads))
        if not self.per_layer_weights:
            (x, kv_pool), _ = self.layers((x, kv_pool), per_layer, meta)
            return x, kv_pool
        for i, layer in enumerate(self.layers):
            (x, kv_pool), _ = layer((x, kv_pool), jax.tree_util.tree_map(lambda a: a[i], per_layer),
                                    meta)
        return x, kv_pool

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits of ``hidden_states`` rows: final norm, LM head, final softcap."""
        cfg = self.config
        x = self.norm(hidden)
        if cfg.tie_word_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x).astype(jnp.float32)
        if self.mesh is not None:  # each device its vocabulary share (not the whole head)
            logits = jax.lax.with_sharding_constraint(logits, vocab_split(self.mesh))
        if cfg.final_logit_softcap:
            logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
        if self.mesh is not None:  # gathered whole for the sampler
            logits = jax.lax.with_sharding_constraint(logits, replicated(self.mesh))
        return logits


def holds_per_layer_weights(params: dict) -> bool:
    """Whether ``params`` is a ``per_layer_weights`` Decoder's tree (``unstack_layers``)."""
    return "layers_0" in params


def unstack_layers(params: dict, num_layers: int, delete: bool = False) -> dict:
    """The tree of a ``per_layer_weights`` Decoder from a stacked one: ``params["layers"]``
    becomes ``layers_0`` ... ``layers_{num_layers - 1}``, each leaf its layer's slice (a new
    array). ``delete``: free each stacked array once it is sliced (the caller gives up the
    stacked tree; device memory then peaks at one stacked array more, not a second model)."""
    leaves, treedef = jax.tree_util.tree_flatten(params["layers"])
    per_layer: list[list] = [[] for _ in range(num_layers)]
    for leaf in leaves:
        if leaf.shape[:1] != (num_layers,):
            raise ValueError(f"a stacked layer weight of shape {leaf.shape} does not hold "
                             f"{num_layers} layers")
        for i in range(num_layers):
            per_layer[i].append(_layer_of(leaf, i))
        if delete and isinstance(leaf, jax.Array):
            jax.block_until_ready(per_layer[-1][-1])
            leaf.delete()
    out = {key: value for key, value in params.items() if key != "layers"}
    out.update({f"layers_{i}": jax.tree_util.tree_unflatten(treedef, per_layer[i])
                for i in range(num_layers)})
    return out


@jax.jit
def _layer_of(stacked: jax.Array, i: int) -> jax.Array:  # (one compile per shape, not per i)
    layer = jax.lax.dynamic_index_in_dim(stacked, i, keepdims=False)
    sharding = getattr(stacked, "sharding", None)
    if isinstance(sharding, NamedSharding):  # (tensor parallel: a layer split as its stack)
        layer = jax.device_put(layer, NamedSharding(sharding.mesh,
                                                    PartitionSpec(*sharding.spec[1:])))
    return layer
