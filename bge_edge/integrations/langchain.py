"""LangChain: ``BgeEdgeEmbeddings``, a ``langchain_core.embeddings.Embeddings`` over a bge-edge artifact, and
``BgeEdgeRerank``, a document compressor over a bge-edge reranker, in process.

    from bge_edge.integrations.langchain import BgeEdgeEmbeddings
    emb = BgeEdgeEmbeddings("artifacts/bge-small-en-v1.5")   # or model=None and BGE_EDGE_ARTIFACT=...
    vectors = emb.embed_documents(["BGE is an embedding model"]); q = emb.embed_query("what is BGE?")

    rerank = BgeEdgeRerank(reranker="artifacts/bge-reranker-v2-m3", top_n=3)
    best = rerank.compress_documents(docs, "what is BGE?")   # metadata["relevance_score"] in 0..1

``embed_query`` prepends the model's query instruction (bge v1.5), ``embed_documents`` nothing, as FlagEmbedding
does; ``query_instruction=""`` turns it off, a string replaces it. Needs ``pip install 'bge-edge[langchain]'``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional, Sequence

from . import ModelLike, dense, load, load_reranker, query_prefix, require, top_scores

_lc = require("langchain_core.embeddings", "langchain", "bge_edge.integrations.langchain")
_lcc = require("langchain_core.documents.compressor", "langchain", "bge_edge.integrations.langchain")
_lcd = require("langchain_core.documents", "langchain", "bge_edge.integrations.langchain")
_pd = require("pydantic", "langchain", "bge_edge.integrations.langchain")

__all__ = ["BgeEdgeEmbeddings", "BgeEdgeRerank"]


class BgeEdgeEmbeddings(_lc.Embeddings):  # type: ignore[misc,name-defined]
    """LangChain embeddings from a bge-edge artifact folder (or a loaded ``Embedder``).

    ``precision``, ``backend``, ``device``, ``threads`` and other keyword arguments go to ``Embedder``;
    ``batch_size`` and ``max_length`` to ``Embedder.encode``.
    """

    def __init__(self, model: ModelLike | None = None, *, query_instruction: str | None = None,
                 batch_size: int = 32, max_length: int | None = None, **embedder_kwargs: Any) -> None:
        self.embedder = load(model, **embedder_kwargs)
        self.model = str(self.embedder.root)
        self.query_instruction = query_prefix(self.embedder, query_instruction)
        self.batch_size, self.max_length = batch_size, max_length

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return dense(self.embedder, texts, "", self.batch_size, self.max_length)

    def embed_query(self, text: str) -> list[float]:
        return dense(self.embedder, [text], self.query_instruction, self.batch_size, self.max_length)[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.get_running_loop().run_in_executor(None, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.get_running_loop().run_in_executor(None, self.embed_query, text)


class BgeEdgeRerank(_lcc.BaseDocumentCompressor):  # type: ignore[misc,name-defined]
    """A LangChain document compressor that re-ranks retrieved documents with a bge-edge reranker (cross-encoder).

    Keeps the ``top_n`` best documents (None: all), best first, each with ``metadata["relevance_score"]`` (the
    sigmoid of the logit, 0..1). ``reranker`` is an artifact folder, a loaded ``Reranker``, or None for
    ``$BGE_EDGE_RERANKER``; ``reranker_kwargs`` (precision, backend, threads, ...) go to ``Reranker``.
    """

    model_config = _pd.ConfigDict(arbitrary_types_allowed=True)
    reranker: Any = None
    top_n: Optional[int] = 3
    max_length: Optional[int] = None  # tokens per (query, passage) pair; None: FlagReranker's 512
    reranker_kwargs: dict = _pd.Field(default_factory=dict)

    def model_post_init(self, __context: Any) -> None:
        self.reranker = load_reranker(self.reranker, **self.reranker_kwargs)

    def compress_documents(self, documents: Sequence[Any], query: str, callbacks: Any = None) -> Sequence[Any]:
        docs = list(documents)
        ranked = top_scores(self.reranker, query, [d.page_content for d in docs], self.top_n, self.max_length)
        return [_lcd.Document(page_content=docs[i].page_content, id=docs[i].id,
                              metadata={**docs[i].metadata, "relevance_score": s}) for i, s in ranked]
