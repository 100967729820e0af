"""FP8 checkpoints in their published formats, seen in duetjax's runtime layout.

Two layouts are read, from a Hugging Face ``config.json``'s ``quantization_config``:

- compressed-tensors ``float-quantized`` (llm-compressor's FP8 checkpoints,
  ``quant_method: "compressed-tensors"``): ``X.weight`` in ``float8_e4m3fn`` with
  ``X.weight_scale`` per tensor (``[]`` or ``[1]``) or per output channel (``[out, 1]``), or per
  128 x 128 block (strategy ``block``); activations dynamic (per token), static (one
  ``X.input_scale`` per tensor) or none.
- block-wise ``fp8`` (Qwen3-FP8, DeepSeek-V3; ``quant_method: "fp8"``): ``X.weight`` in
  ``float8_e4m3fn`` and ``X.weight_scale_inv`` of shape ``[ceil(out/128), ceil(in/128)]``, one
  multiplier per 128 x 128 block (despite its name, weight = value * scale_inv);
  ``activation_scheme`` ``"dynamic"`` or ``"static"``.

Activations are quantized per token at run time whatever the checkpoint says: a static
``input_scale`` (one per tensor, calibrated offline) is read past. A per-token scale is at
least as fine, so nothing is lost against the static one (it costs one max per row), and the
fused q/k/v and gate/up GEMMs, whose members were calibrated with scales of their own, need no
common scale.

``Fp8CheckpointSource`` presents either as duetjax's runtime layout (``models.quantization``:
e4m3 values and one float32 scale per output channel) under the same HF names, so
``checkpoint.load_params`` needs no format of its own:

- Per-tensor scales are expanded to per-channel vectors: exact, and it lets q, k and v (and
  gate and up), whose per-tensor scales differ, be fused by concatenating their rows and
  scales, without requantizing any of them.
- Block scales are not: XLA's FP8 GEMM on Hopper takes scalar scales only, and one GEMM per
  128-wide slice of the inputs would write the output once per slice. A block-wise weight is
  handed over dequantized, and ``load_params`` requantizes it per output channel on the
  device. That adds one e4m3 rounding (at most half a unit in the last place, 1/16 relative)
  to elements whose block scale is below their row's largest.

A compressed-tensors ``kv_cache_scheme`` (8-bit float, static scales per tensor, strategy
``tensor``, or per KV head, ``attn_head``) is accepted: its per-layer ``self_attn.k_scale`` /
``self_attn.v_scale`` (or the older single ``self_attn.kv_scale``, for both), one number or one
per KV head, are read by ``read_kv_scales`` for an FP8 KV cache (``kv_cache_dtype='fp8'``) and
are not weights of the model.

Anything else (other bit widths or types, integer formats, other block sizes, static
activation scales finer than per tensor, dynamic KV-cache scales, layers left unquantized
besides the LM head) is a ``CheckpointError`` naming the config field and value.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from .errors import CheckpointError
from .kv_scales import KVScales, checked_kv_scales

BLOCK = 128
"""Side of the square blocks of block-wise FP8 weights (the only size published so far)."""
WEIGHT_SCALE = ".weight_scale"
BLOCK_SCALE = ".weight_scale_inv"
KV_SCALE_SUFFIXES = (".self_attn.k_scale", ".self_attn.v_scale", ".self_attn.kv_scale")
"""Per-layer KV-cache scales (compressed-tensors; the last is the older one for K and V)."""
LM_HEAD_NAMES = ("lm_head", "re:.*lm_head", "re:lm_head", "re:.*lm_head$", "re:^lm_head$")
"""``ignore`` / ``modules_to_not_convert`` entries that name the LM head alone (it stays in
high precision here whatever they say)."""


@dataclasses.dataclass(frozen=True)
class Fp8CheckpointFormat:
    """How an FP8 checkpoint stores its linear layers' weights."""

    method: str
    """``quantization_config.quant_method``: 'compressed-tensors' or 'fp8'."""
    strategy: str
    """Weight scale granularity: 'tensor', 'channel' or 'block'."""
    static_activations: bool = False
    """The checkpoint holds static activation scales (``input_scale``), which are not used."""


def _field(path: str, value: Any, problem: str) -> CheckpointError:
    return CheckpointError(f"config.json quantization_config{path} = {value!r}: {problem}")


def _check_unquantized_modules(path: str, names: Any) -> None:
    """Only the LM head may stay unquantized: the decoder's layers are stacked, one dtype each."""
    for name in names or ():
        if name not in LM_HEAD_NAMES and not (isinstance(name, str)
                                              and re.fullmatch(r"(re:)?(model\.)?lm_head", name)):
            raise _field(path, names, f"{name!r} would stay in high precision; only the LM head "
                         "can (every decoder layer holds the same FP8 linear layers)")


def _compressed_tensors(qc: Mapping[str, Any]) -> Fp8CheckpointFormat:
    fmt = qc.get("format")
    if fmt != "float-quantized":
        raise _field(".format", fmt, "only 'float-quantized' (FP8) compressed-tensors "
                     "checkpoints are supported")
    if qc.get("kv_cache_scheme") is not None:
        _check_kv_cache_scheme(qc["kv_cache_scheme"])
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise _field(".config_groups", sorted(groups), "exactly one quantization group is "
                     "supported (one scheme for every linear layer)")
    (group_name, group), = groups.items()
    at = f".config_groups.{group_name}"
    targets = group.get("targets")
    if targets != ["Linear"]:
        raise _field(f"{at}.targets", targets, "only ['Linear'] is supported")
    weights = group.get("weights") or {}
    for key, wanted in (("num_bits", 8), ("type", "float")):
        if weights.get(key) != wanted:
            raise _field(f"{at}.weights.{key}", weights.get(key), f"only {wanted!r} (FP8 e4m3) "
                         "is supported")
    if weights.get("dynamic"):
        raise _field(f"{at}.weights.dynamic", True, "weights must be stored with their scales")
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise _field(f"{at}.weights.strategy", strategy, "supported: 'tensor', 'channel', "
                     "'block'")
    if strategy == "block" and list(weights.get("block_structure") or ()) != [BLOCK, BLOCK]:
        raise _field(f"{at}.weights.block_structure", weights.get("block_structure"),
                     f"only [{BLOCK}, {BLOCK}] blocks are supported")
    activations = group.get("input_activations")
    if activations is not None:
        for key, wanted in (("num_bits", 8), ("type", "float")):
            if activations.get(key) != wanted:
                raise _field(f"{at}.input_activations.{key}", activations.get(key),
                             f"only {wanted!r} is supported")
        static = not activations.get("dynamic")
        if static and activations.get("strategy") != "tensor":
            raise _field(f"{at}.input_activations.strategy", activations.get("strategy"),
                         "static activation scales are supported per tensor only")
    else:
        static = False
    _check_unquantized_modules(".ignore", qc.get("ignore"))
    return Fp8CheckpointFormat("compressed-tensors", strategy, static)


def _check_kv_cache_scheme(scheme: Mapping[str, Any]) -> None:
    """An FP8 KV cache with static K and V scales per layer or per KV head is what the pool
    holds; other schemes are refused by field."""
    for key, wanted in (("num_bits", 8), ("type", "float")):
        if scheme.get(key) != wanted:
            raise _field(f".kv_cache_scheme.{key}", scheme.get(key),
                         f"only {wanted!r} (an FP8 e4m3 KV cache) is supported")
    if scheme.get("strategy", "tensor") not in ("tensor", "attn_head"):
        raise _field(".kv_cache_scheme.strategy", scheme.get("strategy"), "supported: 'tensor' "
                     "(one K and one V scale per layer) and 'attn_head' (one per KV head)")
    if scheme.get("dynamic"):
        raise _field(".kv_cache_scheme.dynamic", True, "only static scales (k_scale / v_scale "
                     "tensors) are supported")


def read_kv_scales(source: Any, num_layers: int, num_kv_heads: int) -> KVScales | None:
    """(K scale, V scale) of every layer from ``model.layers.{i}.self_attn.k_scale`` and
    ``v_scale``, or the older ``kv_scale`` for both, each one number or one per KV head; None
    when the checkpoint holds neither. A layer without them, or a scale that is not finite
    and positive, is a ``CheckpointError``."""
    names = source.names()
    prefix = "model.layers.{}.self_attn."
    if not any(n.endswith(KV_SCALE_SUFFIXES) for n in names):
        return None
    k, v = [], []
    for i in range(num_layers):
        at = prefix.format(i)
        keys = ((at + "k_scale", at + "v_scale") if at + "k_scale" in names
                else (at + "kv_scale",) * 2)
        missing = [key for key in keys if key not in names]
        if missing:
            raise CheckpointError(f"tensor {missing[0]!r} is missing: the checkpoint holds KV "
                                  "cache scales for other layers")
        k.append(np.asarray(source.get(keys[0]), np.float32))
        v.append(np.asarray(source.get(keys[1]), np.float32))
    return checked_kv_scales(k, v, num_layers, num_kv_heads, "KV cache scale tensors "
                             "(model.layers.*.self_attn.k_scale / v_scale)")


def _block_fp8(qc: Mapping[str, Any]) -> Fp8CheckpointFormat:
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise _field(".activation_scheme", scheme, "supported: 'dynamic' and 'static'")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _field(".fmt", fmt, "only 'e4m3' is supported")
    block = qc.get("weight_block_size")
    if list(block or ()) != [BLOCK, BLOCK]:
        raise _field(".weight_block_size", block, f"only [{BLOCK}, {BLOCK}] is supported")
    for key in ("modules_to_not_convert", "ignored_layers"):
        _check_unquantized_modules(f".{key}", qc.get(key))
    return Fp8CheckpointFormat("fp8", "block", scheme == "static")


def fp8_checkpoint_format(hf_config: Mapping[str, Any]) -> Fp8CheckpointFormat | None:
    """The FP8 layout ``config.json`` declares; None when it declares no quantization. Any
    quantization this module does not read is a ``CheckpointError`` naming the field."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "fp8":
        return _block_fp8(qc)
    raise _field(".quant_method", method, "supported: 'compressed-tensors' (float-quantized) "
                 "and 'fp8' (block-wise)")


def dequantize_blocks(weight: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """float32 ``weight * scale`` with one scale per ``BLOCK`` x ``BLOCK`` block (the last
    blocks of a row or column may be partial)."""
    rows, cols = weight.shape
    full = np.repeat(np.repeat(scale_inv.astype(np.float32), BLOCK, axis=0), BLOCK, axis=1)
    return weight.astype(np.float32) * full[:rows, :cols]


class Fp8CheckpointSource:
    """A ``TensorSource`` over an FP8 checkpoint's source that shows it in the runtime layout:
    per-channel ``X.weight_scale`` (float32 ``[out]``) beside e4m3 ``X.weight``, or, for
    block-wise weights, ``X.weight`` dequantized to float32 and no scale (``load_params``
    quantizes it per channel). Other tensors pass through."""

    def __init__(self, source: Any, fmt: Fp8CheckpointFormat):
        self.source, self.format = source, fmt
        inner = source.names()
        self._block = {n[: -len(BLOCK_SCALE)] for n in inner if n.endswith(BLOCK_SCALE)}
        if fmt.strategy == "block" and fmt.method == "compressed-tensors":
            self._block = {n[: -len(WEIGHT_SCALE)] for n in inner if n.endswith(WEIGHT_SCALE)}
        scaled = {n[: -len(WEIGHT_SCALE)] for n in inner if n.endswith(WEIGHT_SCALE)}
        self._names = {n for n in inner
                       if not n.endswith((BLOCK_SCALE, ".input_scale", *KV_SCALE_SUFFIXES))}
        self._names -= {m + WEIGHT_SCALE for m in self._block}
        for module in scaled | self._block:
            if module + ".weight" not in inner:
                raise CheckpointError(f"tensor {module + '.weight'!r} is missing from the "
                                      "checkpoint, though its scale is there")

    def names(self) -> set[str]:
        return set(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name.endswith(WEIGHT_SCALE):
            return tuple(self.source.shape(name[: -len(WEIGHT_SCALE)] + ".weight")[:1])
        return tuple(self.source.shape(name))

    def get(self, name: str) -> np.ndarray:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in self._block:
            scale_name = module + (BLOCK_SCALE if self.format.method == "fp8" else WEIGHT_SCALE)
            weight, scale = self._fp8(name), np.asarray(self.source.get(scale_name))
            rows, cols = weight.shape
            want = (-(-rows // BLOCK), -(-cols // BLOCK))
            if scale.shape != want:
                raise CheckpointError(f"tensor {scale_name!r} has shape {scale.shape}, but a "
                                      f"{weight.shape} weight in {BLOCK} x {BLOCK} blocks "
                                      f"needs {want}")
            return dequantize_blocks(weight, scale)
        if module is not None and module + WEIGHT_SCALE in self._names:
            return self._fp8(name)
        if name.endswith(WEIGHT_SCALE):
            return self._channel_scale(name)
        tensor = self.source.get(name)
        if tensor.dtype == ml_dtypes.float8_e4m3fn:
            raise CheckpointError(f"tensor {name!r} is float8_e4m3fn but has no scale")
        return tensor

    def _fp8(self, name: str) -> np.ndarray:
        weight = np.asarray(self.source.get(name))
        if weight.dtype != ml_dtypes.float8_e4m3fn:
            raise CheckpointError(f"tensor {name!r} is {weight.dtype}, but the checkpoint's "
                                  "quantization_config says float8_e4m3fn")
        return weight

    def _channel_scale(self, name: str) -> np.ndarray:
        """A per-tensor or per-channel ``weight_scale`` as a float32 ``[out]`` vector."""
        out = self.shape(name)[0]
        scale = np.asarray(self.source.get(name), np.float32)
        if scale.size == 1:
            return np.full(out, scale.reshape(()), np.float32)
        if scale.shape in ((out,), (out, 1)):
            return scale.reshape(out)
        raise CheckpointError(f"tensor {name!r} has shape {scale.shape}; a per-tensor scale is "
                              f"[] or [1], a per-channel one [{out}, 1]")
