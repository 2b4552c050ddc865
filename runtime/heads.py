"""Post-processing of the graph outputs into FlagEmbedding's output values: one pure function per head.

The graph already computes each head's math (see bge_edge.export.graph); what is left per text is
what FlagEmbedding does in numpy after the forward pass:
  dense    FlagEmbedding BGEM3FlagModel.encode: dense_vecs rows as they are (normalised in the graph)
  sparse   _process_token_weights: per token id keep the max weight, drop cls/eos/pad/unk and w <= 0
  colbert  _process_colbert_vecs: the first (n_tokens - 1) rows (CLS dropped, </s> kept)
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["lexical_weights", "colbert_rows"]


def lexical_weights(ids: np.ndarray, weights: np.ndarray, unused: Iterable[int]) -> dict[str, np.float32]:
    """{token id as str: max weight} over a text's tokens, dropping ``unused`` ids and weights <= 0.

    Keys appear in order of first occurrence, as in FlagEmbedding.
    """
    ids = np.asarray(ids, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float32)
    keep = (w > 0) & ~np.isin(ids, np.fromiter(unused, dtype=np.int64))
    ids, w = ids[keep], w[keep]
    if ids.size == 0:
        return {}
    order = np.argsort(ids, kind="stable")
    ids_sorted, w_sorted = ids[order], w[order]
    starts = np.flatnonzero(np.r_[True, ids_sorted[1:] != ids_sorted[:-1]])
    best = np.maximum.reduceat(w_sorted, starts)
    first_seen = order[starts]  # stable sort: position of each id's first occurrence
    by_first = np.argsort(first_seen, kind="stable")
    keys = ids_sorted[starts][by_first].tolist()
    vals = best[by_first]
    return {str(k): vals[i] for i, k in enumerate(keys)}


def colbert_rows(colbert: np.ndarray, n_tokens: int) -> np.ndarray:
    """The text's ColBERT vectors: rows 0 .. n_tokens-2 of the graph output (which starts at token 1)."""
    return np.ascontiguousarray(colbert[: n_tokens - 1], dtype=np.float32)
