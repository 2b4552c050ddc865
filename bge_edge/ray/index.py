"""From embed-corpus output to search: a ``PackedIndex`` from Parquet (pyarrow here; the kernels stay numpy-only)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bge_edge.kernels import KernelInputError, PackedIndex

__all__ = ["index_from_parquet"]

COLUMNS = {"dense": "dense_vecs", "sparse": "lexical_weights", "colbert": "colbert_vecs"}


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise KernelInputError(f"{path} is neither a .parquet file nor a folder of them.")
    manifest = path / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text(encoding="utf-8"))
        if not m.get("complete") or "shards" not in m:
            raise KernelInputError(f"{manifest}: the embed-corpus run is not finished; rerun the same command first.")
        return [path / s["file"] for s in m["shards"]]
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise KernelInputError(f"{path} holds no .parquet files.")
    return files


def _flat(col: pa.ChunkedArray) -> pa.Array:
    arr = pa.concat_arrays(col.chunks)
    if arr.null_count:
        raise KernelInputError(f"column {col.type} holds nulls; every row needs its vectors.")
    return arr


def index_from_parquet(path: str | os.PathLike[str], colbert_dtype: str = "float32",
                       modes: Sequence[str] | None = None) -> PackedIndex:
    """A ``PackedIndex`` of the documents in Parquet written by ``bge-edge embed-corpus`` / ``embed_dataset``.

    path: one ``.parquet`` file, or an output folder (its shards in ``manifest.json`` order, else ``*.parquet``
    sorted by name): document i of the index is row i of the files in that order. Reads the columns
    ``dense_vecs``, ``lexical_weights`` and ``colbert_vecs`` that are present, or only those of ``modes``
    (among "dense", "sparse", "colbert"). colbert_dtype: the index's ColBERT storage (see ``PackedIndex``).
    """
    if modes is not None and any(m not in COLUMNS for m in modes):
        raise KernelInputError(f"modes must be among {tuple(COLUMNS)}, got {list(modes)!r}.")
    wanted = [COLUMNS[m] for m in (modes or COLUMNS)]
    index = PackedIndex(colbert_dtype)
    for f in _files(Path(path)):
        cols = [c for c in wanted if c in pq.read_schema(f).names]
        if not cols:
            raise KernelInputError(f"{f} has none of the columns {wanted}; was it written by embed-corpus?")
        table = pq.read_table(f, columns=cols)
        n = table.num_rows
        if n == 0:
            continue
        dense = lexical = colbert = None
        if "dense_vecs" in cols:
            dense = _flat(table.column("dense_vecs")).flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
        if "lexical_weights" in cols:
            arr = _flat(table.column("lexical_weights"))
            off = arr.offsets.to_numpy().astype(np.int64)
            ids = arr.keys.to_numpy(zero_copy_only=False)[off[0]:off[-1]]
            w = arr.items.to_numpy(zero_copy_only=False)[off[0]:off[-1]]
            lexical = (ids, w, off - off[0])
        if "colbert_vecs" in cols:
            arr = _flat(table.column("colbert_vecs"))
            off = arr.offsets.to_numpy().astype(np.int64)
            width = arr.type.value_type.list_size
            rows = arr.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)[off[0]:off[-1]]
            colbert = (rows, off - off[0])
        index.add_packed(dense, lexical, colbert)
    return index
