"""JAX's persistent compilation cache, shared by the engine and its worker processes."""
from __future__ import annotations

import collections
from pathlib import Path

import jax

from models.cache import cache_dir

HITS, REQUESTS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/compile_requests_use_cache"
_events: collections.Counter[str] = collections.Counter()
"""JAX's compilation cache events in this process, since ``enable_compilation_cache``."""
_listening = False


def enable_compilation_cache(directory: str | None) -> None:
    """Compiled executables persist in ``directory`` (None: duetjax's cache, '': off), so a
    warm start and every duet worker load them instead of compiling again."""
    if directory == "":
        return
    path = Path(directory) if directory else cache_dir() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # the small executables too (JAX's default skips those that compile in under a second)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    global _listening
    if not _listening:
        _listening = True
        jax.monitoring.register_event_listener(_count)


def _count(event: str, **kwargs: object) -> None:
    if event in (HITS, REQUESTS):
        _events[event] += 1


def cache_counts() -> tuple[int, int]:
    """(executables loaded from the persistent cache, compilations that looked there) in this
    process so far: a duet worker should load what the engine compiled before it."""
    return _events[HITS], _events[REQUESTS]
