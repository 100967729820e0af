"""Data-parallel serving: M engine replicas, each in its own process on its own GPUs, behind
one server (``DataParallelEngine``), with load- and prefix-cache-aware routing (``router``).

The names load lazily, so the router can be imported without JAX.
"""
from importlib import import_module

_EXPORTS = {
    "DataParallelEngine": ".engine",
    "ReplicaStartError": ".client",
    "Router": ".router",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'duetjax.data_parallel' has no attribute {name!r}")
