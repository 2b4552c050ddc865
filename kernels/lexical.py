"""Lexical (sparse) matching: one pair of weight dicts, and one query against many packed documents.

Formula (FlagEmbedding ``BGEM3FlagModel.compute_lexical_matching_score``):
    score(a, b) = sum over token ids t in both a and b of a[t] * b[t]   (0 when none is shared)
Keys are token ids written as decimal strings ("2054"), the way ``encode`` returns them. The packed
layout is CSR-like: token ids int64 (nnz,) sorted within each document, weights float32 (nnz,), and
offsets int64 (n_docs + 1,); a document without weights is an empty segment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Union

import numpy as np

from ._errors import KernelInputError, check_finite, check_offsets, describe

__all__ = ["PackedLexical", "lexical_matching_score", "lexical_scores", "pack_lexical"]

Weights = Mapping[str, float]


class PackedLexical(NamedTuple):
    """Many documents' lexical weights in three flat arrays (unpacks as ``ids, weights, offsets``)."""

    ids: np.ndarray  # int64 (nnz,), sorted and unique within each document
    weights: np.ndarray  # float32 (nnz,)
    offsets: np.ndarray  # int64 (n_docs + 1,), offsets[0] == 0, offsets[-1] == nnz


def lexical_matching_score(a: Weights, b: Weights) -> float:
    """Lexical score of one pair of {token id: weight} dicts, FlagEmbedding's formula (0.0 when none shared)."""
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        raise KernelInputError(f"lexical weights must be dicts {{token id as str: weight}}, got "
                               f"{type(a).__name__} and {type(b).__name__}.")
    if len(a) > len(b):  # iterate the smaller dict; the sum is symmetric
        a, b = b, a
    total = 0.0
    for t, w in a.items():
        v = b.get(t)
        if v is not None:
            total += float(w) * float(v)
    if not math.isfinite(total):
        raise KernelInputError("lexical weights hold NaN/inf for a shared token; weights must be finite. "
                               "Re-encode the texts.")
    return total


def _token_id(key: Any, where: str) -> int:
    if isinstance(key, str) and key.isdigit() and (key == "0" or not key.startswith("0")):
        return int(key)
    raise KernelInputError(f"{where}: lexical weight keys must be token ids written as decimal strings "
                           f"without leading zeros (e.g. '2054'), got {key!r}; pass encode()'s "
                           f"lexical_weights as they are.")


def _dict_arrays(d: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One weight dict as (sorted unique int64 ids, float32 weights)."""
    if not isinstance(d, Mapping):
        raise KernelInputError(f"{where} must be a dict {{token id as str: weight}}, got {type(d).__name__}.")
    ids = np.fromiter((_token_id(k, where) for k in d), np.int64, count=len(d))
    w = np.fromiter((float(v) for v in d.values()), np.float64, count=len(d)).astype(np.float32)
    order = np.argsort(ids, kind="stable")
    return ids[order], w[order]


def pack_lexical(weights: Sequence[Weights]) -> PackedLexical:
    """Pack a list of {token id: weight} dicts into flat (ids, weights, offsets) arrays for `lexical_scores`."""
    if isinstance(weights, Mapping) or not isinstance(weights, Sequence):
        raise KernelInputError(f"pack_lexical takes a list of weight dicts (one per document), got "
                               f"{type(weights).__name__}; wrap a single dict in a list.")
    offsets = np.zeros(len(weights) + 1, np.int64)
    parts_i: list[np.ndarray] = []
    parts_w: list[np.ndarray] = []
    for n, d in enumerate(weights):
        ids, w = _dict_arrays(d, f"weights[{n}]")
        parts_i.append(ids)
        parts_w.append(w)
        offsets[n + 1] = offsets[n] + ids.shape[0]
    ids = np.concatenate(parts_i) if parts_i else np.empty(0, np.int64)
    w = np.concatenate(parts_w) if parts_w else np.empty(0, np.float32)
    try:
        check_finite(w, "lexical weights")
    except KernelInputError:
        bad = int(np.searchsorted(offsets, int(np.argmax(~np.isfinite(w))), side="right")) - 1
        raise KernelInputError(f"weights[{bad}] holds a NaN/inf weight; weights must be finite. Re-encode "
                               f"that text.") from None
    return PackedLexical(ids, w, offsets)


def _check_packed(doc_ids: Any, doc_weights: Any, doc_offsets: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.asarray(doc_ids)
    w = np.asarray(doc_weights)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise KernelInputError(f"doc_ids must be a 1-D integer array of token ids (nnz,), got {describe(ids)}; "
                               f"build it with pack_lexical.")
    if w.shape != ids.shape or (w.size and w.dtype.kind != "f"):
        raise KernelInputError(f"doc_weights must be a float array shaped like doc_ids {ids.shape}, got "
                               f"{describe(w)}.")
    offsets = check_offsets(doc_offsets, ids.shape[0], "doc_offsets", allow_empty_segments=True)
    return ids.astype(np.int64, copy=False), w.astype(np.float32, copy=False), offsets


QueryWeights = Union[Weights, Sequence[Weights]]


def lexical_scores(query_weights: QueryWeights, doc_ids: np.ndarray, doc_weights: np.ndarray,
                   doc_offsets: np.ndarray, *, check_finite: bool = True) -> np.ndarray:
    """Lexical scores of one query dict (-> (n_docs,)) or a list of them (-> (n_queries, n_docs)) against packed docs.

    No Python loop per document: each stored token id is looked up in the query's sorted ids with
    ``np.searchsorted``, and the products of the hits are summed per document with ``np.bincount``.
    check_finite=False skips the NaN/inf scan of doc_weights (for data checked once already).
    """
    ids, w, offsets = _check_packed(doc_ids, doc_weights, doc_offsets)
    if check_finite:
        _finite_or_raise(w)
    single = isinstance(query_weights, Mapping)
    queries = [query_weights] if single else query_weights
    if not isinstance(queries, Sequence) or isinstance(queries, (str, bytes)):
        raise KernelInputError(f"query_weights must be a dict {{token id as str: weight}} or a list of them, "
                               f"got {type(query_weights).__name__}.")
    n_docs = offsets.shape[0] - 1
    out = np.zeros((len(queries), n_docs), np.float32)
    for r, qd in enumerate(queries):
        q_ids, q_w = _dict_arrays(qd, "query_weights" if single else f"query_weights[{r}]")
        if not np.isfinite(q_w).all():
            raise KernelInputError("query_weights hold NaN/inf; weights must be finite. Re-encode the query.")
        if q_ids.shape[0] == 0 or ids.shape[0] == 0:
            continue
        pos = np.searchsorted(q_ids, ids)  # (nnz,) where each stored id would sit among the query ids
        np.minimum(pos, q_ids.shape[0] - 1, out=pos)
        hit = np.flatnonzero(q_ids[pos] == ids)  # (hits,) stored entries whose id the query has
        doc = np.searchsorted(offsets, hit, side="right") - 1  # (hits,) document of each hit
        prod = w[hit].astype(np.float64) * q_w[pos[hit]]  # (hits,)
        out[r] = np.bincount(doc, weights=prod, minlength=n_docs)  # (hits,) -> (n_docs,) per-document sums
    return out[0] if single else out


def _finite_or_raise(w: np.ndarray) -> None:
    try:
        check_finite(w, "doc_weights")
    except KernelInputError:
        raise KernelInputError(f"doc_weights entry {int(np.argmax(~np.isfinite(w)))} is NaN/inf; weights must "
                               f"be finite. Re-pack the documents with pack_lexical (it rejects them).") from None
