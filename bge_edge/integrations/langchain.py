"""LangChain: ``BgeEdgeEmbeddings``, a ``langchain_core.embeddings.Embeddings`` over a bge-edge artifact, in process.

    from bge_edge.integrations.langchain import BgeEdgeEmbeddings
    emb = BgeEdgeEmbeddings("artifacts/bge-small-en-v1.5")   # or model=None and BGE_EDGE_ARTIFACT=...
    vectors = emb.embed_documents(["BGE is an embedding model"]); q = emb.embed_query("what is BGE?")

``embed_query`` prepends the model's query instruction (bge v1.5), ``embed_documents`` nothing, as FlagEmbedding
does; ``query_instruction=""`` turns it off, a string replaces it. Needs ``pip install 'bge-edge[langchain]'``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import ModelLike, dense, load, query_prefix, require

_lc = require("langchain_core.embeddings", "langchain", "bge_edge.integrations.langchain")

__all__ = ["BgeEdgeEmbeddings"]


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
