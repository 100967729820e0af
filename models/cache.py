"""Where duetjax keeps converted models and compiled executables."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DUETJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/duetjax``, else ``~/.cache/duetjax``."""
    if os.environ.get("DUETJAX_CACHE_DIR"):
        return Path(os.environ["DUETJAX_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "duetjax"
