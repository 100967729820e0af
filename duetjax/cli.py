"""What the command lines (``duetjax.generate``, ``duetjax.serve``, ``duetjax.convert``)
share: the ``--generation-config``, quantization, ``--tensor-parallel-size`` and
``--data-parallel-size`` flags, the ``--load-format`` help and one-line start-up errors that
name flags."""
from __future__ import annotations

import argparse
from typing import Any

from models.default_model import EMBEDDED_SAMPLING

from .config import KV_CACHE_DTYPES, LAYER_WEIGHTS, ConfigError

GENERATION_CONFIG_HELP = (
    "where the default sampling (temperature, top_p, top_k, min_p, repetition_penalty, "
    "max_tokens) comes from, as vLLM's flag: 'auto' (default) the model's "
    "generation_config.json (a GGUF's general.sampling.* metadata, else llama.cpp's defaults; "
    "the embedded SmolLM2: "
    + ", ".join(f"{k} {v}" for k, v in EMBEDDED_SAMPLING.items())
    + "); 'vllm' none (temperature 1, no top-p/top-k/min-p, no penalty); or a directory "
    "holding a generation_config.json. What a request or flag sets overrides it")


LOAD_FORMAT_HELP = ("auto (by what the path holds), safetensors, gguf, orbax (duetjax's own, "
                    "MaxText's or Gemma's Flax checkpoints), dummy (random weights)")


def add_generation_config_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                        help=GENERATION_CONFIG_HELP)


def add_quantization_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--quantization", choices=("fp8",), default=None,
                        help="fp8: quantize the linear layers' weights to FP8 (e4m3, a scale per "
                             "output channel) as the model loads; FP8 checkpoints "
                             "(compressed-tensors, block-wise fp8) run in FP8 without it")
    parser.add_argument("--fp8-activation", choices=("dynamic", "none"), default=None,
                        help="with FP8 weights: dynamic (default) quantizes activations per token "
                             "and runs FP8 GEMMs; none upcasts the weights (weight-only)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                        help="auto (default) the model's dtype; fp8 an e4m3 KV cache (twice the "
                             "tokens per byte, half the KV reads per decode step) with the "
                             "checkpoint's k_scale/v_scale, else scales of 1.0")
    parser.add_argument("--calculate-kv-scales", action="store_true", default=None,
                        help="with --kv-cache-dtype fp8 and a checkpoint without KV scales: "
                             "compute them at start-up from the model's keys and values over a "
                             "built-in text")
    parser.add_argument("--layer-weights", choices=LAYER_WEIGHTS, default=None,
                        help="auto (default): per-layer for FP8 weights on GPUs, else stacked; "
                             "per-layer holds each decoder layer's weights in arrays of its own "
                             "(no slice copied out of a stack before an FP8 GEMM)")


def quantization_options(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields ``add_quantization_flags``' flags set (those given)."""
    return {name: getattr(args, name) for name in ("quantization", "fp8_activation",
                                                   "kv_cache_dtype", "calculate_kv_scales",
                                                   "layer_weights")
            if getattr(args, name) is not None}


def add_tensor_parallel_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                        help="split the model over N GPUs of this host (Megatron-style tensor "
                             "parallelism; default 1)")


def tensor_parallel_options(args: argparse.Namespace) -> dict[str, int]:
    """The EngineConfig field ``add_tensor_parallel_flag``'s flag sets (when given)."""
    size = args.tensor_parallel_size
    return {} if size is None else {"tensor_parallel_size": size}


def add_data_parallel_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--data-parallel-size", type=int, default=1, metavar="M",
                        help="serve M engine replicas, each in its own process on its own GPU "
                             "(or --tensor-parallel-size group: replica i takes GPUs "
                             "[i*N, (i+1)*N)), behind this one server; each request goes to the "
                             "replica whose prefix cache holds the longest start of its prompt, "
                             "unless that one is much busier than the least loaded (default 1: "
                             "one engine in this process)")
    parser.add_argument("--replica-timeout-s", type=_seconds, default=300.0, metavar="S",
                        help="with replicas: kill one that has requests but sends nothing for S "
                             "seconds (a step that never returns); its requests fail (default "
                             "%(default)s; 0: never)")


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def start_error(error: Exception) -> str:
    """The line to print when the engine cannot start: an option's problem names its flag."""
    if isinstance(error, ConfigError):
        return f"error: {error.flag} {error.problem}"
    return f"error: cannot start the engine: {error}"
