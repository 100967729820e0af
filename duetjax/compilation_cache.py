"""JAX's persistent compilation cache, shared by the engine and its worker processes."""
from __future__ import annotations

from pathlib import Path

import jax

from models.cache import cache_dir


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
