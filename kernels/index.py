"""A packed in-memory index of encoded documents (dense, sparse, ColBERT) with hybrid and two-stage search.

Hybrid retrieval on a laptop with no vector database: ``add(**embedder.encode(docs, ...))`` appends
documents, ``search`` ranks them by the weighted average of the modes the query gives,
    score = sum_m w_m * score_m / sum_m w_m   over the modes m with a query part and w_m > 0
(FlagEmbedding's ``compute_score`` combination). Exhaustive search scores every document; two-stage
search (``candidates=C``) ranks all documents by the cheap dense/sparse scores first and runs MaxSim on
the best C only. Saved as one ``.npz`` of plain arrays (no pickle).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from ._errors import KernelInputError, as_float_matrix, check_finite, check_offsets, describe
from .hybrid import check_weights
from .lexical import PackedLexical, lexical_scores, pack_lexical
from .maxsim import maxsim, quantize_int8, topk

__all__ = ["PackedIndex"]

FORMAT_VERSION = 1
COLBERT_DTYPES = ("float32", "float16", "int8")
MODE_NAMES = ("dense", "sparse", "colbert")
FLOAT16_MAX = 65504.0
PathLike = Union[str, "os.PathLike[str]"]


class PackedIndex:
    """Append-only store of encoded documents, packed into flat arrays for batched scoring.

    colbert_dtype: storage of ColBERT vectors: "float32", "float16" (half the memory, scores within
    ~1e-3) or "int8" (a quarter, per-vector scales; scores within ~1e-2). Dense vectors and lexical
    weights are stored as float32.
    """

    def __init__(self, colbert_dtype: str = "float32") -> None:
        if colbert_dtype not in COLBERT_DTYPES:
            raise KernelInputError(f"colbert_dtype must be one of {COLBERT_DTYPES}, got {colbert_dtype!r}.")
        self.colbert_dtype = colbert_dtype
        self._modes: tuple[bool, bool, bool] | None = None  # (dense, sparse, colbert), fixed by the first add
        self._n = 0
        self._dense: list[np.ndarray] = []  # parts of (n, H_dense) float32
        self._lex: list[PackedLexical] = []
        self._col: list[np.ndarray] = []  # parts of (tokens, H_colbert) in colbert_dtype
        self._col_len: list[np.ndarray] = []  # parts of (n,) int64 rows per document
        self._col_scales: list[np.ndarray] = []  # parts of (tokens,) float32, int8 storage only
        self._col_offsets: np.ndarray | None = None  # (n + 1,) int64, rebuilt after adds

    # ---- building ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this index holds, among ("dense", "sparse", "colbert")."""
        return tuple(m for m, has in zip(MODE_NAMES, self._modes or (False,) * 3) if has)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed arrays."""
        parts = self._dense + self._col + self._col_len + self._col_scales
        return sum(a.nbytes for a in parts) + sum(p.ids.nbytes + p.weights.nbytes + p.offsets.nbytes
                                                   for p in self._lex)

    def add(self, dense_vecs: Any = None, lexical_weights: Sequence[Mapping[str, float]] | None = None,
            colbert_vecs: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Append encoded documents (``add(**encode(...))`` works); returns their indices in the index.

        dense_vecs (n, H) floats; lexical_weights: n dicts {token id as str: weight}; colbert_vecs: n
        arrays (len_i >= 1, H). Give the same modes on every call.
        """
        given = (dense_vecs is not None, lexical_weights is not None, colbert_vecs is not None)
        if not any(given):
            raise KernelInputError("add needs at least one of dense_vecs, lexical_weights, colbert_vecs.")
        if self._modes is not None and given != self._modes:
            raise KernelInputError(f"this index holds modes {self.modes}; every add must give exactly those, "
                                   f"got {tuple(m for m, g in zip(MODE_NAMES, given) if g)}.")
        counts = {}
        dense = lex = None
        col: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
        if dense_vecs is not None:
            dense = as_float_matrix(dense_vecs, "dense_vecs", allow_empty=True)
            if not np.isfinite(dense).all():
                raise KernelInputError(f"dense_vecs row {int(np.argmax(~np.isfinite(dense).all(axis=1)))} holds "
                                       f"NaN/inf; re-encode that document.")
            if self._dense and dense.shape[1] != self._dense[0].shape[1]:
                raise KernelInputError(f"dense_vecs hidden size {dense.shape[1]} != this index's "
                                       f"{self._dense[0].shape[1]}; use the same model for every add.")
            counts["dense_vecs"] = dense.shape[0]
        if lexical_weights is not None:
            lex = pack_lexical(lexical_weights)
            counts["lexical_weights"] = lex.offsets.shape[0] - 1
        if colbert_vecs is not None:
            col = self._pack_colbert(colbert_vecs)
            counts["colbert_vecs"] = col[1].shape[0]
        if len(set(counts.values())) != 1:
            raise KernelInputError(f"every mode needs one entry per document, got counts {counts}.")
        return self._append(given, dense, lex, col, next(iter(counts.values())))

    def _append(self, given: tuple[bool, bool, bool], dense: np.ndarray | None, lex: PackedLexical | None,
                col: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None, n: int) -> np.ndarray:
        """Append checked, packed parts of n documents (the second half of `add` and `from_parquet`)."""
        if dense is not None:
            self._dense.append(np.ascontiguousarray(dense))
        if lex is not None:
            self._lex.append(lex)
        if col is not None:
            self._col.append(col[0])
            self._col_len.append(col[1])
            self._col_offsets = None
            if col[2] is not None:
                self._col_scales.append(col[2])
        self._modes = given
        self._n += n
        return np.arange(self._n - n, self._n, dtype=np.int64)

    def _pack_colbert(self, colbert_vecs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if isinstance(colbert_vecs, np.ndarray) and colbert_vecs.ndim != 3:
            raise KernelInputError(f"colbert_vecs must be a list of (len_i, H) arrays, one per document, got "
                                   f"{describe(colbert_vecs)}.")
        mats = [as_float_matrix(v, f"colbert_vecs[{i}]") for i, v in enumerate(colbert_vecs)]
        widths = {m.shape[1] for m in mats}
        if self._col:
            widths.add(self._col[0].shape[1])
        if len(widths) > 1:
            raise KernelInputError(f"all colbert_vecs must have the same hidden size (this index: "
                                   f"{sorted(widths)}); use the same model for every add.")
        lengths = np.array([m.shape[0] for m in mats], np.int64)
        if not mats:
            h = self._col[0].shape[1] if self._col else 0
            return np.empty((0, h), self.colbert_dtype), lengths, (np.empty(0, np.float32)
                                                                   if self.colbert_dtype == "int8" else None)
        flat = np.concatenate(mats)  # (tokens, H) float32
        try:
            check_finite(flat, "colbert_vecs")
        except KernelInputError:
            row = int(np.argmax(~np.isfinite(flat).all(axis=1)))
            doc = int(np.searchsorted(np.cumsum(lengths), row, side="right"))
            raise KernelInputError(f"colbert_vecs[{doc}] holds NaN/inf; re-encode that document.") from None
        if self.colbert_dtype == "float16":
            big = float(np.abs(flat).max())
            if big > FLOAT16_MAX:
                raise KernelInputError(f"colbert_vecs hold values up to {big:g}, beyond float16's {FLOAT16_MAX:g}; "
                                       f"use colbert_dtype='float32' (or normalise the vectors).")
            return flat.astype(np.float16), lengths, None
        if self.colbert_dtype == "int8":
            q, scales = quantize_int8(flat)
            return q, lengths, scales
        return flat, lengths, None

    def _consolidate(self) -> None:
        """Concatenate appended parts into one array per field (once per batch of adds)."""
        if len(self._dense) > 1:
            self._dense = [np.concatenate(self._dense)]
        if len(self._lex) > 1:
            ids = np.concatenate([p.ids for p in self._lex])
            w = np.concatenate([p.weights for p in self._lex])
            sizes = np.concatenate([np.diff(p.offsets) for p in self._lex])
            offsets = np.zeros(sizes.shape[0] + 1, np.int64)
            np.cumsum(sizes, out=offsets[1:])
            self._lex = [PackedLexical(ids, w, offsets)]
        for name in ("_col", "_col_len", "_col_scales"):
            parts = getattr(self, name)
            if len(parts) > 1:
                setattr(self, name, [np.concatenate(parts)])
        if self._col_len and self._col_offsets is None:
            offsets = np.zeros(self._col_len[0].shape[0] + 1, np.int64)
            np.cumsum(self._col_len[0], out=offsets[1:])
            self._col_offsets = offsets

    def add_packed(self, dense: np.ndarray | None = None,
                   lexical: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                   colbert: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Append documents already in flat arrays (e.g. read from Arrow/Parquet) without per-document dicts.

        dense (n, H) floats; lexical = (ids (nnz,) ints, weights (nnz,) floats, offsets (n + 1,)): document i's
        {id: weight} is ids/weights[offsets[i]:offsets[i + 1]], each id once per document; colbert = (rows
        (tokens, H) floats, offsets (n + 1,)), every document >= 1 row. Same modes on every call, as in `add`.
        """
        given = (dense is not None, lexical is not None, colbert is not None)
        if not any(given):
            raise KernelInputError("add_packed needs at least one of dense, lexical, colbert.")
        if self._modes is not None and given != self._modes:
            raise KernelInputError(f"this index holds modes {self.modes}; every add must give exactly those, "
                                   f"got {tuple(m for m, g in zip(MODE_NAMES, given) if g)}.")
        counts: dict[str, int] = {}
        d = lex = None
        col: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
        if dense is not None:
            d = as_float_matrix(dense, "dense", allow_empty=True)
            check_finite(d, "dense")
            if self._dense and d.shape[1] != self._dense[0].shape[1]:
                raise KernelInputError(f"dense hidden size {d.shape[1]} != this index's {self._dense[0].shape[1]}; "
                                       f"use the same model for every add.")
            counts["dense"] = d.shape[0]
        if lexical is not None:
            ids, w = np.asarray(lexical[0]), np.asarray(lexical[1])
            if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu") or w.shape != ids.shape or \
                    (w.size and w.dtype.kind != "f"):
                raise KernelInputError(f"lexical must be (ids (nnz,) ints, weights (nnz,) floats, offsets), got ids "
                                       f"{describe(ids)} and weights {describe(w)}.")
            off = check_offsets(lexical[2], ids.shape[0], "lexical offsets", allow_empty_segments=True)
            w = w.astype(np.float32)
            check_finite(w, "lexical weights")
            seg = np.repeat(np.arange(off.shape[0] - 1), np.diff(off))
            order = np.lexsort((ids, seg))  # ids ascending within each document, as pack_lexical keeps them
            lex = PackedLexical(ids.astype(np.int64)[order], w[order], off)
            counts["lexical"] = off.shape[0] - 1
        if colbert is not None:
            rows = as_float_matrix(colbert[0], "colbert rows")
            off = check_offsets(colbert[1], rows.shape[0], "colbert offsets", allow_empty_segments=False)
            col = self._pack_colbert(np.split(rows, off[1:-1]) if off.shape[0] > 1 else [])
            counts["colbert"] = off.shape[0] - 1
        if len(set(counts.values())) != 1:
            raise KernelInputError(f"every mode needs one entry per document, got counts {counts}.")
        return self._append(given, d, lex, col, next(iter(counts.values())))

    # ---- searching --------------------------------------------------------------------------------

    def search(self, query_dense: np.ndarray | None = None, query_sparse: Mapping[str, float] | None = None,
               query_colbert: np.ndarray | None = None, k: int = 10,
               weights: Sequence[float] = (1.0, 1.0, 1.0),
               candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k documents for one query: (indices int64 (k',), scores float32 (k',)), best first.

        weights = [w_dense, w_sparse, w_colbert]; the score averages the modes the query gives with
        weight > 0. candidates=None scores every document; candidates=C ranks all documents by the
        given dense/sparse parts first (weighted as above, or equally when their weights are 0) and
        runs MaxSim only on the best C.
        """
        w = check_weights(weights)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
            raise KernelInputError(f"k must be a non-negative int, got {k!r}.")
        if candidates is not None and (not isinstance(candidates, (int, np.integer)) or
                                       isinstance(candidates, bool) or candidates < 1):
            raise KernelInputError(f"candidates must be None (exhaustive) or a positive int, got {candidates!r}.")
        parts = (query_dense, query_sparse, query_colbert)
        given = tuple(p is not None for p in parts)
        if not any(given):
            raise KernelInputError("search needs at least one of query_dense, query_sparse, query_colbert.")
        if self._n == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        assert self._modes is not None
        for m, g, has in zip(MODE_NAMES, given, self._modes):
            if g and not has:
                raise KernelInputError(f"query gives {m} but this index holds only {self.modes}; drop query_{m} "
                                       f"or add documents with {m} vectors.")
        active = [i for i in range(3) if given[i] and w[i] > 0]
        if not active:
            raise KernelInputError(f"nothing to score: the query gives {[MODE_NAMES[i] for i in range(3) if given[i]]} "
                                   f"but their weights are 0 (weights {list(weights)!r}).")
        self._consolidate()
        qd = self._query_dense(query_dense) if given[0] else None
        qc = self._query_colbert(query_colbert) if given[2] else None

        scores: dict[int, np.ndarray] = {}
        if given[0]:
            scores[0] = self._dense[0] @ qd  # (N, H) @ (H,) -> (N,)
        if given[1]:
            lex = self._lex[0]
            scores[1] = lexical_scores(query_sparse, lex.ids, lex.weights, lex.offsets,  # type: ignore[arg-type]
                                       check_finite=False)
        if candidates is None or candidates >= self._n or 2 not in active:
            if 2 in active:
                scores[2] = self._colbert_scores(qc, None)
            total = _combine({i: scores[i] for i in active}, w)
            return topk(total, int(k))
        first = [i for i in (0, 1) if given[i]]
        if not first:
            raise KernelInputError("two-stage search (candidates=C) ranks by dense and/or sparse scores first; "
                                   "give query_dense or query_sparse, or pass candidates=None.")
        fw = w if sum(w[i] for i in first) > 0 else (1.0, 1.0, 0.0)
        first_stage = _combine({i: scores[i] for i in first if fw[i] > 0}, fw)
        cand, _ = topk(first_stage, int(candidates))
        cand.sort()  # storage order: better locality, and ties keep the lower document index first
        final = {i: scores[i][cand] for i in active if i != 2}
        final[2] = self._colbert_scores(qc, cand)
        idx, val = topk(_combine(final, w), int(k))
        return cand[idx], val

    def _query_dense(self, q: Any) -> np.ndarray:
        a = np.asarray(q)
        if a.dtype.kind != "f" or a.ndim != 1 or a.shape[0] != self._dense[0].shape[1]:
            raise KernelInputError(f"query_dense must be a float vector of shape ({self._dense[0].shape[1]},), "
                                   f"got {describe(a)}.")
        if not np.isfinite(a).all():
            raise KernelInputError("query_dense holds NaN/inf; re-encode the query.")
        return a.astype(np.float32, copy=False)

    def _query_colbert(self, q: Any) -> np.ndarray:
        a = as_float_matrix(q, "query_colbert")
        if a.shape[1] != self._col[0].shape[1]:
            raise KernelInputError(f"query_colbert hidden size {a.shape[1]} != this index's "
                                   f"{self._col[0].shape[1]}; use the model that encoded the documents.")
        return a

    def _colbert_scores(self, qc: np.ndarray | None, cand: np.ndarray | None) -> np.ndarray:
        assert qc is not None and self._col_offsets is not None
        scales = self._col_scales[0] if self._col_scales else None
        return maxsim(qc, self._col[0], self._col_offsets, candidates=cand, doc_scales=scales,
                      check_finite=False)  # checked once in add()

    # ---- saving -----------------------------------------------------------------------------------

    def save(self, path: PathLike) -> None:
        """Write the index to one ``.npz`` of plain arrays (no pickle), atomically (temp file + rename)."""
        self._consolidate()
        modes = self._modes or (False, False, False)
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(FORMAT_VERSION, np.int64),
            "n_docs": np.array(self._n, np.int64),
            "modes": np.array(modes, np.bool_),
            "colbert_dtype": np.array(self.colbert_dtype),
        }
        if modes[0]:
            arrays["dense"] = self._dense[0]
        if modes[1]:
            lex = self._lex[0]
            arrays.update(lex_ids=lex.ids, lex_weights=lex.weights, lex_offsets=lex.offsets)
        if modes[2]:
            assert self._col_offsets is not None
            arrays.update(colbert=self._col[0], colbert_offsets=self._col_offsets)
            if self._col_scales:
                arrays["colbert_scales"] = self._col_scales[0]
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, allow_pickle=False, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: PathLike) -> PackedIndex:
        """Read an index written by `save` (``allow_pickle=False``), checking that its arrays agree."""
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        try:
            version = int(a["format_version"])
            if version != FORMAT_VERSION:
                raise KernelInputError(f"{path}: index format version {version} is not supported (this build "
                                       f"reads version {FORMAT_VERSION}); re-build the index.")
            index = cls(str(a["colbert_dtype"]))
            n = int(a["n_docs"])
            modes = tuple(bool(x) for x in a["modes"])
        except KeyError as e:
            raise KernelInputError(f"{path} is not a PackedIndex file (missing {e}).") from None
        if n == 0:
            return index
        try:
            if modes[0]:
                d = a["dense"]
                if d.ndim != 2 or d.shape[0] != n or d.dtype != np.float32:
                    raise KernelInputError(f"{path}: dense has {describe(d)}, expected ({n}, H) float32.")
                index._dense = [d]
            if modes[1]:
                off = check_offsets(a["lex_offsets"], a["lex_ids"].shape[0], "lex_offsets",
                                    allow_empty_segments=True)
                if off.shape[0] != n + 1 or a["lex_weights"].shape != a["lex_ids"].shape:
                    raise KernelInputError(f"{path}: lexical arrays do not describe {n} documents.")
                index._lex = [PackedLexical(a["lex_ids"].astype(np.int64), a["lex_weights"].astype(np.float32), off)]
            if modes[2]:
                col = a["colbert"]
                off = check_offsets(a["colbert_offsets"], col.shape[0], "colbert_offsets",
                                    allow_empty_segments=False)
                if off.shape[0] != n + 1 or col.dtype != np.dtype(index.colbert_dtype):
                    raise KernelInputError(f"{path}: colbert arrays do not describe {n} documents of "
                                           f"{index.colbert_dtype}.")
                index._col, index._col_len, index._col_offsets = [col], [np.diff(off)], off
                if index.colbert_dtype == "int8":
                    index._col_scales = [a["colbert_scales"].astype(np.float32)]
        except KeyError as e:
            raise KernelInputError(f"{path}: PackedIndex file lacks array {e}.") from None
        index._modes = modes  # type: ignore[assignment]
        index._n = n
        return index


def _combine(scores: dict[int, np.ndarray], w: Sequence[float]) -> np.ndarray:
    """sum_m w_m * s_m / sum_m w_m over the given modes (indices 0 dense, 1 sparse, 2 colbert)."""
    total = sum(w[i] for i in scores)
    out = np.zeros_like(next(iter(scores.values())), dtype=np.float64)
    for i, s in scores.items():
        out += w[i] * s.astype(np.float64)
    return (out / total).astype(np.float32)
