"""Export BGE models to verified ONNX artifact folders (needs ``pip install 'bge-edge[export]'``)."""

from __future__ import annotations

import importlib.util

from bge_edge.runtime.errors import MissingExtraError

_missing = [m for m in ("torch", "transformers", "onnx", "safetensors") if importlib.util.find_spec(m) is None]
if _missing:
    raise MissingExtraError(f"bge_edge.export needs {', '.join(_missing)}, not installed: run "
                            f"pip install 'bge-edge[export]'  (on CPU-only machines install torch first from "
                            f"the CPU wheel index to avoid a multi-GB CUDA build)")

from .pipeline import INT8_RECIPES, PRECISIONS, ExportError, export_model  # noqa: E402
from .source import SourceError  # noqa: E402
from .synthetic import (  # noqa: E402
    FULL_BGE_SMALL,
    FULL_M3,
    FULL_RERANKER_M3,
    TINY_BERT,
    TINY_M3,
    TINY_RERANKER_BASE,
    TINY_RERANKER_M3,
    ModelShape,
    build_random_model,
)

__all__ = ["export_model", "ExportError", "SourceError", "PRECISIONS", "INT8_RECIPES", "build_random_model",
           "ModelShape", "TINY_M3", "TINY_BERT", "FULL_M3", "FULL_BGE_SMALL", "TINY_RERANKER_M3", "TINY_RERANKER_BASE",
           "FULL_RERANKER_M3"]
