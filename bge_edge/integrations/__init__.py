"""In-process adapters: bge-edge embedders inside the frameworks people already use, no server needed.

Each framework lives in its own module and is imported only there; a missing one fails with the exact
``pip install`` to run:

  bge_edge.integrations.langchain   BgeEdgeEmbeddings, a LangChain Embeddings;       pip install 'bge-edge[langchain]'
                                    BgeEdgeRerank, a document compressor (reranker)
  bge_edge.integrations.llamaindex  BgeEdgeEmbedding, a LlamaIndex BaseEmbedding;     pip install 'bge-edge[llamaindex]'
                                    BgeEdgeRerank, a node postprocessor (reranker)
  bge_edge.integrations.qdrant      QdrantIndex, embedded Qdrant: dense+sparse+ColBERT  pip install 'bge-edge[qdrant]'

Queries get the model's query instruction (bge v1.5: "Represent this sentence for searching relevant passages: ";
none for BGE-M3) and documents none, as FlagEmbedding's ``encode_queries`` / ``encode_corpus`` do.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

from bge_edge.runtime import Embedder, Reranker
from bge_edge.runtime.errors import MissingExtraError

__all__: list[str] = []

ModelLike = Union[str, "os.PathLike[str]", Embedder]


def require(module: str, extra: str, what: str) -> Any:
    """Import ``module`` or fail with the ``pip install`` that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{what} needs {module.split('.')[0]}, which is not installed: run "
                                f"pip install 'bge-edge[{extra}]'  ({e})") from None


def _loaded(cls: type, model: Any, env: str, hint: str, kwargs: dict[str, Any]) -> Any:
    """``model`` itself when it is a loaded ``cls``, else ``cls`` on the folder given (or in ``$env``)."""
    if isinstance(model, cls):
        if kwargs:
            raise TypeError(f"pass either a loaded {cls.__name__} or {cls.__name__} options, not both: "
                            f"{sorted(kwargs)}")
        return model
    if model is None:
        model = os.environ.get(env)
        if not model:
            raise ValueError(f"no model: pass {hint} or set {env}")
    return cls(model, **kwargs)


def load(model: ModelLike | None, **embedder_kwargs: Any) -> Embedder:
    """An ``Embedder`` from an artifact folder (or ``$BGE_EDGE_ARTIFACT``), or the one given."""
    return _loaded(Embedder, model, "BGE_EDGE_ARTIFACT", "an artifact folder (bge-edge export ... --out DIR)",
                   embedder_kwargs)


def load_reranker(model: str | os.PathLike[str] | Reranker | None, **reranker_kwargs: Any) -> Reranker:
    """A ``Reranker`` from an artifact folder (or ``$BGE_EDGE_RERANKER``), or the one given."""
    return _loaded(Reranker, model, "BGE_EDGE_RERANKER", "a reranker artifact folder (bge-edge export "
                   "BAAI/bge-reranker-v2-m3 --out DIR)", reranker_kwargs)


def top_scores(reranker: Reranker, query: str, texts: Sequence[str], top_n: int | None,
               max_length: int | None) -> list[tuple[int, float]]:
    """``[(index, relevance in 0..1)]`` best first: the reranker's sigmoid score, as FlagReranker's normalize=True."""
    kw = {} if max_length is None else {"max_length": max_length}
    return reranker.rerank(query, list(texts), top_k=top_n, normalize=True, **kw)


def query_prefix(embedder: Embedder, query_instruction: str | None) -> str:
    """The text put before each query: ``query_instruction``, or the manifest's when None ("" for none)."""
    return embedder.manifest.query_instruction if query_instruction is None else query_instruction


def dense(embedder: Embedder, texts: Sequence[str], prefix: str = "", batch_size: int = 32,
          max_length: int | None = None) -> list[list[float]]:
    """Dense vectors as lists of Python floats (what the frameworks expect)."""
    if not texts:
        return []
    items = [prefix + t for t in texts] if prefix else list(texts)
    vecs = embedder.encode(items, batch_size=batch_size, max_length=max_length)["dense_vecs"]
    return [[float(x) for x in v] for v in vecs.tolist()]
