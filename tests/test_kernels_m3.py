"""Agreement on the tiny M3 fixture: the batched kernels and the packed index equal FlagEmbedding's per-pair
``compute_score`` math on real (random-weight) BGE-M3 outputs from the PyTorch reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from bge_edge.kernels import (
    PackedIndex,
    colbert_score,
    combine_scores,
    lexical_matching_score,
    lexical_scores,
    maxsim,
    pack_lexical,
)

QUERIES = ["what is bge", "模型", "", "repeat repeat"]
PASSAGES = ["the model encodes every passage", "模型将每个段落编码", "hello", "", "repeat repeat repeat",
            "Emoji 🙂🚀 and dense sparse multi vector representations"]


def flagembedding_compute_score(q: dict[str, Any], p: dict[str, Any], w: list[float]) -> dict[str, float]:
    """BGEM3FlagModel.compute_score for one pair, its formulas transcribed (torch-free)."""
    dense = float(q["dense"] @ p["dense"])
    sparse = 0.0
    for token, weight in q["sparse"].items():
        if token in p["sparse"]:
            sparse += weight * p["sparse"][token]
    token_scores = q["colbert"] @ p["colbert"].T
    colbert = float(token_scores.max(-1).sum() / q["colbert"].shape[0])
    return {"dense": dense, "sparse": float(sparse), "colbert": colbert,
            "sparse+dense": (sparse * w[1] + dense * w[0]) / (w[1] + w[0]),
            "colbert+sparse+dense": (colbert * w[2] + sparse * w[1] + dense * w[0]) / sum(w)}


@pytest.fixture(scope="module")
def encoded(m3_reference: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return [m3_reference.encode_one(t) for t in QUERIES], [m3_reference.encode_one(t) for t in PASSAGES]


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.4, 0.2, 0.4]])
def test_hybrid_scores_equal_flagembedding_compute_score_on_tiny_m3(encoded: Any, weights: list[float]) -> None:
    queries, passages = encoded
    for q in queries:
        want = [flagembedding_compute_score(q, p, weights) for p in passages]
        dense = np.array([float(q["dense"] @ p["dense"]) for p in passages])
        sparse = np.array([lexical_matching_score(q["sparse"], p["sparse"]) for p in passages])
        col = np.array([colbert_score(q["colbert"], p["colbert"]) for p in passages])
        got = combine_scores(dense, sparse, col, weights=weights)
        for key in want[0]:
            np.testing.assert_allclose(got[key], [w[key] for w in want], atol=1e-5, err_msg=key)


def test_batched_kernels_equal_per_pair_scores_on_tiny_m3(encoded: Any) -> None:
    queries, passages = encoded
    cols = [p["colbert"] for p in passages]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in cols])])
    packed = pack_lexical([p["sparse"] for p in passages])
    many = maxsim([q["colbert"] for q in queries], np.concatenate(cols), offsets)
    for r, q in enumerate(queries):
        np.testing.assert_allclose(many[r], [colbert_score(q["colbert"], c) for c in cols], atol=1e-6)
        np.testing.assert_allclose(lexical_scores(q["sparse"], *packed),
                                   [lexical_matching_score(q["sparse"], p["sparse"]) for p in passages], atol=1e-6)


def test_packed_index_ranks_tiny_m3_passages_like_compute_score(encoded: Any) -> None:
    queries, passages = encoded
    index = PackedIndex()
    index.add(dense_vecs=np.stack([p["dense"] for p in passages]), lexical_weights=[p["sparse"] for p in passages],
              colbert_vecs=[p["colbert"] for p in passages])
    w = [0.4, 0.2, 0.4]
    for q in queries:
        want = np.array([flagembedding_compute_score(q, p, w)["colbert+sparse+dense"] for p in passages])
        idx, val = index.search(q["dense"], q["sparse"], q["colbert"], k=len(passages), weights=w)
        np.testing.assert_allclose(val, want[idx], atol=1e-5)
        assert np.all(np.diff(val) <= 0)
