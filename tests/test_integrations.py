"""In-process adapters with the real frameworks: LangChain's standard embeddings test suites (langchain-tests) and
LlamaIndex's BaseEmbedding, both on a tiny bge v1.5-style artifact (it has a query instruction), checked against the
Embedder's encode / encode_queries; and the missing-extra message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")
pytest.importorskip("llama_index.core")

from bge_edge.runtime import Embedder  # noqa: E402
from langchain_tests.integration_tests import EmbeddingsIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import EmbeddingsUnitTests  # noqa: E402

from bge_edge.integrations.langchain import BgeEdgeEmbeddings  # noqa: E402
from bge_edge.integrations.llamaindex import BgeEdgeEmbedding  # noqa: E402

DOCS = ["BGE is an embedding model from BAAI", "Paris is the capital of France", "模型将每个段落编码"]


class _Artifact:
    artifact: Path

    @pytest.fixture(autouse=True)
    def _artifact(self, bert_artifact: Path) -> None:
        type(self).artifact = bert_artifact

    @property
    def embeddings_class(self) -> type[BgeEdgeEmbeddings]:
        return BgeEdgeEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": str(self.artifact), "precision": "fp32"}


class TestLangChainStandardUnit(_Artifact, EmbeddingsUnitTests):
    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return {"BGE_EDGE_ARTIFACT": str(self.artifact)}, {"precision": "fp32"}, {"model": str(self.artifact)}


class TestLangChainStandardIntegration(_Artifact, EmbeddingsIntegrationTests):
    pass


def test_langchain_query_instruction_on_queries_only(bert_artifact: Path, tmp_path: Path) -> None:
    emb = Embedder(bert_artifact, precision="fp32", hash_cache=tmp_path)
    instr = emb.manifest.query_instruction
    assert instr
    lc = BgeEdgeEmbeddings(emb)
    np.testing.assert_allclose(lc.embed_documents(DOCS), emb.encode(DOCS)["dense_vecs"], atol=1e-6)
    q = "what is BGE?"
    np.testing.assert_allclose(lc.embed_query(q), emb.encode_queries([q])["dense_vecs"][0], atol=1e-6)
    np.testing.assert_allclose(lc.embed_query(q), emb.encode(instr + q)["dense_vecs"], atol=1e-6)
    plain = BgeEdgeEmbeddings(emb, query_instruction="")
    np.testing.assert_allclose(plain.embed_query(q), emb.encode(q)["dense_vecs"], atol=1e-6)
    assert lc.embed_documents([]) == []


def test_llamaindex_embedding(bert_artifact: Path, tmp_path: Path) -> None:
    from llama_index.core.base.embeddings.base import BaseEmbedding

    emb = Embedder(bert_artifact, precision="fp32", hash_cache=tmp_path)
    li = BgeEdgeEmbedding(emb, embed_batch_size=2)
    assert isinstance(li, BaseEmbedding) and li.query_instruction == emb.manifest.query_instruction
    docs = li.get_text_embedding_batch(DOCS)
    np.testing.assert_allclose(docs, emb.encode(DOCS)["dense_vecs"], atol=1e-6)
    np.testing.assert_allclose(li.get_text_embedding(DOCS[0]), docs[0], atol=1e-6)
    q = "what is BGE?"
    np.testing.assert_allclose(li.get_query_embedding(q), emb.encode_queries([q])["dense_vecs"][0], atol=1e-6)
    import asyncio

    aq = asyncio.run(li.aget_query_embedding(q))
    np.testing.assert_allclose(aq, li.get_query_embedding(q), atol=1e-6)
    assert BgeEdgeEmbedding(emb, query_instruction="").get_query_embedding(q) == li.get_text_embedding(q)
    by_path = BgeEdgeEmbedding(str(bert_artifact), precision="fp32", hash_cache=tmp_path)
    assert by_path.model_name == str(bert_artifact) and by_path.get_text_embedding(DOCS[0]) == docs[0]


def test_llamaindex_vector_index_retrieves(bert_artifact: Path, tmp_path: Path) -> None:
    """The adapter inside LlamaIndex's own in-memory index: each document is its own best match."""
    from llama_index.core import Document, VectorStoreIndex

    model = BgeEdgeEmbedding(str(bert_artifact), precision="fp32", hash_cache=tmp_path, query_instruction="")
    index = VectorStoreIndex.from_documents([Document(text=t, doc_id=str(i)) for i, t in enumerate(DOCS)],
                                           embed_model=model)
    for i, t in enumerate(DOCS):
        hits = index.as_retriever(similarity_top_k=1).retrieve(t)
        assert hits[0].node.ref_doc_id == str(i) and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_missing_extra_names_the_pip_install() -> None:
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('langchain_core', 'llama_index', 'qdrant_client'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "for mod, extra in (('langchain', 'langchain'), ('llamaindex', 'llamaindex'), ('qdrant', 'qdrant')):\n"
            "    try:\n"
            "        __import__('bge_edge.integrations.' + mod)\n"
            "    except ImportError as e:\n"
            "        assert type(e).__name__ == 'MissingExtraError', e\n"
            "        assert f\"pip install 'bge-edge[{extra}]'\" in str(e), e\n"
            "    else:\n"
            "        raise AssertionError(mod + ' imported without its framework')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


RERANK_QUERY = "what is BGE?"


@pytest.fixture(scope="module")
def reranker(reranker_base_artifact: Path) -> Any:
    from bge_edge.runtime import Reranker

    return Reranker(reranker_base_artifact, precision="fp32", hash_cache=False)


def test_langchain_rerank_compressor_keeps_the_rerankers_top_n(reranker: Any) -> None:
    import asyncio

    from langchain_core.documents import Document

    from bge_edge.integrations.langchain import BgeEdgeRerank

    want = reranker.rerank(RERANK_QUERY, DOCS, top_k=2, normalize=True)
    comp = BgeEdgeRerank(reranker=reranker, top_n=2)
    docs = [Document(page_content=t, metadata={"k": i}) for i, t in enumerate(DOCS)]
    for out in (comp.compress_documents(docs, RERANK_QUERY), asyncio.run(comp.acompress_documents(docs, RERANK_QUERY))):
        assert [d.metadata["k"] for d in out] == [i for i, _ in want]
        assert [d.metadata["relevance_score"] for d in out] == pytest.approx([s for _, s in want], abs=1e-7)
        assert all(0 < d.metadata["relevance_score"] < 1 for d in out)
    assert len(BgeEdgeRerank(reranker=reranker, top_n=None).compress_documents(docs, RERANK_QUERY)) == len(DOCS)


def test_llamaindex_rerank_postprocessor_keeps_the_rerankers_top_n(reranker: Any) -> None:
    from llama_index.core.schema import NodeWithScore, TextNode

    from bge_edge.integrations.llamaindex import BgeEdgeRerank

    want = reranker.rerank(RERANK_QUERY, DOCS, top_k=2, normalize=True)
    post = BgeEdgeRerank(reranker, top_n=2)
    nodes = [NodeWithScore(node=TextNode(text=t, id_=str(i)), score=0.0) for i, t in enumerate(DOCS)]
    out = post.postprocess_nodes(nodes, query_str=RERANK_QUERY)
    assert [n.node.id_ for n in out] == [str(i) for i, _ in want]
    assert [n.score for n in out] == pytest.approx([s for _, s in want], abs=1e-7)
    with pytest.raises(ValueError, match="needs the query"):
        post.postprocess_nodes(nodes)


def test_rerank_adapters_say_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from bge_edge.integrations.langchain import BgeEdgeRerank

    monkeypatch.delenv("BGE_EDGE_RERANKER", raising=False)
    with pytest.raises(ValueError, match="BGE_EDGE_RERANKER"):
        BgeEdgeRerank()
