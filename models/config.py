"""Model configuration: one decoder skeleton, per-family differences as data.

``ModelConfig.from_hf(config_dict)`` reads a Hugging Face ``config.json`` as written by
transformers 4.x (``rope_theta`` / ``rope_scaling``) or 5.x (``rope_parameters``,
``layer_types``) and maps every family onto the same fields.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from .errors import CheckpointError

# HF architecture name -> family. The family selects defaults that config.json leaves implicit.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind (HF ``rotate_half`` convention)."""

    theta: float
    """Base of the inverse frequencies."""
    rope_type: str = "default"
    """'default', 'linear' (positions divided by ``factor``) or 'llama3' (frequency-band scaling)."""
    factor: float = 1.0
    """Scaling factor of 'linear' and 'llama3'."""
    low_freq_factor: float = 1.0
    """'llama3': wavelengths above ``original_max_position_embeddings / low_freq_factor`` are scaled."""
    high_freq_factor: float = 4.0
    """'llama3': wavelengths below ``original_max_position_embeddings / high_freq_factor`` are kept."""
    original_max_position_embeddings: int = 8192
    """'llama3': the context length the model was pre-trained with."""

    def inverse_frequencies(self, head_dim: int) -> list[float]:
        """Per-pair inverse frequencies (length ``head_dim // 2``), scaling applied."""
        inv = [1.0 / (self.theta ** (2 * i / head_dim)) for i in range(head_dim // 2)]
        if self.rope_type == "linear":
            return [f / self.factor for f in inv]
        if self.rope_type == "llama3":
            old = self.original_max_position_embeddings
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            scaled = []
            for f in inv:
                wavelen = 2 * math.pi / f
                if wavelen < high_wavelen:
                    scaled.append(f)
                elif wavelen > low_wavelen:
                    scaled.append(f / self.factor)
                else:
                    smooth = (old / wavelen - self.low_freq_factor) / (
                        self.high_freq_factor - self.low_freq_factor)
                    scaled.append((1 - smooth) * f / self.factor + smooth * f)
            return scaled
        return inv


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about a checkpoint's architecture."""

    architecture: str
    """Hugging Face architecture name, e.g. 'LlamaForCausalLM'."""
    family: str
    """One of the values of ``ARCHITECTURES``."""
    vocab_size: int
    """Rows of the embedding table and of the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the gated MLP."""
    num_layers: int
    """Decoder layers (stacked on axis 0 of every layer weight)."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (grouped-query attention when fewer than ``num_heads``)."""
    head_dim: int
    """Width of one attention head (not always hidden_size / num_heads: Gemma, Qwen3)."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    rope: RopeConfig
    """Rotary embedding of global (full-attention) layers."""
    local_rope: RopeConfig | None = None
    """Rotary embedding of sliding-window layers when it differs (Gemma 3); None: same as ``rope``."""
    max_position_embeddings: int = 4096
    """Longest context the checkpoint supports."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding table."""
    activation: str = "silu"
    """Gate activation of the MLP: 'silu' (SwiGLU) or 'gelu_tanh' (GeGLU)."""
    qkv_bias: bool = False
    """q/k/v projections have a bias (Qwen2; Llama's ``attention_bias``)."""
    o_bias: bool = False
    """Output projection has a bias (Llama's ``attention_bias``)."""
    mlp_bias: bool = False
    """MLP projections have biases (Llama's ``mlp_bias``)."""
    qk_norm: bool = False
    """RMSNorm over head_dim on queries and keys before rope (Qwen3, Gemma 3)."""
    norm_plus_one: bool = False
    """RMSNorm multiplies by (1 + w) instead of w (Gemma family)."""
    embed_scale: float = 1.0
    """Multiplier on embeddings (sqrt(hidden_size) for Gemma, rounded to the compute dtype)."""
    sandwich_norm: bool = False
    """Extra norms after attention and after the MLP (Gemma 2/3)."""
    attn_scale: float = 1.0
    """Softmax scale: head_dim**-0.5, or query_pre_attn_scalar**-0.5 for Gemma 2/3."""
    attn_logit_softcap: float | None = None
    """cap * tanh(scores / cap) on attention logits (Gemma 2)."""
    final_logit_softcap: float | None = None
    """cap * tanh(logits / cap) on the LM head output (Gemma 2)."""
    layer_windows: tuple[int, ...] = ()
    """Sliding window per layer (0 = full attention); key j is visible from i when i - j < window."""
    bos_token_id: int | None = None
    """Beginning-of-sequence id from config.json (the tokenizer's is authoritative)."""
    eos_token_ids: tuple[int, ...] = ()
    """End-of-sequence ids from config.json."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if len(self.layer_windows) != self.num_layers:
            raise CheckpointError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")

    @property
    def uses_local_rope(self) -> tuple[bool, ...]:
        """Per layer: whether the layer takes ``local_rope`` (a sliding layer of Gemma 3)."""
        return tuple(self.local_rope is not None and w > 0 for w in self.layer_windows)

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, h, q, kv = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads
        attn = d * h * (2 * q + 2 * kv) + self.qkv_bias * h * (q + 2 * kv) + self.o_bias * d
        mlp = 3 * d * self.intermediate_size + self.mlp_bias * (2 * self.intermediate_size + d)
        norms = (4 if self.sandwich_norm else 2) * d + (2 * h if self.qk_norm else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_layers * (attn + mlp + norms) + self.vocab_size * d + head + d

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Builds the config from a Hugging Face config.json dict."""
        architectures = hf.get("architectures") or []
        architecture = next((a for a in architectures if a in ARCHITECTURES), None)
        if architecture is None:
            raise CheckpointError(
                f"unsupported architecture {architectures or hf.get('model_type')!r}; duetjax "
                f"supports: {', '.join(sorted(ARCHITECTURES))}")
        family = ARCHITECTURES[architecture]
        try:
            return _from_hf(architecture, family, hf)
        except KeyError as missing:
            raise CheckpointError(
                f"config.json of a {architecture} lacks the field {missing.args[0]!r}") from None


def _rope_from_params(params: Mapping[str, Any], default_theta: float) -> RopeConfig:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    fields = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings") if params.get(k) is not None}
    return RopeConfig(theta=float(params.get("rope_theta", default_theta)), rope_type=rope_type,
                      **fields)


def _ropes(hf: Mapping[str, Any], family: str) -> tuple[RopeConfig, RopeConfig | None]:
    """(global rope, local rope) from either the transformers 5 or the 4.x spelling."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:  # per layer type (5.x)
        full = _rope_from_params(params["full_attention"], 10000.0)
        local = params.get("sliding_attention")
        return full, (_rope_from_params(local, 10000.0) if local is not None else None)
    if isinstance(params, Mapping):
        full = _rope_from_params(params, hf.get("rope_theta", 10000.0))
    else:
        full = _rope_from_params(hf.get("rope_scaling") or {}, hf.get("rope_theta", 10000.0))
    local = None
    if family == "gemma3":
        local = RopeConfig(theta=float(hf.get("rope_local_base_freq", 10000.0)))
    return full, local


def _layer_windows(hf: Mapping[str, Any], family: str, num_layers: int) -> tuple[int, ...]:
    window = hf.get("sliding_window") or 0
    layer_types = hf.get("layer_types")
    if layer_types is None:  # transformers 4.x spellings
        if family == "gemma2":
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(num_layers)]
        elif family == "gemma3":
            pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                           for i in range(num_layers)]
        elif family in ("qwen2", "qwen3"):
            sliding = hf.get("use_sliding_window", False)
            first = hf.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if sliding and i >= first else "full_attention"
                           for i in range(num_layers)]
        else:  # Llama, Mistral: one window for all layers, if any
            layer_types = ["sliding_attention"] * num_layers
    if len(layer_types) != num_layers:
        raise CheckpointError(f"layer_types has {len(layer_types)} entries, num_hidden_layers is {num_layers}")
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = 0
    return tuple(window if t == "sliding_attention" else 0 for t in layer_types)


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _from_hf(architecture: str, family: str, hf: Mapping[str, Any]) -> ModelConfig:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    num_layers = hf["num_hidden_layers"]
    rope, local_rope = _ropes(hf, family)
    gemma = family in GEMMA_FAMILIES
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    activations = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    # Original Gemma configs say "gelu", but the model was trained with the tanh approximation
    # (Google's JAX reference; transformers 4.38+ warned and switched). We keep the model's.
    if gemma and activation == "gelu":
        activation = "gelu_pytorch_tanh"
    if activation not in activations:
        raise CheckpointError(f"activation {activation!r} is not supported ({', '.join(activations)})")
    attention_bias = bool(hf.get("attention_bias", False))
    query_scalar = hf.get("query_pre_attn_scalar") if family in ("gemma2", "gemma3") else None
    return ModelConfig(
        architecture=architecture,
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope,
        local_rope=local_rope,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        activation=activations[activation],
        qkv_bias=attention_bias or family == "qwen2",
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=family in ("qwen3", "gemma3"),
        norm_plus_one=gemma,
        embed_scale=math.sqrt(hidden) if gemma else 1.0,
        sandwich_norm=family in ("gemma2", "gemma3"),
        attn_scale=float(query_scalar if query_scalar else head_dim) ** -0.5,
        # Gemma 3 configs carry attn_logit_softcapping, but the model (and transformers) ignore it.
        attn_logit_softcap=hf.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_logit_softcap=hf.get("final_logit_softcapping") if gemma else None,
        layer_windows=_layer_windows(hf, family, num_layers),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
    )
