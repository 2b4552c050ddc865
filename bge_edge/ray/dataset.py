"""``embed_dataset``: BGE embeddings as new columns of a Ray Data ``Dataset``.

One callable class per worker (``map_batches(..., concurrency=N)``) loads the artifact once, after
checking that its copy of ``manifest.json`` has the SHA-256 the driver read; the ``Embedder`` then
verifies every file it reads against that manifest. So every worker on every node runs the very
artifact the driver named, or the job fails naming the host, the file and both digests.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from bge_edge.runtime.errors import InputError, IntegrityError
from bge_edge.runtime.integrity import sha256_file
from bge_edge.runtime.manifest import read_manifest

__all__ = ["embed_dataset", "encoded_table", "check_texts", "BadRowsError", "COLBERT_DTYPES",
           "DEFAULT_ROWS_PER_BATCH", "OUTPUT_COLUMNS"]

COLBERT_DTYPES = ("float32", "float16")
OUTPUT_COLUMNS = ("dense_vecs", "lexical_weights", "colbert_vecs")
# Rows per Ray task. Each task is one Embedder.encode call (which sorts by length and forms its own
# batches inside), so this only sets scheduling granularity and the unit lost to a killed worker:
# 256 MiniLM texts are ~0.1-0.5 s of work on one core, a full-shape BGE-M3 batch ~10-60 s.
DEFAULT_ROWS_PER_BATCH = 256
ID_COLUMNS = ("id", "_id")  # looked for, in this order, to name bad rows


class BadRowsError(InputError):
    """Rows whose text is missing, not a string, or empty; ``.rows`` lists (id, reason)."""

    def __init__(self, rows: Sequence[tuple[Any, str]], text_column: str) -> None:
        self.rows = list(rows)
        shown = "; ".join(f"id {i!r}: {why}" for i, why in self.rows[:10])
        more = f" (and {len(self.rows) - 10} more)" if len(self.rows) > 10 else ""
        super().__init__(f"{len(self.rows)} row(s) have no text to embed in column {text_column!r}: {shown}{more}. "
                         f"Fix or drop them (bge-edge embed-corpus writes such rows to errors.jsonl instead).")

    def __reduce__(self) -> Any:  # picklable across Ray processes
        return (_rebuild_bad_rows, (self.rows, str(self)))


def _rebuild_bad_rows(rows: list[tuple[Any, str]], message: str) -> BadRowsError:
    e = BadRowsError.__new__(BadRowsError)
    InputError.__init__(e, message)
    e.rows = rows
    return e


def check_texts(values: Sequence[Any]) -> list[tuple[int, str]]:
    """Positions and reasons of the values that are not a non-empty string (whitespace-only counts as empty)."""
    bad = []
    for i, v in enumerate(values):
        if v is None:
            bad.append((i, "text is missing (null)"))
        elif not isinstance(v, str):
            bad.append((i, f"text is {type(v).__name__}, not a string"))
        elif not v.strip():
            bad.append((i, "text is empty"))
    return bad


def _offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(np.asarray(lengths, np.int64), out=out[1:])
    if out[-1] > np.iinfo(np.int32).max:
        raise InputError(f"one batch holds {int(out[-1])} values, over Arrow's 32-bit list offsets; lower batch_size.")
    return out.astype(np.int32)


def encoded_table(res: dict[str, Any], hidden_size: int, colbert_dtype: str = "float32") -> dict[str, pa.Array]:
    """Arrow arrays of one ``Embedder.encode`` result (a list of texts in), keyed by output column."""
    out: dict[str, pa.Array] = {}
    dense = res.get("dense_vecs")
    if dense is not None:
        flat = pa.array(np.ascontiguousarray(dense, np.float32).reshape(-1), pa.float32())
        out["dense_vecs"] = pa.FixedSizeListArray.from_arrays(flat, hidden_size)
    lex = res.get("lexical_weights")
    if lex is not None:
        keys, vals, lengths = [], [], []
        for d in lex:
            ids = np.fromiter((int(k) for k in d), np.int32, count=len(d))
            w = np.fromiter(d.values(), np.float32, count=len(d))
            order = np.argsort(ids, kind="stable")
            keys.append(ids[order])
            vals.append(w[order])
            lengths.append(len(d))
        k = np.concatenate(keys) if keys else np.empty(0, np.int32)
        v = np.concatenate(vals) if vals else np.empty(0, np.float32)
        out["lexical_weights"] = pa.MapArray.from_arrays(pa.array(_offsets(lengths)), pa.array(k, pa.int32()),
                                                         pa.array(v, pa.float32()))
    col = res.get("colbert_vecs")
    if col is not None:
        if colbert_dtype not in COLBERT_DTYPES:
            raise InputError(f"colbert_dtype must be one of {COLBERT_DTYPES}, got {colbert_dtype!r}.")
        flat_c = (np.concatenate(col) if col else np.empty((0, hidden_size), np.float32)).astype(colbert_dtype)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat_c.reshape(-1)), hidden_size)
        out["colbert_vecs"] = pa.ListArray.from_arrays(pa.array(_offsets([len(c) for c in col])), inner)
    return out


class _EmbedWorker:
    """The callable class Ray Data runs on each worker: verify, load once, then embed pyarrow batches."""

    def __init__(self, artifact: str, manifest_sha256: str, precision: str | None, threads: int,
                 text_column: str, return_sparse: bool, return_colbert_vecs: bool, colbert_dtype: str,
                 id_column: str | None) -> None:
        from bge_edge.runtime import Embedder

        path = Path(artifact) / "manifest.json"
        actual = sha256_file(path) if path.is_file() else "missing"
        if actual != manifest_sha256:
            raise IntegrityError(f"worker on host {socket.gethostname()}: {path} has SHA-256 {actual}, the driver's "
                                 f"copy has {manifest_sha256}: this node holds a different artifact. Copy the same "
                                 f"artifact folder to the same path on every node.")
        self.embedder = Embedder(artifact, precision=precision, threads=threads)
        self.text_column, self.id_column = text_column, id_column
        self.sparse, self.colbert, self.colbert_dtype = return_sparse, return_colbert_vecs, colbert_dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.text_column not in batch.column_names:
            raise InputError(f"the dataset has no column {self.text_column!r} (columns: {batch.column_names}); "
                             f"pass text_column=...")
        clash = [c for c in OUTPUT_COLUMNS if c in batch.column_names]
        if clash:
            raise InputError(f"the dataset already has column(s) {clash}; drop or rename them before embedding.")
        texts = batch.column(self.text_column).to_pylist()
        bad = check_texts(texts)
        if bad:
            id_col = self.id_column or next((c for c in ID_COLUMNS if c in batch.column_names), None)
            ids = batch.column(id_col).to_pylist() if id_col else None
            raise BadRowsError([(ids[i] if ids else f"row {i} of a batch", why) for i, why in bad], self.text_column)
        res = self.embedder.encode(texts, return_dense=True, return_sparse=self.sparse,
                                   return_colbert_vecs=self.colbert)
        for name, arr in encoded_table(res, self.embedder.manifest.hidden_size, self.colbert_dtype).items():
            batch = batch.append_column(name, arr)
        return batch


def embed_dataset(ds: Any, artifact: str | Path, *, text_column: str = "text", precision: str | None = None,
                  return_sparse: bool = False, return_colbert_vecs: bool = False, concurrency: int | None = None,
                  threads_per_worker: int | None = None, batch_size: int | None = None,
                  colbert_dtype: str = "float32", id_column: str | None = None) -> Any:
    """``ds`` with ``dense_vecs`` (and ``lexical_weights``, ``colbert_vecs``) added; see the package docstring.

    artifact: an artifact folder at the same path on every node. concurrency: workers (default: the
    cluster's CPUs // threads_per_worker); threads_per_worker: ONNX Runtime threads and Ray CPUs per worker
    (default 1); batch_size: rows per task (default 256). A row with a missing, non-string or empty text
    fails the job with a ``BadRowsError`` naming it by ``id_column`` (default: ``id`` or ``_id`` if present).
    Workers that die are restarted and their batches re-run, so every row comes out exactly once.
    Writing the result with ``ds.write_parquet(path, use_dictionary=False)`` stores the vectors ~35 % smaller
    than pyarrow's default (which dictionary-encodes floats to no gain).
    """
    import ray

    root = Path(artifact).resolve()
    manifest = read_manifest(root)
    if (return_sparse or return_colbert_vecs) and manifest.kind != "m3":
        raise InputError(f"{root} is a {manifest.kind!r} model with heads {list(manifest.heads)}; sparse and ColBERT "
                         f"outputs need a BGE-M3 artifact. Drop return_sparse/return_colbert_vecs.")
    if colbert_dtype not in COLBERT_DTYPES:
        raise InputError(f"colbert_dtype must be one of {COLBERT_DTYPES}, got {colbert_dtype!r}.")
    for name, v in (("concurrency", concurrency), ("threads_per_worker", threads_per_worker),
                    ("batch_size", batch_size)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InputError(f"{name} must be a positive integer or None, got {v!r}.")
    threads = threads_per_worker or 1
    if concurrency is None:
        if not ray.is_initialized():
            ray.init()
        concurrency = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
    digest = sha256_file(root / "manifest.json")
    return ds.map_batches(
        _EmbedWorker, batch_format="pyarrow", batch_size=batch_size or DEFAULT_ROWS_PER_BATCH,
        fn_constructor_kwargs=dict(artifact=str(root), manifest_sha256=digest, precision=precision, threads=threads,
                                   text_column=text_column, return_sparse=return_sparse,
                                   return_colbert_vecs=return_colbert_vecs, colbert_dtype=colbert_dtype,
                                   id_column=id_column),
        # Ray Data's actor pools restart a dead worker and re-run its batches (max_restarts=-1,
        # max_task_retries=-1 are its defaults), so a killed worker loses no row and duplicates none.
        compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=threads)
