"""LlamaIndex: ``BgeEdgeEmbedding``, a ``llama_index.core`` ``BaseEmbedding`` over a bge-edge artifact, and
``BgeEdgeRerank``, a node postprocessor over a bge-edge reranker, in process.

    from llama_index.core import Settings
    from bge_edge.integrations.llamaindex import BgeEdgeEmbedding
    Settings.embed_model = BgeEdgeEmbedding("artifacts/bge-small-en-v1.5")
    engine = index.as_query_engine(similarity_top_k=20,
                                   node_postprocessors=[BgeEdgeRerank("artifacts/bge-reranker-v2-m3", top_n=3)])

Queries get the model's query instruction (bge v1.5), documents none, as FlagEmbedding does;
``query_instruction=""`` turns it off. Needs ``pip install 'bge-edge[llamaindex]'``.
"""

from __future__ import annotations

from typing import Any, List, Optional

from . import ModelLike, dense, load, load_reranker, query_prefix, require, top_scores

_li = require("llama_index.core.base.embeddings.base", "llamaindex", "bge_edge.integrations.llamaindex")
_lp = require("llama_index.core.postprocessor.types", "llamaindex", "bge_edge.integrations.llamaindex")
_ls = require("llama_index.core.schema", "llamaindex", "bge_edge.integrations.llamaindex")
_pd = require("pydantic", "llamaindex", "bge_edge.integrations.llamaindex")

__all__ = ["BgeEdgeEmbedding", "BgeEdgeRerank"]


class BgeEdgeEmbedding(_li.BaseEmbedding):  # type: ignore[misc,name-defined]
    """LlamaIndex embeddings from a bge-edge artifact folder (or a loaded ``Embedder``).

    ``embed_batch_size`` (LlamaIndex's own field) is the encode batch size; ``max_length`` caps tokens per text;
    other keyword arguments (``precision``, ``backend``, ``threads``, ...) go to ``Embedder``.
    """

    query_instruction: Optional[str] = _pd.Field(default=None, description="text put before each query; None: the "
                                                                           "model's own (bge v1.5), '': none")
    max_length: Optional[int] = _pd.Field(default=None, description="tokens per text (None: the model's)")
    _embedder: Any = _pd.PrivateAttr()

    def __init__(self, model: ModelLike | None = None, *, query_instruction: Optional[str] = None,
                 embed_batch_size: int = 32, max_length: Optional[int] = None, **kwargs: Any) -> None:
        base = {k: kwargs.pop(k) for k in list(kwargs) if k in _li.BaseEmbedding.model_fields}
        embedder = load(model, **kwargs)
        super().__init__(model_name=str(base.pop("model_name", embedder.root)),
                         query_instruction=query_prefix(embedder, query_instruction),
                         embed_batch_size=embed_batch_size, max_length=max_length, **base)
        self._embedder = embedder

    @classmethod
    def class_name(cls) -> str:
        return "BgeEdgeEmbedding"

    @property
    def embedder(self) -> Any:
        return self._embedder

    def _encode(self, texts: List[str], prefix: str = "") -> List[List[float]]:
        return dense(self._embedder, texts, prefix, self.embed_batch_size, self.max_length)

    def _get_query_embedding(self, query: str) -> List[float]:
        return self._encode([query], self.query_instruction or "")[0]

    async def _aget_query_embedding(self, query: str) -> List[float]:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> List[float]:
        return self._encode([text])[0]

    def _get_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return self._encode(texts)


class BgeEdgeRerank(_lp.BaseNodePostprocessor):  # type: ignore[misc,name-defined]
    """A LlamaIndex node postprocessor that re-ranks retrieved nodes with a bge-edge reranker (cross-encoder).

    Keeps the ``top_n`` best nodes (None: all), best first, their score replaced by the reranker's (the sigmoid of
    the logit, 0..1). ``reranker`` is an artifact folder, a loaded ``Reranker``, or None for ``$BGE_EDGE_RERANKER``;
    other keyword arguments (precision, backend, threads, ...) go to ``Reranker``.
    """

    top_n: Optional[int] = _pd.Field(default=3, description="nodes kept (None: all)")
    max_length: Optional[int] = _pd.Field(default=None, description="tokens per pair (None: FlagReranker's 512)")
    _reranker: Any = _pd.PrivateAttr()

    def __init__(self, reranker: Any = None, *, top_n: Optional[int] = 3, max_length: Optional[int] = None,
                 **kwargs: Any) -> None:
        base = {k: kwargs.pop(k) for k in list(kwargs) if k in _lp.BaseNodePostprocessor.model_fields}
        loaded = load_reranker(reranker, **kwargs)
        super().__init__(top_n=top_n, max_length=max_length, **base)
        self._reranker = loaded

    @classmethod
    def class_name(cls) -> str:
        return "BgeEdgeRerank"

    def _postprocess_nodes(self, nodes: List[Any], query_bundle: Optional[Any] = None) -> List[Any]:
        if query_bundle is None:
            raise ValueError("BgeEdgeRerank needs the query: pass query_bundle or query_str")
        if not nodes:
            return []
        texts = [n.node.get_content(metadata_mode=_ls.MetadataMode.NONE) for n in nodes]
        ranked = top_scores(self._reranker, query_bundle.query_str, texts, self.top_n, self.max_length)
        return [_ls.NodeWithScore(node=nodes[i].node, score=s) for i, s in ranked]
