"""A model's default sampling, taken from its generation config as vLLM's
``--generation-config`` takes it.

``"auto"`` (the default): the sampling settings of the model's generation_config.json
(``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, and
``max_new_tokens`` as ``max_tokens``) are the defaults of every request, and a request's own
values override them. A GGUF file's settings come from its ``general.sampling.*`` metadata, else
llama.cpp's defaults (``models.gguf_loader.LLAMA_CPP_SAMPLING``); the embedded SmolLM2's from
its model card (``models.default_model.EMBEDDED_SAMPLING``). ``"vllm"``: none of them, only
``SamplingParams``' own defaults (vLLM's: temperature 1, no top-p, top-k, min-p or penalty). A
directory: the generation_config.json in it.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

from models import LoadedModel
from models.hf_loader import GENERATION_CONFIG_FILE, read_generation_config

from .config import ConfigError
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)

GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                            "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                            "max_new_tokens": "max_tokens"}
"""generation_config.json keys that set a default (vLLM's list) -> SamplingParams fields."""


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """The SamplingParams fields that a model's generation config sets."""

    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def resolve(cls, generation_config: str, model: LoadedModel) -> SamplingDefaults:
        """The defaults ``generation_config`` ('auto', 'vllm' or a directory) gives ``model``;
        ConfigError naming the option when they cannot be read or are out of range."""
        if generation_config == "vllm":
            return cls()
        if generation_config == "auto":
            config, source = model.generation_config, f"{model.path}'s generation config"
        else:
            directory = Path(generation_config).expanduser()
            if not (directory / GENERATION_CONFIG_FILE).is_file():
                raise ConfigError("generation_config", f"{generation_config!r} is neither 'auto', "
                                  f"'vllm' nor a directory holding {GENERATION_CONFIG_FILE}")
            config = read_generation_config(directory)
            source = str(directory / GENERATION_CONFIG_FILE)
        defaults = cls({field: config[key] for key, field in GENERATION_CONFIG_FIELDS.items()
                        if config.get(key) is not None})
        try:
            defaults.params()
        except (ValueError, TypeError) as error:
            raise ConfigError("generation_config", f"{generation_config!r}: {source} sets a "
                              f"sampling value out of range ({error}); fix it, or pass 'vllm' to "
                              "leave the model's settings out") from None
        if defaults.fields:
            log.info("default sampling, from the model's generation config: %s (requests override "
                     "it; generation config 'vllm' leaves it out)",
                     ", ".join(f"{k}={v}" for k, v in defaults.fields.items()))
        return defaults

    def params(self, **overrides: Any) -> SamplingParams:
        """The defaults with ``overrides`` (SamplingParams fields) on top."""
        return SamplingParams(**{**self.fields, **overrides})

    @property
    def max_tokens(self) -> int | None:
        """The model's max_new_tokens (None: it sets none)."""
        return self.fields.get("max_tokens")
