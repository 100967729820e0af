"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints.

``GGUFSource`` exposes a GGUF file the way a Hugging Face directory looks: a config.json dict,
tensors under HF names in HF layout (float32, dequantized by the ``gguf`` package, with
llama.cpp's conversion undone), and the tokenizer rebuilt from the GGUF metadata.
``convert_gguf_to_hf`` writes all of that out as a normal HF model directory.

What llama.cpp's ``convert_hf_to_gguf.py`` changes, and is reversed here:
- Llama q_proj/k_proj rows are permuted per head so that ggml's interleaved rope (pairs
  (2i, 2i+1)) computes what HF's ``rotate_half`` rope computes on pairs (i, i + d/2).
- Gemma norm weights are stored as ``1 + w`` (ggml's RMSNorm multiplies by the weight; Gemma's
  multiplies by ``1 + w``).
- Llama 3 rope scaling is stored as a ``rope_freqs`` tensor of per-frequency factors instead of
  the four config numbers; those are recovered and checked against the tensor.

The tokenizer is rebuilt as a ``tokenizers.Tokenizer`` for the two vocabulary kinds llama.cpp
stores as pieces: byte-level BPE (``tokenizer.ggml.model == "gpt2"``: merges stored) and
SentencePiece (``"llama"``: Llama 2, Mistral, Gemma; pieces with scores and token types, merges
derived from the scores).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from .errors import CheckpointError
from .tokenizer import Tokenizer

HF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma": ("GemmaForCausalLM", "gemma"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
}
"""GGUF ``general.architecture`` -> (HF architecture, HF model_type)."""

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
"""Per-layer GGUF names (``blk.{i}.<key>.weight``) -> HF names (``model.layers.{i}.<value>.weight``)."""

_GEMMA2_LAYER_TENSORS = {
    **_LAYER_TENSORS,
    # Gemma 2 has four norms per layer; ffn_norm is the one before the MLP there.
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_CONSUMED_TENSORS = {"rope_freqs.weight"}
"""Tensors folded into the config (not weights of the HF model)."""

# Pre-tokenizers of byte-level BPE vocabularies, keyed by ``tokenizer.ggml.pre``; each mirrors
# the regex list llama.cpp uses for that type (src/llama-vocab.cpp) and what the original
# tokenizer.json holds.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_GPT2 = ("default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais")
_PRE_DIGITS_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_PRE_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "falcon3")
_PRE_QWEN2 = ("qwen2", "deepseek-r1-qwen")
SUPPORTED_PRE_TOKENIZERS = _PRE_GPT2 + _PRE_DIGITS_GPT2 + _PRE_LLAMA3 + _PRE_QWEN2


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _PRE_GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS_GPT2:  # llama.cpp: "\p{N}" first, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    regex = _LLAMA3_REGEX if pre in _PRE_LLAMA3 else _QWEN2_REGEX if pre in _PRE_QWEN2 else None
    if regex is None:
        raise CheckpointError(f"GGUF pre-tokenizer type {pre!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


SUPPORTED_TOKENIZER_MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}
"""``tokenizer.ggml.model`` values whose tokenizer is rebuilt, with what they are."""

_SPM_DEFAULT_IDS = {"bos": 1, "eos": 2, "unknown": 0}
"""llama.cpp's special ids for a 'llama' vocabulary whose file does not name them."""
_END_OF_TURN_TEXTS = frozenset({"<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<EOT>"})
"""Texts of end-of-turn tokens, llama.cpp's fallback when a file names no ``eot_token_id``."""
_SPACE = "\u2581"  # '▁': SentencePiece's visible space

_SAMPLING_KEYS = {
    gguf.Keys.General.SAMPLING_TEMP: "temperature",
    gguf.Keys.General.SAMPLING_TOP_K: "top_k",
    gguf.Keys.General.SAMPLING_TOP_P: "top_p",
    gguf.Keys.General.SAMPLING_MIN_P: "min_p",
    gguf.Keys.General.SAMPLING_PENALTY_REPEAT: "repetition_penalty",
}
"""llama.cpp's recommended-sampling metadata (``general.sampling.*``) -> generation_config.json
keys. (llama.cpp applies its repeat penalty to the last 64 tokens; Hugging Face's
repetition_penalty, to the whole sequence.)"""
SAMPLING_SETTINGS = tuple(_SAMPLING_KEYS.values())
"""The sampling keys a generation_config.json written from a GGUF holds."""
LLAMA_CPP_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
"""llama.cpp's own sampling defaults: what a GGUF that recommends none gets (the format is
made for llama.cpp, so these are what its publisher saw it run with)."""


def _sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges, best first, that reproduce SentencePiece's (and llama.cpp's) BPE encoding.

    SentencePiece keeps no merge list: it repeatedly joins the adjacent pair whose
    concatenation is the highest-scoring NORMAL piece. So every way of cutting a NORMAL piece
    into two NORMAL pieces is a merge, ranked by the whole piece's score (ties: lower id first;
    cuts of one piece: by the ids of their halves). No other piece is ever made by merging:
    control and user-defined tokens are cut out of the text before BPE, byte pieces come only
    from byte fallback, and SentencePiece never produces unused ones.
    """
    normal = {t: i for i, t in enumerate(tokens) if types[i] == gguf.TokenType.NORMAL}
    merges: list[tuple[str, str]] = []
    for piece, index in sorted(normal.items(), key=lambda item: (-scores[item[1]], item[1])):
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                if piece[:k] in normal and piece[k:] in normal]
        cuts.sort(key=lambda cut: (normal[cut[0]], normal[cut[1]]))
        merges.extend(cuts)
    return merges


def sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int],
                      unk_token: str | None, add_space_prefix: bool) -> BackendTokenizer:
    """A SentencePiece BPE vocabulary (pieces, scores and ``gguf.TokenType`` types, which number
    kinds as SentencePiece does) as a ``tokenizers`` BPE model.

    Spaces become '▁' and, with ``add_space_prefix``, a '▁' is put before the text and again
    after every special or user-defined token (llama.cpp's rule, also Hugging Face's legacy
    Llama tokenizer's). Characters missing from the vocabulary fall back to their UTF-8 bytes
    (the ``<0xXX>`` pieces). Decoding undoes both and drops the one prefix space.
    """
    backend = BackendTokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)},
                                   merges=_sentencepiece_merges(tokens, scores, types),
                                   unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend(_SPACE)] if add_space_prefix else []) + [normalizers.Replace(" ", _SPACE)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1, right=0)] if add_space_prefix else []))
    return backend


def add_vocabulary_tokens(backend: BackendTokenizer, tokens: list[str], types: list[int],
                          special_types: set[int]) -> None:
    """Control (``special_types``) tokens become special (skipped when decoding), user-defined
    ones plain added tokens; both are matched in the raw text before the model runs, as
    llama.cpp does."""
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t in special_types])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == gguf.TokenType.USER_DEFINED])


def bos_eos_post_processor(add_bos: bool, add_eos: bool, bos: str | None, eos: str | None,
                            token_id: Callable[[str], int | None]) -> processors.PostProcessor | None:
    """The post-processor that adds bos/eos around the encoded text (None: adds nothing)."""
    if not (add_bos or add_eos):
        return None
    for name, token, on in (("bos", bos, add_bos), ("eos", eos, add_eos)):
        if on and (token is None or token_id(token) is None):
            raise CheckpointError(f"the GGUF asks to add a {name} token (tokenizer.ggml.add_{name}_token) "
                                  "but names no valid one")
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ["$B:1"]
    used = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                         special_tokens=[(t, token_id(t)) for t in dict.fromkeys(used)])


def _f32(value: Any) -> float | None:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06): GGUF stores config floats as float32, HF configs hold decimals."""
    return None if value is None else float(str(np.float32(value)))


def _unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``LlamaModel.permute``.

    llama.cpp reorders each head's rows from HF's halves layout [x0..x(d/2-1), y0..y(d/2-1)]
    to interleaved pairs [x0, y0, x1, y1, ...] with
    ``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``; this swaps them back.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """The rope_scaling dict behind a ``rope_freqs`` tensor, checked by recomputing it.

    llama.cpp writes ``rope_freqs`` from HF's llama3 scaling with low_freq_factor 1,
    high_freq_factor 4 and an original context of 8192 (every Llama 3.x); ``factor`` is the
    largest entry.
    """
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    old, low, high, factor = 8192, 1.0, 4.0, scaling["factor"]
    expected = []
    for i in range(head_dim // 2):
        freq = 1.0 / theta ** (2 * i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            expected.append(1.0)
        elif wavelen > old / low:
            expected.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            expected.append(1.0 / ((1 - smooth) / factor + smooth))
    if factors.shape != (head_dim // 2,) or not np.allclose(factors, expected, rtol=1e-3):
        raise CheckpointError("this GGUF's rope_freqs tensor is not Llama 3 rope scaling "
                              "(factor, 1, 4, 8192); its rope scaling cannot be expressed in HF terms")
    return scaling


class GGUFSource:
    """One GGUF file seen as a Hugging Face checkpoint; tensors are read lazily, one at a time.

    Also a ``models.checkpoint.TensorSource`` (``names``, ``shape``, ``get``).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        try:
            self._reader = gguf.GGUFReader(str(self.path))  # memory-maps the file
        except (ValueError, OSError, IndexError, KeyError) as err:
            raise CheckpointError(f"{self.path} is not a readable GGUF file ({err}); "
                                  "re-download it") from None
        self.architecture: str = self._meta("general.architecture")
        if self.architecture not in HF_ARCHITECTURES:
            raise CheckpointError(
                f"GGUF architecture {self.architecture!r} ({self.path.name}) is not supported; "
                f"supported: {', '.join(HF_ARCHITECTURES)}")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._hf_to_gguf = self._map_tensor_names()
        self.hf_config: dict[str, Any] = self._build_hf_config()
        """The equivalent Hugging Face config.json."""

    # ---- metadata ------------------------------------------------------------------------

    def _meta(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _arch_meta(self, key: str, default: Any = None) -> Any:
        return self._meta(f"{self.architecture}.{key}", default)

    def _arch_int(self, key: str, default: int | None = None) -> int:
        value = self._arch_meta(key, default)
        if not isinstance(value, (int, np.integer)):
            found = "missing" if value is None else f"{value!r}, not one integer"
            raise CheckpointError(f"{self.path.name}: metadata {self.architecture}.{key} is {found}; "
                                  "the file is incomplete or a variant duetjax does not support")
        return int(value)

    def metadata(self) -> dict[str, Any]:
        """All GGUF key/values except the (large) tokenizer vocabulary arrays."""
        large = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                 "tokenizer.ggml.scores"}
        return {k: f.contents() for k, f in self._reader.fields.items()
                if k not in large and not k.startswith("GGUF.")}

    def _map_tensor_names(self) -> dict[str, str]:
        layer_map = _GEMMA2_LAYER_TENSORS if self.architecture == "gemma2" else _LAYER_TENSORS
        mapping, unknown = {}, []
        for name in self._tensors:
            if name in _CONSUMED_TENSORS:
                continue
            parts = name.split(".")
            hf = None
            if parts[0] == "blk" and len(parts) == 4 and parts[2] in layer_map:
                hf = f"model.layers.{parts[1]}.{layer_map[parts[2]]}.{parts[3]}"
            elif len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
                hf = f"{_GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
            if hf is None:
                unknown.append(name)
            else:
                mapping[hf] = name
        if unknown:
            raise CheckpointError(
                f"{self.path.name} holds tensors duetjax does not know for a {self.architecture} "
                f"model (e.g. {', '.join(unknown[:5])}): it is probably a variant (MoE, multimodal) "
                "that is not supported")
        return mapping

    def _build_hf_config(self) -> dict[str, Any]:
        architecture, model_type = HF_ARCHITECTURES[self.architecture]
        hidden = self._arch_int("embedding_length")
        heads = self._arch_int("attention.head_count")
        kv_heads = self._arch_int("attention.head_count_kv", heads)
        head_dim = self._arch_int("attention.key_length", hidden // heads)
        layers = self._arch_int("block_count")
        rope_dim = self._arch_meta("rope.dimension_count")
        if rope_dim is not None and int(rope_dim) != head_dim:
            raise CheckpointError(f"partial rotary embeddings (rope dim {rope_dim} of head dim "
                                  f"{head_dim}) are not supported")
        theta = _f32(self._arch_meta("rope.freq_base", 10000.0))
        if "token_embd.weight" not in self._tensors:
            raise CheckpointError(f"{self.path.name} has no token_embd.weight: not a complete model")
        vocab = int(self._tensors["token_embd.weight"].shape[1])
        config: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self._arch_int("feed_forward_length"),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rms_norm_eps": _f32(self._arch_meta("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": theta,
            "max_position_embeddings": self._arch_int("context_length", 4096),
            "vocab_size": vocab,
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "torch_dtype": "float32",
        }
        rope_scaling = None
        scaling_type = self._arch_meta("rope.scaling.type")
        if "rope_freqs.weight" in self._tensors:
            rope_scaling = _llama3_rope_scaling(self._dequantize("rope_freqs.weight"), head_dim, theta)
        elif scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": _f32(self._arch_meta("rope.scaling.factor"))}
        elif scaling_type not in (None, "none"):
            raise CheckpointError(f"rope scaling {scaling_type!r} is not supported "
                                  "(only linear and llama3)")
        if rope_scaling is not None:
            config["rope_scaling"] = rope_scaling
        if self.architecture in ("gemma", "gemma2"):
            config["hidden_activation"] = "gelu_pytorch_tanh"
        if self.architecture == "gemma2":
            # llama.cpp scales queries by 1/sqrt(head_dim), except Gemma 2 27B (46 layers),
            # which uses 1/sqrt(hidden / heads); HF calls that query_pre_attn_scalar.
            config["query_pre_attn_scalar"] = hidden // heads if layers == 46 else head_dim
            config["attn_logit_softcapping"] = _f32(self._arch_meta("attn_logit_softcapping"))
            config["final_logit_softcapping"] = _f32(self._arch_meta("final_logit_softcapping"))
            config["sliding_window"] = self._arch_meta("attention.sliding_window")
        for key in ("bos", "eos", "padding"):
            token_id = self._special_token_id(key)
            if token_id is not None:
                config["pad_token_id" if key == "padding" else f"{key}_token_id"] = token_id
        return config

    # ---- tensors -------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        """HF names of every weight, in file order (lm_head.weight only when not tied)."""
        return list(self._hf_to_gguf)

    def names(self) -> set[str]:
        return set(self._hf_to_gguf)

    def shape(self, name: str) -> tuple[int, ...]:
        """HF-layout shape ([out_features, in_features] for matrices), without reading data."""
        return tuple(int(n) for n in reversed(self._tensors[self._gguf_name(name)].shape))

    def _gguf_name(self, hf_name: str) -> str:
        try:
            return self._hf_to_gguf[hf_name]
        except KeyError:
            raise CheckpointError(f"tensor {hf_name!r} is not in {self.path.name}") from None

    def _dequantize(self, gguf_name: str) -> np.ndarray:
        tensor = self._tensors[gguf_name]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise CheckpointError(f"{gguf_name}: {err} (update the gguf package)") from None
        shape = tuple(int(n) for n in reversed(tensor.shape))
        return np.asarray(values, dtype=np.float32).reshape(shape)

    def get_tensor(self, hf_name: str) -> np.ndarray:
        """One tensor as float32 in HF layout, with llama.cpp's conversion undone."""
        weight = self._dequantize(self._gguf_name(hf_name))
        if self.architecture == "llama":
            heads = self.hf_config["num_attention_heads"]
            if ".self_attn.q_proj." in hf_name:
                weight = _unpermute_rope_rows(weight, heads)
            elif ".self_attn.k_proj." in hf_name:
                weight = _unpermute_rope_rows(weight, self.hf_config["num_key_value_heads"])
        if self.architecture in ("gemma", "gemma2") and hf_name.endswith("norm.weight"):
            weight = weight - 1.0
        return weight

    get = get_tensor

    # ---- tokenizer -----------------------------------------------------------------------

    def _special_token_id(self, key: str) -> int | None:
        """``tokenizer.ggml.<key>_token_id``, or llama.cpp's default for a 'llama' vocabulary;
        an end-of-turn id missing from the metadata is found by its text, as llama.cpp does
        (Gemma GGUFs store only ``<eos>``, yet a chat turn ends with ``<end_of_turn>``)."""
        token_id = self._meta(f"tokenizer.ggml.{key}_token_id")
        if token_id is None and self._meta("tokenizer.ggml.model") == "llama":
            token_id = _SPM_DEFAULT_IDS.get(key)
        if token_id is None and key == "eot":
            token_id = next((i for i, t in enumerate(self._tokens()) if t in _END_OF_TURN_TEXTS), None)
        return None if token_id is None else int(token_id)

    def _token(self, key: str) -> str | None:
        """Text of the special token stored as ``tokenizer.ggml.<key>_token_id``."""
        token_id = self._special_token_id(key)
        tokens = self._tokens()
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    def _tokens(self) -> list[str]:
        if not hasattr(self, "_token_list"):
            self._token_list = self._meta("tokenizer.ggml.tokens") or []
        return self._token_list

    def _add_flags(self) -> tuple[bool, bool]:
        # llama.cpp's defaults: bos for SentencePiece and Llama 3 vocabularies, never eos.
        pre = self._meta("tokenizer.ggml.pre", "default")
        default_bos = self._meta("tokenizer.ggml.model") == "llama" or pre in _PRE_LLAMA3
        add_bos = self._meta("tokenizer.ggml.add_bos_token", default_bos)
        return bool(add_bos), bool(self._meta("tokenizer.ggml.add_eos_token", False))

    def backend_tokenizer(self) -> BackendTokenizer:
        """The ``tokenizers.Tokenizer`` (what tokenizer.json holds) built from the metadata."""
        model = self._meta("tokenizer.ggml.model")
        if model not in SUPPORTED_TOKENIZER_MODELS:
            supported = ", ".join(f"{k!r} ({v})" for k, v in SUPPORTED_TOKENIZER_MODELS.items())
            raise CheckpointError(
                f"GGUF tokenizer model {model!r} is not supported (supported: {supported}); "
                "use the original model's Hugging Face directory for its tokenizer")
        tokens = self._tokens()
        types = self._meta("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise CheckpointError(f"{self.path.name}: {len(types)} token types for {len(tokens)} tokens")
        if model == "gpt2":
            backend = self._byte_level_bpe(tokens)
            special_types = {gguf.TokenType.CONTROL}
        else:
            backend = self._sentencepiece_bpe(tokens, types)
            special_types = {gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN}
        add_vocabulary_tokens(backend, tokens, types, special_types)
        post_processor = bos_eos_post_processor(*self._add_flags(), self._token("bos"),
                                                 self._token("eos"), backend.token_to_id)
        if post_processor is not None:
            backend.post_processor = post_processor
        return backend

    def _byte_level_bpe(self, tokens: list[str]) -> BackendTokenizer:
        """'gpt2' vocabularies: byte-level BPE with the stored merges and pre-tokenizer."""
        merges = [tuple(m.split(" ", 1)) for m in self._meta("tokenizer.ggml.merges", [])]
        pre = self._meta("tokenizer.ggml.pre", "default")
        backend = BackendTokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                       fuse_unk=False, byte_fallback=False,
                                       ignore_merges=pre in _PRE_LLAMA3))
        backend.pre_tokenizer = _pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        return backend

    def _sentencepiece_bpe(self, tokens: list[str], types: list[int]) -> BackendTokenizer:
        """'llama' vocabularies: SentencePiece BPE as llama.cpp runs it (``sentencepiece_bpe``;
        llama.cpp's default ``add_space_prefix`` is true, Gemma stores false)."""
        scores = self._meta("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise CheckpointError(f"{self.path.name}: a SentencePiece vocabulary needs one "
                                  "tokenizer.ggml.scores entry per token (they rank its merges)")
        return sentencepiece_bpe(tokens, scores, types, self._token("unknown"),
                                 bool(self._meta("tokenizer.ggml.add_space_prefix", True)))

    def _chat_templates(self) -> dict[str, str]:
        templates = {}
        if (default := self._meta("tokenizer.chat_template")) is not None:
            templates["default"] = default
        for name in self._meta("tokenizer.chat_templates", []) or []:
            if (source := self._meta(f"tokenizer.chat_template.{name}")) is not None:
                templates[name] = source
        return templates

    def tokenizer_config(self) -> dict[str, Any]:
        """tokenizer_config.json for the tokenizer built by ``backend_tokenizer``."""
        add_bos, add_eos = self._add_flags()
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                  "add_bos_token": add_bos, "add_eos_token": add_eos,
                                  "clean_up_tokenization_spaces": False,
                                  "model_max_length": self.hf_config["max_position_embeddings"]}
        for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                          ("padding", "pad_token")):
            if (token := self._token(key)) is not None:
                config[name] = token
        templates = self._chat_templates()
        if list(templates) == ["default"]:
            config["chat_template"] = templates["default"]
        elif templates:
            config["chat_template"] = [{"name": k, "template": v} for k, v in templates.items()]
        return config

    def generation_config(self) -> dict[str, Any]:
        """generation_config.json: eos_token_id lists every end id (eos, end-of-turn,
        end-of-message); the sampling settings are the file's ``general.sampling.*`` values,
        or ``LLAMA_CPP_SAMPLING`` when it has none."""
        eos = [self._special_token_id(key) for key in ("eos", "eot", "eom")]
        eos = list(dict.fromkeys(i for i in eos if i is not None))
        config: dict[str, Any] = {"_from_model_config": True}
        if (bos := self._special_token_id("bos")) is not None:
            config["bos_token_id"] = bos
        if eos:
            config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        if (pad := self._meta("tokenizer.ggml.padding_token_id")) is not None:
            config["pad_token_id"] = int(pad)
        return config | self._sampling()

    def _sampling(self) -> dict[str, Any]:
        sampling = {name: self._meta(key) for key, name in _SAMPLING_KEYS.items()
                    if self._meta(key) is not None}
        return {name: int(value) if name == "top_k" else _f32(value)
                for name, value in sampling.items()} or dict(LLAMA_CPP_SAMPLING)

    def tokenizer(self) -> Tokenizer:
        """The ``models.tokenizer.Tokenizer`` of this file, built in memory."""
        backend = self.backend_tokenizer()
        config = self.tokenizer_config()
        eos = self.generation_config().get("eos_token_id", [])
        return Tokenizer(backend, special_tokens=config, chat_templates=self._chat_templates(),
                         generation_eos_ids=eos if isinstance(eos, list) else [eos],
                         name_or_path=str(self.path))

    def save_tokenizer(self, out_dir: str | Path) -> None:
        """Writes tokenizer.json, tokenizer_config.json and generation_config.json."""
        out_dir = Path(out_dir)
        self.backend_tokenizer().save(str(out_dir / "tokenizer.json"))
        _write_json(out_dir / "tokenizer_config.json", self.tokenizer_config())
        _write_json(out_dir / "generation_config.json", self.generation_config())


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_SAFETENSORS_DTYPES = {"float32": ("F32", np.dtype(np.float32)), "float16": ("F16", np.dtype(np.float16))}


def _numpy_dtype(dtype: str) -> tuple[str, np.dtype]:
    if dtype == "bfloat16":
        import ml_dtypes  # ships with jax

        return "BF16", np.dtype(ml_dtypes.bfloat16)
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    return _SAFETENSORS_DTYPES[dtype]


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple[int, ...]],
                                read: Callable[[str], np.ndarray], dtype: str = "float32") -> None:
    """Writes a safetensors file one tensor at a time.

    ``safetensors.numpy.save_file`` needs every tensor in one dict (a whole model in memory);
    the format is a little-endian u64 header length, a JSON header of dtypes, shapes and byte
    offsets, then the raw bytes, so with the shapes known up front each tensor can be read,
    written and dropped in turn. The result is read back with ``safetensors.safe_open``.
    """
    code, np_dtype = _numpy_dtype(dtype)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data start is 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name, shape in shapes.items():
            tensor = np.ascontiguousarray(read(name).astype(np_dtype))
            if tensor.shape != tuple(shape):
                raise CheckpointError(f"{name}: got shape {tensor.shape}, expected {tuple(shape)}")
            f.write(tensor.tobytes())


def convert_gguf_to_hf(gguf_path: str | Path | GGUFSource, out_dir: str | Path,
                       dtype: str = "float32") -> Path:
    """Writes a complete Hugging Face model directory from a GGUF file.

    out_dir gets config.json, model.safetensors (tensors written one at a time, so memory stays
    at one tensor), tokenizer.json, tokenizer_config.json and generation_config.json. dtype is
    the stored weight dtype: float32 (exact dequantized values), float16 or bfloat16.
    gguf_path may also be an open ``GGUFSource`` (opening a GGUF parses all its metadata,
    which takes seconds for a large vocabulary).
    """
    _numpy_dtype(dtype)  # fail before any work on a bad dtype
    source = gguf_path if isinstance(gguf_path, GGUFSource) else GGUFSource(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(source.hf_config, torch_dtype=dtype)
    shapes = {name: source.shape(name) for name in source.tensor_names()}
    write_safetensors_streaming(out_dir / "model.safetensors", shapes, source.get_tensor, dtype)
    _write_json(out_dir / "config.json", config)
    source.save_tokenizer(out_dir)
    return out_dir
