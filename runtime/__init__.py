"""Lean inference for bge-edge artifacts: needs only tokenizers, numpy and onnxruntime."""

from .embedder import Embedder, EncodeStats
from .errors import ArtifactError, BackendError, BgeEdgeError, InputError, IntegrityError, MissingExtraError
from .manifest import Manifest, read_manifest
from .reranker import Reranker, RerankStats

__all__ = ["Embedder", "EncodeStats", "Reranker", "RerankStats", "Manifest", "read_manifest", "BgeEdgeError",
           "ArtifactError", "IntegrityError", "InputError", "MissingExtraError", "BackendError"]
