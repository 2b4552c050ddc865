"""bge_edge.kernels against naive Python loops (FlagEmbedding's per-pair formulas), plus bad input.

Property tests draw shapes and a seed with hypothesis and build the arrays from the seed, so examples
stay fast while still covering 1-token queries and documents, documents longer than a chunk, zero
vectors, duplicated rows (ties), float16 and int8 storage, many queries at once and candidate subsets.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from bge_edge.kernels import (
    MODES,
    KernelInputError,
    PackedIndex,
    colbert_score,
    combine_scores,
    lexical_matching_score,
    lexical_scores,
    maxsim,
    pack_lexical,
    quantize_int8,
    topk,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
FAST = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


# ---- naive references (Python loops, float64) ------------------------------------------------------

def naive_colbert(q: np.ndarray, p: np.ndarray) -> float:
    """FlagEmbedding colbert_score written as loops: sum_i max_j <q_i, p_j> / len(q)."""
    q64, p64 = q.astype(np.float64), p.astype(np.float64)
    return sum(max(float(np.dot(qi, pj)) for pj in p64) for qi in q64) / len(q64)


def naive_lexical(a: dict[str, float], b: dict[str, float]) -> float:
    """FlagEmbedding compute_lexical_matching_score, verbatim loop."""
    scores = 0.0
    for token, weight in a.items():
        if token in b:
            scores += weight * b[token]
    return scores


def random_docs(rng: np.random.Generator, lengths: list[int], h: int, zero_rows: bool = False,
                normalise: bool = False) -> list[np.ndarray]:
    docs = [rng.standard_normal((n, h)).astype(np.float32) for n in lengths]
    if normalise:
        docs = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in docs]
    if zero_rows:
        for d in docs[::2]:
            d[rng.integers(0, d.shape[0])] = 0.0  # zero vectors score exactly 0 against anything
    if len(docs) > 2:
        docs[1] = docs[0].copy()  # an exact duplicate document: a tie
    return docs


def pack(docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(docs) + 1, np.int64)
    np.cumsum([d.shape[0] for d in docs], out=offsets[1:])
    return np.concatenate(docs), offsets


shapes = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1),
    "h": st.sampled_from([1, 3, 8, 17, 64]),
    "q_lens": st.lists(st.integers(1, 9), min_size=1, max_size=4),
    "doc_lens": st.lists(st.sampled_from([1, 1, 2, 3, 5, 8, 13, 40]), min_size=1, max_size=12),
    "chunk": st.sampled_from([None, 1, 2, 3, 7, 16, 1000]),
    "zero_rows": st.booleans(),
})


# ---- colbert_score / maxsim ------------------------------------------------------------------------

@FAST
@given(shapes)
def test_colbert_score_matches_naive_loop(s: dict[str, Any]) -> None:
    rng = np.random.default_rng(s["seed"])
    q = rng.standard_normal((s["q_lens"][0], s["h"])).astype(np.float32)
    p = random_docs(rng, s["doc_lens"][:1], s["h"], s["zero_rows"])[0]
    assert math.isclose(colbert_score(q, p), naive_colbert(q, p), rel_tol=1e-5, abs_tol=1e-4)


@FAST
@given(shapes, st.sampled_from(["2d", "3d", "list"]), st.booleans(), st.booleans())
def test_maxsim_matches_naive_loop(s: dict[str, Any], layout: str, check: bool, subset: bool) -> None:
    rng = np.random.default_rng(s["seed"])
    h = s["h"]
    docs = random_docs(rng, s["doc_lens"], h, s["zero_rows"])
    vectors, offsets = pack(docs)
    if layout == "2d":
        queries = [rng.standard_normal((s["q_lens"][0], h)).astype(np.float32)]
        query: Any = queries[0]
    elif layout == "3d":
        query = rng.standard_normal((len(s["q_lens"]), s["q_lens"][0], h)).astype(np.float32)
        queries = list(query)
    else:
        queries = [rng.standard_normal((n, h)).astype(np.float32) for n in s["q_lens"]]
        query = queries
    cand = rng.permutation(len(docs))[: max(1, len(docs) // 2)] if subset else None
    got = maxsim(query, vectors, offsets, chunk_tokens=s["chunk"], check_finite=check, candidates=cand)
    picked = [docs[i] for i in cand] if cand is not None else docs
    want = np.array([[naive_colbert(q, d) for d in picked] for q in queries])
    assert got.dtype == np.float32
    assert got.shape == (want.shape[1],) if layout == "2d" else got.shape == want.shape
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-4)


@FAST
@given(shapes)
def test_maxsim_float16_storage_is_within_1e3_of_float32(s: dict[str, Any]) -> None:
    rng = np.random.default_rng(s["seed"])
    docs = random_docs(rng, s["doc_lens"], s["h"], s["zero_rows"], normalise=True)
    vectors, offsets = pack(docs)
    q = rng.standard_normal((s["q_lens"][0], s["h"])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    full = maxsim(q, vectors, offsets, chunk_tokens=s["chunk"])
    half = maxsim(q, vectors.astype(np.float16), offsets, chunk_tokens=s["chunk"])
    assert np.abs(half - full).max() <= 1e-3
    np.testing.assert_allclose(full, [naive_colbert(q, d) for d in docs], rtol=1e-5, atol=1e-5)


@FAST
@given(shapes)
def test_maxsim_int8_storage_error_is_within_its_quantisation_bound(s: dict[str, Any]) -> None:
    rng = np.random.default_rng(s["seed"])
    docs = random_docs(rng, s["doc_lens"], s["h"], s["zero_rows"], normalise=True)
    vectors, offsets = pack(docs)
    q = rng.standard_normal((s["q_lens"][0], s["h"])).astype(np.float32)
    codes, scales = quantize_int8(vectors)
    got = maxsim(q, codes, offsets, doc_scales=scales, chunk_tokens=s["chunk"])
    # each stored value moves by <= scale/2, so each dot product by <= ||q_i||_1 * max(scale) / 2
    bound = float(np.abs(q).sum(axis=1).max() * scales.max() / 2) + 1e-5
    assert np.abs(got - [naive_colbert(q, d) for d in docs]).max() <= bound


def test_maxsim_one_token_query_and_one_token_documents_are_plain_dot_products() -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 16)).astype(np.float32)
    d = rng.standard_normal((5, 16)).astype(np.float32)
    got = maxsim(q, d, np.arange(6))
    np.testing.assert_allclose(got, d @ q[0], rtol=1e-6)


def test_maxsim_document_longer_than_a_chunk_takes_the_max_across_pieces() -> None:
    rng = np.random.default_rng(1)
    docs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (50, 1, 23, 2)]
    vectors, offsets = pack(docs)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    want = [naive_colbert(q, d) for d in docs]
    for chunk in (1, 4, 22, 23, 24, 49, 50, 51):
        for dtype in (np.float32, np.float16):
            got = maxsim(q, vectors.astype(dtype), offsets, chunk_tokens=chunk)
            np.testing.assert_allclose(got, want, rtol=1e-2 if dtype == np.float16 else 1e-5, atol=1e-2)


def test_maxsim_zero_vectors_score_zero() -> None:
    q = np.zeros((3, 8), np.float32)
    d = np.random.default_rng(2).standard_normal((10, 8)).astype(np.float32)
    assert np.array_equal(maxsim(q, d, np.array([0, 4, 10])), np.zeros(2, np.float32))
    assert np.array_equal(maxsim(d[:3], np.zeros((4, 8), np.float32), np.array([0, 1, 4])), np.zeros(2))


def test_maxsim_many_queries_at_once_equal_one_at_a_time() -> None:
    rng = np.random.default_rng(3)
    vectors, offsets = pack([rng.standard_normal((n, 32)).astype(np.float32) for n in rng.integers(1, 30, 50)])
    queries = rng.standard_normal((16, 6, 32)).astype(np.float32)
    batched = maxsim(queries, vectors, offsets, chunk_tokens=64)
    single = np.stack([maxsim(q, vectors, offsets) for q in queries])
    np.testing.assert_allclose(batched, single, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("check", [True, False])
def test_maxsim_candidates_spanning_several_staging_blocks_match_naive_loop(dtype: str, check: bool) -> None:
    rng = np.random.default_rng(4)
    docs = random_docs(rng, [int(n) for n in rng.integers(1, 60, 40)], 512, normalise=True)
    vectors, offsets = pack(docs)
    q = rng.standard_normal((3, 512)).astype(np.float32)
    cand = rng.permutation(40)[:30]
    stored: dict[str, Any] = {"float32": {"doc_vectors": vectors},
                              "float16": {"doc_vectors": vectors.astype(np.float16)}}
    if dtype == "int8":
        codes, scales = quantize_int8(vectors)
        stored["int8"] = {"doc_vectors": codes, "doc_scales": scales}
    got = maxsim(q, doc_offsets=offsets, candidates=cand, check_finite=check, **stored[dtype])
    want = [naive_colbert(q, docs[i]) for i in cand]
    np.testing.assert_allclose(got, want, atol={"float32": 1e-5, "float16": 1e-3, "int8": 5e-2}[dtype])


def test_maxsim_with_no_documents_gives_empty_scores() -> None:
    q = np.ones((2, 4), np.float32)
    assert maxsim(q, np.empty((0, 4), np.float32), np.array([0])).shape == (0,)
    assert maxsim(np.ones((3, 2, 4), np.float32), np.empty((0, 4), np.float32), np.array([0])).shape == (3, 0)
    assert maxsim(q, np.ones((3, 4), np.float32), np.array([0, 3]), candidates=np.array([], np.int64)).shape == (0,)


# ---- topk -----------------------------------------------------------------------------------------

@FAST
@given(st.lists(st.integers(-3, 3), max_size=40), st.integers(0, 45))
def test_topk_matches_a_stable_sort_with_lower_index_first_on_ties(values: list[int], k: int) -> None:
    s = np.array(values, np.float32)
    idx, val = topk(s, k)
    want = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
    assert idx.tolist() == want
    assert val.tolist() == [values[i] for i in want]
    assert idx.dtype == np.int64


def test_topk_on_rows_of_many_queries() -> None:
    s = np.array([[1.0, 5.0, 5.0, 0.0], [2.0, 2.0, 2.0, 9.0]], np.float32)
    idx, val = topk(s, 3)
    assert idx.tolist() == [[1, 2, 0], [3, 0, 1]]
    assert val.tolist() == [[5.0, 5.0, 1.0], [9.0, 2.0, 2.0]]
    assert topk(s, 10)[0].shape == (2, 4)


# ---- lexical --------------------------------------------------------------------------------------

weight_dicts = st.dictionaries(st.integers(0, 60).map(str), st.floats(0.0, 3.0, width=32), max_size=15)


@FAST
@given(weight_dicts, weight_dicts)
def test_lexical_matching_score_matches_flagembedding_loop(a: dict[str, float], b: dict[str, float]) -> None:
    assert math.isclose(lexical_matching_score(a, b), naive_lexical(a, b), rel_tol=1e-9, abs_tol=1e-12)
    assert lexical_matching_score(a, {}) == 0.0


@FAST
@given(st.lists(weight_dicts, min_size=1, max_size=3), st.lists(weight_dicts, max_size=20))
def test_lexical_scores_batched_equal_per_pair_dicts(queries: list[dict[str, float]],
                                                     docs: list[dict[str, float]]) -> None:
    packed = pack_lexical(docs)
    many = lexical_scores(queries, *packed)
    assert many.shape == (len(queries), len(docs)) and many.dtype == np.float32
    for r, q in enumerate(queries):
        want = [naive_lexical(q, d) for d in docs]
        np.testing.assert_allclose(lexical_scores(q, packed.ids, packed.weights, packed.offsets), want,
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(many[r], want, rtol=1e-6, atol=1e-6)


def test_pack_lexical_layout_is_sorted_ids_weights_and_offsets() -> None:
    ids, w, off = pack_lexical([{"7": 0.5, "2": 0.25}, {}, {"3": 1.0}])
    assert ids.tolist() == [2, 7, 3] and w.tolist() == [0.25, 0.5, 1.0] and off.tolist() == [0, 2, 2, 3]
    assert ids.dtype == np.int64 and w.dtype == np.float32 and off.dtype == np.int64


# ---- hybrid ---------------------------------------------------------------------------------------

def test_combine_scores_gives_flagembedding_keys_and_weighted_averages() -> None:
    dense, sparse, colbert = np.array([0.8, 0.1]), np.array([0.2, 0.0]), np.array([0.6, 0.4])
    got = combine_scores(dense, sparse, colbert, weights=[0.4, 0.2, 0.4])
    assert tuple(got) == MODES == ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")
    np.testing.assert_allclose(got["sparse+dense"], (0.2 * sparse + 0.4 * dense) / 0.6, rtol=1e-6)
    np.testing.assert_allclose(got["colbert+sparse+dense"], 0.4 * colbert + 0.2 * sparse + 0.4 * dense, rtol=1e-6)
    default = combine_scores(dense, sparse, colbert)
    np.testing.assert_allclose(default["colbert+sparse+dense"], (dense + sparse + colbert) / 3, rtol=1e-6)
    np.testing.assert_allclose(default["dense"], dense, rtol=1e-7)
    assert all(v.dtype == np.float32 for v in got.values())


@pytest.mark.parametrize("weights, message", [
    ([1, 1], "three finite numbers"),
    ([1, -1, 1], ">= 0"),
    ([1, float("nan"), 1], "finite"),
    ([0, 0, 0], "not all zero"),
    ([0, 0, 1], "w_dense \\+ w_sparse must be > 0"),
    ("abc", "three numbers"),
])
def test_combine_scores_rejects_bad_weights(weights: Any, message: str) -> None:
    with pytest.raises(KernelInputError, match=message):
        combine_scores([1.0], [1.0], [1.0], weights=weights)


# ---- PackedIndex ------------------------------------------------------------------------------------

def encoded_corpus(seed: int, n: int, h: int = 16) -> dict[str, Any]:
    """Fake encode() output: normalised dense, sparse dicts (some empty), normalised ColBERT vectors."""
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((n, h)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    lex = [{str(t): float(rng.uniform(0.01, 0.5)) for t in rng.choice(40, rng.integers(0, 8), replace=False)}
           for _ in range(n)]
    col = []
    for length in rng.integers(1, 20, n):
        c = rng.standard_normal((length, h)).astype(np.float32)
        col.append(c / np.linalg.norm(c, axis=1, keepdims=True))
    return {"dense_vecs": dense, "lexical_weights": lex, "colbert_vecs": col}


def brute_force(corpus: dict[str, Any], q: dict[str, Any], w: tuple[float, float, float]) -> np.ndarray:
    d = np.array([float(q["dense_vecs"][0] @ x) for x in corpus["dense_vecs"]])
    s = np.array([naive_lexical(q["lexical_weights"][0], x) for x in corpus["lexical_weights"]])
    c = np.array([naive_colbert(q["colbert_vecs"][0], x) for x in corpus["colbert_vecs"]])
    return (w[0] * d + w[1] * s + w[2] * c) / sum(w)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_packed_index_exhaustive_search_matches_brute_force(dtype: str) -> None:
    corpus, query = encoded_corpus(0, 60), encoded_corpus(1, 1)
    index = PackedIndex(colbert_dtype=dtype)
    index.add(**{k: v[:25] for k, v in corpus.items()})
    index.add(**{k: v[25:] for k, v in corpus.items()})
    assert len(index) == 60 and index.modes == ("dense", "sparse", "colbert")
    w = (0.4, 0.2, 0.4)
    idx, val = index.search(query["dense_vecs"][0], query["lexical_weights"][0], query["colbert_vecs"][0],
                            k=10, weights=w)
    want = brute_force(corpus, query, w)
    tol = {"float32": 1e-5, "float16": 1e-3, "int8": 2e-2}[dtype]
    np.testing.assert_allclose(val, want[idx], atol=tol)
    if dtype == "float32":
        assert idx.tolist() == sorted(range(60), key=lambda i: (-want[i], i))[:10]


@pytest.mark.parametrize("weights", [(1, 1, 1), (0.4, 0.2, 0.4), (1, 0, 1), (0, 1, 1), (0, 0, 1), (1, 1, 0)])
def test_packed_index_two_stage_equals_exhaustive_when_candidates_cover_all_documents(weights: Any) -> None:
    corpus, query = encoded_corpus(2, 40), encoded_corpus(3, 1)
    index = PackedIndex()
    index.add(**corpus)
    args = (query["dense_vecs"][0], query["lexical_weights"][0], query["colbert_vecs"][0])
    full = index.search(*args, k=7, weights=weights)
    for c in (40, 41, 1000):
        two = index.search(*args, k=7, weights=weights, candidates=c)
        assert two[0].tolist() == full[0].tolist() and np.array_equal(two[1], full[1])


def test_packed_index_two_stage_reranks_the_first_stage_candidates_with_maxsim() -> None:
    corpus, query = encoded_corpus(4, 50), encoded_corpus(5, 1)
    index = PackedIndex()
    index.add(**corpus)
    qd, qs, qc = query["dense_vecs"][0], query["lexical_weights"][0], query["colbert_vecs"][0]
    idx, val = index.search(qd, qs, qc, k=5, weights=(1, 1, 1), candidates=12)
    first = (corpus["dense_vecs"] @ qd + lexical_scores(qs, *pack_lexical(corpus["lexical_weights"]))) / 2
    cand = set(topk(first, 12)[0].tolist())
    assert set(idx.tolist()) <= cand
    want = brute_force(corpus, query, (1, 1, 1))
    best = sorted(cand, key=lambda i: (-want[i], i))[:5]
    assert idx.tolist() == best
    np.testing.assert_allclose(val, want[idx], atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_packed_index_save_load_round_trip_without_pickle(tmp_path: Path, dtype: str) -> None:
    corpus, query = encoded_corpus(6, 30), encoded_corpus(7, 1)
    index = PackedIndex(colbert_dtype=dtype)
    index.add(**corpus)
    path = tmp_path / "index.npz"
    index.save(path)
    with np.load(path, allow_pickle=False) as z:  # would raise on any object array
        assert all(z[k].dtype != object for k in z.files)
    back = PackedIndex.load(path)
    assert len(back) == 30 and back.modes == index.modes and back.colbert_dtype == dtype
    args = (query["dense_vecs"][0], query["lexical_weights"][0], query["colbert_vecs"][0])
    for c in (None, 10):
        a, b = index.search(*args, k=8, candidates=c), back.search(*args, k=8, candidates=c)
        assert a[0].tolist() == b[0].tolist() and np.array_equal(a[1], b[1])
    back.add(**encoded_corpus(8, 3))  # a loaded index keeps accepting documents
    assert len(back) == 33


def test_packed_index_with_some_modes_only_and_empty_index() -> None:
    empty = PackedIndex()
    idx, val = empty.search(query_dense=np.ones(4, np.float32))
    assert idx.shape == (0,) and val.shape == (0,) and idx.dtype == np.int64
    corpus = encoded_corpus(9, 20)
    dense_only = PackedIndex()
    dense_only.add(dense_vecs=corpus["dense_vecs"])
    q = corpus["dense_vecs"][3]
    assert dense_only.search(query_dense=q, k=1)[0].tolist() == [3]
    col_only = PackedIndex(colbert_dtype="float16")
    col_only.add(colbert_vecs=corpus["colbert_vecs"])
    idx, _ = col_only.search(query_colbert=corpus["colbert_vecs"][5], k=3)
    assert idx[0] == 5


def test_packed_index_save_load_of_an_empty_index(tmp_path: Path) -> None:
    PackedIndex().save(tmp_path / "e.npz")
    back = PackedIndex.load(tmp_path / "e.npz")
    assert len(back) == 0 and back.search(query_dense=np.ones(3, np.float32))[0].shape == (0,)


# ---- bad input: always KernelInputError, with a message that says what to do ------------------------

V = np.ones((6, 4), np.float32)
OFF = np.array([0, 2, 6])
Q = np.ones((3, 4), np.float32)
NAN_Q = Q.copy()
NAN_Q[1, 2] = np.nan
INF_V = V.copy()
INF_V[4, 1] = np.inf
NAN_V16 = V.astype(np.float16)
NAN_V16[0, 0] = np.nan


def _index() -> PackedIndex:
    index = PackedIndex()
    index.add(**encoded_corpus(10, 5, h=4))
    return index


BAD: list[tuple[str, Callable[[], Any], str]] = [
    ("dimension mismatch", lambda: maxsim(np.ones((3, 5), np.float32), V, OFF), "hidden size 5 != .* 4"),
    ("empty query", lambda: maxsim(np.ones((0, 4), np.float32), V, OFF), "query is empty"),
    ("empty 3-D query", lambda: maxsim(np.ones((0, 2, 4), np.float32), V, OFF), "query is empty"),
    ("empty query list", lambda: maxsim([], V, OFF), "empty list"),
    ("NaN in query", lambda: maxsim(NAN_Q, V, OFF), "NaN/inf"),
    ("inf in documents", lambda: maxsim(Q, INF_V, OFF), "row 4 holds NaN/inf"),
    ("inf in documents, tiny chunks", lambda: maxsim(Q, INF_V, OFF, chunk_tokens=1), "row 4 holds NaN/inf"),
    ("NaN in float16 documents", lambda: maxsim(Q, NAN_V16, OFF), "row 0 holds NaN/inf"),
    ("inf in candidate documents", lambda: maxsim(Q, INF_V, OFF, candidates=np.array([1])), "row 4"),
    ("offsets end short", lambda: maxsim(Q, V, np.array([0, 2, 5])), "end at the number of rows \\(6\\)"),
    ("offsets not from 0", lambda: maxsim(Q, V, np.array([1, 2, 6])), "must start at 0"),
    ("empty document", lambda: maxsim(Q, V, np.array([0, 2, 2, 6])), "strictly increasing"),
    ("float offsets", lambda: maxsim(Q, V, OFF.astype(float)), "integer array"),
    ("float64 documents", lambda: maxsim(Q, V.astype(np.float64), OFF), "astype\\(np.float32\\)"),
    ("1-D documents", lambda: maxsim(Q, V.ravel(), OFF), "2-D"),
    ("integer query", lambda: maxsim(np.ones((3, 4), np.int64), V, OFF), "not token ids"),
    ("4-D query", lambda: maxsim(np.ones((1, 1, 3, 4), np.float32), V, OFF), "must be \\(q_tokens, H\\)"),
    ("int8 without scales", lambda: maxsim(Q, V.astype(np.int8), OFF), "need doc_scales"),
    ("scales for float32", lambda: maxsim(Q, V, OFF, doc_scales=np.ones(6, np.float32)), "only for int8"),
    ("candidate out of range", lambda: maxsim(Q, V, OFF, candidates=np.array([2])), "in \\[0, 2\\)"),
    ("bad chunk size", lambda: maxsim(Q, V, OFF, chunk_tokens=0), "positive int"),
    ("colbert_score mismatch", lambda: colbert_score(Q, np.ones((2, 3), np.float32)), "same hidden size"),
    ("colbert_score empty passage", lambda: colbert_score(Q, np.ones((0, 4), np.float32)), "p is empty"),
    ("topk NaN", lambda: topk(np.array([1.0, np.nan]), 1), "NaN"),
    ("topk negative k", lambda: topk(np.array([1.0]), -1), "non-negative int"),
    ("lexical non-dict", lambda: lexical_matching_score([("1", 1.0)], {}), "dicts"),  # type: ignore[arg-type]
    ("lexical NaN", lambda: lexical_matching_score({"1": float("nan")}, {"1": 1.0}), "NaN/inf"),
    ("lexical int keys", lambda: pack_lexical([{1: 0.5}]), "decimal strings"),  # type: ignore[dict-item]
    ("lexical NaN weight", lambda: pack_lexical([{"1": 0.5}, {"2": float("inf")}]), "weights\\[1\\]"),
    ("lexical single dict", lambda: pack_lexical({"1": 0.5}), "list of weight dicts"),  # type: ignore[arg-type]
    ("lexical offsets", lambda: lexical_scores({"1": 1.0}, np.array([1, 2]), np.ones(2), np.array([0, 1])),
     "end at the number of rows \\(2\\)"),
    ("lexical weights shape", lambda: lexical_scores({"1": 1.0}, np.array([1, 2]), np.ones(3), np.array([0, 2])),
     "shaped like doc_ids"),
    ("lexical NaN doc weight", lambda: lexical_scores({"1": 1.0}, np.array([1]), np.array([np.nan]),
                                                      np.array([0, 1])), "doc_weights entry 0"),
    ("combine shape mismatch", lambda: combine_scores([1.0, 2.0], [1.0], [1.0]), "same shape"),
    ("combine NaN", lambda: combine_scores([np.nan], [1.0], [1.0]), "dense scores hold NaN"),
    ("index mixed modes", lambda: _index().add(dense_vecs=np.ones((2, 4), np.float32)), "exactly those"),
    ("index count mismatch", lambda: PackedIndex().add(dense_vecs=np.ones((2, 4), np.float32),
                                                       lexical_weights=[{}]), "one entry per document"),
    ("index NaN colbert", lambda: PackedIndex().add(colbert_vecs=[np.ones((2, 4)), np.full((1, 4), np.nan)]),
     "colbert_vecs\\[1\\] holds NaN/inf"),
    ("index empty colbert doc", lambda: PackedIndex().add(colbert_vecs=[np.ones((0, 4))]), "is empty"),
    ("index float16 overflow", lambda: PackedIndex("float16").add(colbert_vecs=[np.full((1, 4), 1e6)]),
     "beyond float16"),
    ("index bad dtype", lambda: PackedIndex("bfloat16"), "colbert_dtype must be one of"),
    ("index query dim", lambda: _index().search(query_dense=np.ones(5, np.float32)), "shape \\(4,\\)"),
    ("index query colbert dim", lambda: _index().search(query_colbert=np.ones((2, 5), np.float32)),
     "hidden size 5 != this index's 4"),
    ("index nothing to score", lambda: _index().search(query_dense=np.ones(4, np.float32), weights=(0, 1, 1)),
     "nothing to score"),
    ("index two-stage without first stage", lambda: _index().search(query_colbert=np.ones((2, 4), np.float32),
                                                                    candidates=2), "two-stage"),
    ("index no query", lambda: _index().search(), "at least one of"),
    ("index bad candidates", lambda: _index().search(query_dense=np.ones(4, np.float32), candidates=0),
     "positive int"),
]


@pytest.mark.parametrize("call, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_kernel_input_error_with_a_helpful_message(call: Callable[[], Any], message: str) -> None:
    with pytest.raises(KernelInputError, match=message):
        call()


def test_bad_index_file_raises_kernel_input_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", a=np.ones(3))
    with pytest.raises(KernelInputError, match="not a PackedIndex file"):
        PackedIndex.load(tmp_path / "x.npz")


def test_kernel_input_error_is_a_value_error() -> None:
    assert issubclass(KernelInputError, ValueError)


# ---- import closure ---------------------------------------------------------------------------------

def test_kernels_import_numpy_and_the_standard_library_only() -> None:
    allowed = {"__future__", "collections", "typing", "math", "os", "pathlib", "numpy"}
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert {n.split(".")[0] for n in names} <= allowed, f"{path.name} imports {names}"
    code = ("import sys, bge_edge.kernels; heavy = {'torch', 'scipy', 'numba', 'onnxruntime', 'tokenizers'}; "
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
