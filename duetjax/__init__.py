"""duetjax: a JAX/Pallas LLM serving engine that multiplexes prefill and decode (DuetServe).

The public names load lazily, so host-side modules (scheduler, roofline, optimizer) can be
imported without pulling in JAX.
"""
from importlib import import_module

_EXPORTS = {
    "AsyncEngine": ".async_engine",
    "CompletionOutput": ".outputs",
    "Engine": ".engine",
    "EngineConfig": ".config",
    "EngineStats": ".engine_stats",
    "RequestOutput": ".outputs",
    "SamplingParams": ".sampling_params",
    "StructuredOutputsParams": ".structured_outputs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'duetjax' has no attribute {name!r}")
