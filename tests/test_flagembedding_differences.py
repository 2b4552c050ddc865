"""Each line of README's "Differences from FlagEmbedding" table, proven: what bge-edge does by default, and how code
written for FlagEmbedding's BGEM3FlagModel / FlagModel gets the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bge_edge.runtime import Embedder
from bge_edge.runtime.batching import MAX_BATCH_TOKENS
from bge_edge.runtime.errors import BackendError, InputError

LONG = " ".join(["science protein cell gene study results patients effect treatment data"] * 80)


@pytest.fixture(scope="module")
def m3(m3_artifact: Path) -> Embedder:
    return Embedder(m3_artifact, precision="fp32", hash_cache=False)


@pytest.fixture(scope="module")
def m3_flag_lengths(m3_artifact: Path) -> Embedder:
    """Constructed as FlagEmbedding's defaults: query_max_length=512, passage_max_length=512."""
    return Embedder(m3_artifact, precision="fp32", hash_cache=False, query_max_length=512, passage_max_length=512)


def test_default_max_length_is_the_models_own(m3: Embedder) -> None:
    assert m3.max_length == m3.query_max_length == m3.passage_max_length == 8192
    m3.encode(LONG)
    assert m3.last_stats.tokens > 512 and m3.last_stats.truncated == 0


def test_flagembedding_lengths_are_constructor_arguments_and_give_its_numbers(m3: Embedder,
                                                                              m3_flag_lengths: Embedder) -> None:
    got = m3_flag_lengths.encode([LONG, "short"], return_sparse=True, return_colbert_vecs=True)
    assert m3_flag_lengths.last_stats.truncated == 1
    want = m3.encode([LONG, "short"], max_length=512, return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_array_equal(got["dense_vecs"], want["dense_vecs"])
    assert got["colbert_vecs"][0].shape == (511, m3.manifest.hidden_size)
    m3_flag_lengths.encode_corpus(LONG)
    assert m3_flag_lengths.last_stats.truncated == 1
    # encode_queries reads query_max_length, encode/encode_corpus passage_max_length
    q = Embedder(m3.root, precision="fp32", hash_cache=False, query_max_length=16)
    q.encode_queries(LONG)
    assert q.last_stats.tokens == 16
    q.encode(LONG)
    assert q.last_stats.truncated == 0
    # compute_score defaults to the constructor's lengths, as FlagEmbedding's does
    pairs = [(LONG, LONG), ("what is bge", "BGE is an embedding model")]
    assert m3_flag_lengths.compute_score(pairs) == m3.compute_score(pairs, max_query_length=512,
                                                                    max_passage_length=512)
    assert m3.compute_score(pairs) != m3_flag_lengths.compute_score(pairs)


def test_bad_length_arguments_are_input_errors(m3_artifact: Path, m3: Embedder) -> None:
    for bad in (0, 1, "512", 5.0, True):
        with pytest.raises(InputError, match="passage_max_length must be an integer >= 2"):
            Embedder(m3_artifact, precision="fp32", hash_cache=False, passage_max_length=bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="max_query_length must be an integer >= 2"):
        m3.compute_score(("a", "b"), max_query_length=0)


def test_precision_default_is_int8_on_the_cpu_and_fp32_is_use_fp16_false(m3_artifact: Path) -> None:
    assert Embedder(m3_artifact, hash_cache=False).precision == "int8"
    assert Embedder(m3_artifact, precision="fp32", hash_cache=False).graph.precision == "fp32"


def test_outputs_are_float32_and_dense_is_normalised_at_every_precision(m3_artifact: Path) -> None:
    for precision in ("fp32", "int8", "fp16"):
        out = Embedder(m3_artifact, precision=precision, hash_cache=False).encode(
            ["hello world", "模型"], return_sparse=True, return_colbert_vecs=True)
        assert out["dense_vecs"].dtype == np.float32 and all(c.dtype == np.float32 for c in out["colbert_vecs"])
        tol = 1e-3 if precision == "fp16" else 1e-5  # the fp16 graph normalises in fp16 (norm 1.00006)
        np.testing.assert_allclose(np.linalg.norm(out["dense_vecs"], axis=1), 1.0, atol=tol)
        assert all(isinstance(w, np.float32) for d in out["lexical_weights"] for w in d.values())


def test_one_device_per_embedder(m3_artifact: Path) -> None:
    with pytest.raises(BackendError, match="one Embedder per device"):
        Embedder(m3_artifact, device=["cuda:0", "cuda:1"], hash_cache=False)  # type: ignore[arg-type]


def test_batches_are_bounded_by_padded_tokens_not_only_by_count(m3: Embedder) -> None:
    texts = [" ".join(["protein"] * (300 + k)) for k in range(60)]
    m3.encode(texts, batch_size=256)  # FlagEmbedding: one batch of 60 x ~300 tokens
    assert m3.last_stats.batches > 1
    assert all(b * length <= MAX_BATCH_TOKENS for b, length in m3.last_stats.batch_shapes)


def test_convert_id_to_token_gives_vocabulary_tokens_and_keeps_lists_lists(m3: Embedder) -> None:
    lex = m3.encode("hello world", return_sparse=True)["lexical_weights"]
    tokens = m3.convert_id_to_token([lex])
    assert isinstance(tokens, list) and len(tokens) == 1  # FlagEmbedding unwraps a list of one to a dict
    tok = m3._tokenizer
    assert set(tokens[0]) == {tok.id_to_token(int(k)) for k in lex}  # FlagEmbedding: tokenizer.decode([id])


def test_compute_score_of_no_pairs_gives_empty_lists(m3: Embedder) -> None:
    assert m3.compute_score([]) == {k: [] for k in ("dense", "sparse", "colbert", "sparse+dense",
                                                    "colbert+sparse+dense")}  # FlagEmbedding returns []


def test_query_instruction_comes_from_the_artifact_and_only_encode_queries_adds_it(bert_artifact: Path) -> None:
    m = Embedder(bert_artifact, precision="fp32", hash_cache=False)
    instr = m.manifest.query_instruction
    assert instr == "Represent this sentence for searching relevant passages: "  # bge-*-en-v1.5's
    np.testing.assert_array_equal(m.encode_queries("what is bge")["dense_vecs"],
                                  m.encode(instr + "what is bge")["dense_vecs"])
    score = m.compute_score(("what is bge", "BGE is an embedding model"))["dense"]
    plain = m.encode(["what is bge", "BGE is an embedding model"])["dense_vecs"]
    assert score == pytest.approx(float(plain[0] @ plain[1]), abs=1e-6)
