"""Embed a corpus on Ray Data (needs ``pip install 'bge-edge[ray]'``).

``embed_dataset`` adds embedding columns to a ``ray.data.Dataset`` (a callable class loads and verifies
the artifact once per worker); ``embed_corpus`` (the ``bge-edge embed-corpus`` command) embeds a JSON
lines or Parquet file into Parquet shards exactly once, resumable after an interruption.

Output columns (Arrow types, identical in the Dataset and in the Parquet shards):
    dense_vecs       fixed_size_list<float32>[H]             L2-normalised, as ``Embedder.encode``
    lexical_weights  map<int32, float32>                      token id -> weight, ids ascending
    colbert_vecs     list<fixed_size_list<float32|float16>[H]> one row per token after CLS
Every input column is kept as it is. ``index_from_parquet`` turns the shards into a ``bge_edge.kernels.PackedIndex``.
"""

from __future__ import annotations

import importlib.util

from bge_edge.runtime.errors import MissingExtraError

INSTALL = "pip install 'bge-edge[ray]'"
_missing = [m for m in ("ray", "pyarrow") if importlib.util.find_spec(m) is None]
if _missing:
    raise MissingExtraError(f"bge_edge.ray needs {', '.join(_missing)}, not installed: run {INSTALL}")

from .corpus import CorpusResult, embed_corpus  # noqa: E402
from .dataset import COLBERT_DTYPES, BadRowsError, embed_dataset, encoded_table  # noqa: E402
from .index import index_from_parquet  # noqa: E402

__all__ = ["embed_dataset", "embed_corpus", "CorpusResult", "BadRowsError", "encoded_table", "COLBERT_DTYPES",
           "INSTALL", "index_from_parquet"]
