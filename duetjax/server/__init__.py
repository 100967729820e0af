"""OpenAI-compatible HTTP server over an ``AsyncEngine`` or a ``DataParallelEngine``
(FastAPI + uvicorn).

Run it with ``python -m duetjax.serve``; build the app yourself with ``create_app``.
"""
from .app import create_app

__all__ = ["create_app"]
