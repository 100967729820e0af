"""duetjax: a JAX/Pallas LLM serving engine that multiplexes prefill and decode (DuetServe)."""
from .config import EngineConfig
from .engine import Engine
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["CompletionOutput", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
