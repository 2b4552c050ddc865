"""Embedded Qdrant (qdrant-client local mode, no server): the tiny M3 in all search modes with scores equal to
compute_score's, and real MiniLM on SciFact with the same dense top-10 as PackedIndex.search."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("qdrant_client")

from bge_edge.kernels import PackedIndex  # noqa: E402
from bge_edge.runtime import Embedder  # noqa: E402

from bge_edge.integrations.qdrant import QdrantIndex  # noqa: E402

DOCS = ["BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
        "BM25 is a bag-of-words retrieval function that ranks documents by query terms.",
        "Paris is the capital and most populous city of France.",
        "模型将每个段落编码为向量", "The quick brown fox jumps over the lazy dog.", "hello world"]
QUERIES = ["what is BGE M3?", "capital of France", "lexical matching", "向量"]


@pytest.fixture(scope="module")
def m3(m3_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    return Embedder(m3_artifact, precision="fp32", hash_cache=tmp_path_factory.mktemp("hc"))


def test_m3_all_modes_agree_with_compute_score(m3: Embedder, capsys: pytest.CaptureFixture[str]) -> None:
    index = QdrantIndex(m3)
    assert index.modes == ("dense", "sparse", "colbert", "hybrid", "rrf")
    ids = index.add(DOCS, payloads=[{"n": i} for i in range(len(DOCS))], batch_size=4)
    assert ids == list(range(len(DOCS))) and len(index) == len(DOCS)
    assert "bge-edge -> qdrant" in capsys.readouterr().err  # the progress bar
    for q in QUERIES:
        ref = m3.compute_score([(q, d) for d in DOCS])
        for mode in ("dense", "sparse", "colbert"):
            hits = index.search(q, limit=len(DOCS), mode=mode)
            got = {h.id: h.score for h in hits}
            want = {i: s for i, s in enumerate(ref[mode]) if mode != "sparse" or s > 0}  # sparse: matches only
            assert set(got) == set(want), (q, mode)
            for i, s in want.items():
                assert got[i] == pytest.approx(s, abs=1e-5), (q, mode, i)
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            assert all(h.text == DOCS[h.id] and h.payload["n"] == h.id for h in hits)  # type: ignore[index]
        hybrid = index.search(q, limit=3)  # default mode on M3: dense + sparse candidates, ColBERT re-scoring
        cands = {h.id for h in index.search(q, limit=100, mode="dense")} | \
            {h.id for h in index.search(q, limit=100, mode="sparse")}
        best = sorted((ref["colbert"][i] for i in cands), reverse=True)[:3]  # by score: near-ties may swap ids
        assert [h.score for h in hybrid] == pytest.approx(best, abs=1e-5)
        assert all(h.id in cands and h.score == pytest.approx(ref["colbert"][h.id], abs=1e-5) for h in hybrid)
        rrf = index.search(q, limit=3, mode="rrf")
        assert len(rrf) == 3 and {h.id for h in rrf} <= cands
    with pytest.raises(ValueError, match="mode must be one of"):
        index.search("x", mode="bm25")
    with pytest.raises(ValueError, match="lexical_weights"):
        index.add(DOCS[:2], encoded=m3.encode(DOCS[:2]))  # dense only, but the collection holds all three


def test_readme_example_runs(m3_artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("from bge_edge.integrations.qdrant import QdrantIndex")
    code = readme[start:readme.index("```", start)].replace('"artifacts/bge-m3"', repr(str(m3_artifact)))
    assert 8 <= len(code.strip().splitlines()) <= 12  # "about ten lines"
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.split()[-1] in ("a", "b", "c") for line in lines)


def test_on_disk_collection_reopens_and_checks_its_vectors(m3: Embedder, bert_artifact: Path,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "qdrant"
    index = QdrantIndex(m3, path=path)
    index.add(DOCS[:3], ids=[10, 11, 12], progress=False)
    index.client.close()
    again = QdrantIndex(m3, path=path)
    assert len(again) == 3 and again.search(DOCS[2], limit=1, mode="dense")[0].id == 12
    again.client.close()
    dense_only = Embedder(bert_artifact, precision="fp32", hash_cache=tmp_path / "hc")
    with pytest.raises(ValueError, match="writes \\['dense'\\]"):
        QdrantIndex(dense_only, path=path)
    small = QdrantIndex(dense_only, collection="v15")
    assert small.modes == ("dense",)
    small.add(DOCS, progress=False)
    with pytest.raises(ValueError, match="BGE-M3"):
        small.search("x", mode="hybrid")
    q = "what is BGE M3?"
    top = small.search(q, limit=1)[0]  # dense by default; the query gets the bge v1.5 instruction
    want = dense_only.encode_queries([q])["dense_vecs"][0] @ dense_only.encode(DOCS)["dense_vecs"].T
    assert top.score == pytest.approx(float(want.max()), abs=1e-5)  # random tiny weights: near-ties, so by score
    assert float(want[top.id]) == pytest.approx(top.score, abs=1e-5)


@pytest.mark.slow
def test_scifact_minilm_dense_top10_equals_packed_index(minilm_artifact: Path, scifact_dir: Path,
                                                        tmp_path: Path) -> None:
    from bench.retrieval import load_task

    task = load_task(scifact_dir)
    docs, queries = task.docs[:600], task.queries[:30]  # a slice keeps the test lean; the ranking check is exact
    emb = Embedder(minilm_artifact, precision="int8", hash_cache=tmp_path)
    encoded = emb.encode_corpus(docs, batch_size=64)  # the same document vectors for both indexes
    index = QdrantIndex(emb)
    index.add(docs, batch_size=256, progress=False, encoded=encoded)
    packed = PackedIndex()
    packed.add(encoded["dense_vecs"])
    for q in queries:
        ids, scores = packed.search(query_dense=emb.encode_queries(q)["dense_vecs"], k=10)
        hits = index.search(q, limit=10)  # encodes the query the same way: alone, with the instruction
        assert [h.id for h in hits] == ids.tolist(), q
        assert [h.score for h in hits] == pytest.approx(scores.tolist(), abs=1e-5)
