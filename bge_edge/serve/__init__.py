"""``bge-edge serve``: an HTTP sidecar (OpenAI-compatible embeddings, sparse, ColBERT, scoring) with
micro-batching, limits, health and metrics. Needs the ``[serve]`` extra (starlette, uvicorn).

``bge_edge.serve.config`` is stdlib-only (the CLI parser imports it); the app is imported on use.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, ServeConfig

__all__ = ["ServeConfig", "ConfigError", "create_app", "run"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """``bge_edge.serve.app.create_app`` (imports starlette)."""
    from .app import create_app as f

    return f(*args, **kwargs)


def run(config: ServeConfig) -> int:
    """Serve until SIGTERM/SIGINT; see ``bge_edge.serve.server``."""
    from .server import run as f

    return f(config)
