"""``load_model``: one entry point for HF directories, GGUF files, dummy weights and the
embedded default model."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from .checkpoint import load_params, random_params
from .config import ModelConfig
from .errors import CheckpointError
from .fp8_checkpoint import Fp8CheckpointSource, fp8_checkpoint_format, read_kv_scales
from .kv_scales import KVScales
from .hf_loader import SafetensorsSource, read_generation_config, read_hf_config
from .orbax_loader import load_orbax, tree_dir
from .quantization import QUANTIZATION_METHODS, Fp8Config
from .tensor_parallel import check, group_size

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "orbax", "dummy")
SENTENCEPIECE_MODEL = "tokenizer.model"
"""SentencePiece's model file: the tokenizer of Gemma's Flax releases."""
SHIPPED_CONFIGS = Path(__file__).parent / "configs"
"""Config-only directories of real model shapes, for ``load_format="dummy"`` benchmarks."""


def shipped_configs() -> list[str]:
    """Names accepted as ``model`` with ``load_format="dummy"`` (e.g. 'llama-3-8b')."""
    return sorted(p.name for p in SHIPPED_CONFIGS.iterdir() if (p / "config.json").is_file())


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: architecture, weights on the device, tokenizer."""

    config: ModelConfig
    """Architecture."""
    params: Any
    """Parameter tree (device arrays), stacked per layer."""
    tokenizer: Any
    """``models.tokenizer.Tokenizer``, or None when the checkpoint ships none."""
    dtype: Any
    """Compute and weight dtype."""
    path: Path
    """Where the checkpoint came from."""
    load_seconds: float
    """Wall time of ``load_model``."""
    generation_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What the checkpoint's generation_config.json holds (a GGUF's equivalent, from its
    metadata, for a GGUF file): end-of-sequence ids and recommended sampling settings."""
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The Hugging Face config.json ``config`` was built from (a GGUF's equivalent)."""
    quantization: Fp8Config | None = None
    """FP8 weights in the decoder's linear layers (``models.quantization``); None: every
    weight in ``dtype``."""
    kv_scales: KVScales | None = None
    """(K scale, V scale) per layer for an FP8 KV cache (``models.kv_scales``: per layer or
    per KV head), from the checkpoint (compressed-tensors ``k_scale`` / ``v_scale``) or
    computed (``kv_calibration``); None: none (an FP8 cache then scales by 1.0). Unused by a
    high-precision cache."""
    mesh: Mesh | None = None
    """The tensor-parallel group the weights are split over (``models.tensor_parallel``:
    ``params`` then has ``held_config``'s shapes); None: one device."""


def resolve_dtype(dtype: str | Any) -> Any:
    """'auto' is bfloat16 on GPU and float32 elsewhere."""
    if dtype in (None, "auto"):
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def _tokenizer_for(model_dir: Path):
    from .tokenizer import Tokenizer

    if (model_dir / "tokenizer.json").is_file():
        return Tokenizer.from_dir(model_dir)
    if (model_dir / SENTENCEPIECE_MODEL).is_file():
        from .sentencepiece_model import sentencepiece_tokenizer

        return sentencepiece_tokenizer(model_dir / SENTENCEPIECE_MODEL)
    return None


def load_model(model: str | Path | None = None, dtype: str | Any = "auto",
               load_format: str = "auto", quantization: str | None = None,
               fp8_activation: str = "dynamic", mesh: Mesh | None = None) -> LoadedModel:
    """Loads a checkpoint.

    model: a Hugging Face directory (config.json + safetensors), a ``.gguf`` file, an Orbax
    checkpoint directory (``orbax_loader``: duetjax's own, MaxText's or Gemma's Flax), or None
    for the embedded SmolLM2-135M-Instruct. load_format: 'auto' (by what the path holds),
    'safetensors', 'gguf', 'orbax', or 'dummy' (random weights of the real shapes from a
    directory holding only config.json, or the name of a shipped config such as 'llama-3-8b').
    quantization: None (the checkpoint's own: FP8 for an FP8 checkpoint, else ``dtype``) or
    'fp8' (a high-precision checkpoint's linear layers quantized on load). fp8_activation:
    ``Fp8Config.activation`` of FP8 weights. mesh: a tensor-parallel group to split the
    weights over as they load (``models.tensor_parallel``; TensorParallelError when the
    model does not split over it).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; choose one of {', '.join(LOAD_FORMATS)}")
    if quantization not in (None, *QUANTIZATION_METHODS):
        raise ValueError(f"unknown quantization {quantization!r}; choose one of "
                         f"{', '.join(QUANTIZATION_METHODS)} (or none)")
    fp8 = Fp8Config(activation=fp8_activation)
    quant = fp8 if quantization == "fp8" else None
    start = time.perf_counter()
    kv_scales = None
    dtype = resolve_dtype(dtype)
    if model is None:
        from .default_model import default_model_dir

        model = default_model_dir()
    path = Path(model).expanduser()
    if not path.exists() and load_format == "dummy" and str(model) in shipped_configs():
        path = SHIPPED_CONFIGS / str(model)
    if not path.exists():
        hint = f" (with load_format='dummy' also one of: {', '.join(shipped_configs())})"
        raise CheckpointError(f"model path {path} does not exist{hint}")
    if path.is_file():
        if path.suffix != ".gguf" and load_format != "gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; pass a Hugging Face model "
                                  "directory or a GGUF file")
        from .gguf_loader import GGUFSource

        source = GGUFSource(path)
        generation_config = source.generation_config()
        hf_config = source.hf_config
        config = ModelConfig.from_hf(hf_config)
        check(config, group_size(mesh))
        params = load_params(config, source, dtype, quantization=quant, mesh=mesh)
        try:
            tokenizer = source.tokenizer()
        except CheckpointError as err:  # e.g. a vocabulary type other than BPE or SentencePiece
            log.warning("%s: no tokenizer (%s); pass prompts as token ids", path, err)
            tokenizer = None
    elif load_format == "orbax" or (load_format == "auto" and tree_dir(path) is not None):
        if quant is not None:
            raise CheckpointError("quantization='fp8' does not apply to Orbax checkpoints yet "
                                  "(one converted from an FP8 checkpoint loads in FP8 without it): "
                                  "load the Hugging Face or GGUF checkpoint with it instead")
        checkpoint = load_orbax(path, dtype, mesh=mesh, fp8=fp8)
        config, hf_config, params = checkpoint.config, checkpoint.hf_config, checkpoint.params
        quant, kv_scales = checkpoint.quantization, checkpoint.kv_scales
        generation_config = read_generation_config(checkpoint.files_dir)
        tokenizer = _tokenizer_for(checkpoint.files_dir)
    else:
        hf_config = read_hf_config(path)
        config = ModelConfig.from_hf(hf_config)
        check(config, group_size(mesh))
        generation_config = read_generation_config(path)
        fp8_format = fp8_checkpoint_format(hf_config)
        if fp8_format is not None:
            quant = fp8  # an FP8 checkpoint runs in FP8, as it was published
            if fp8_format.static_activations:
                log.info("%s: its static activation scales are not used; activations are "
                         "quantized per token at run time", path)
        if load_format == "dummy":
            params = random_params(config, dtype, quantization=quant, mesh=mesh)
        else:
            source = SafetensorsSource(path)
            kv_scales = read_kv_scales(source, config.num_layers, config.num_kv_heads)
            if fp8_format is not None:
                source = Fp8CheckpointSource(source, fp8_format)
            params = load_params(config, source, dtype, quantization=quant, mesh=mesh)
        tokenizer = _tokenizer_for(path)
    jax.block_until_ready(params)
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, dtype=dtype, path=path,
                       load_seconds=time.perf_counter() - start,
                       generation_config=generation_config, hf_config=hf_config,
                       quantization=quant, kv_scales=kv_scales, mesh=mesh)
