"""Embedded Qdrant (``qdrant-client``'s local mode: no server) holding all three BGE-M3 outputs per document.

    from bge_edge.integrations.qdrant import QdrantIndex
    index = QdrantIndex("artifacts/bge-m3")                        # in memory; path="qdrant-data" keeps it on disk
    index.add(corpus)                                              # batched upload with a progress bar
    for hit in index.search("what is BGE M3?", limit=10):         # hybrid: dense + sparse, ColBERT re-scoring
        print(hit.score, hit.text)

The collection has up to three named vectors per point: ``dense`` (H floats), ``sparse`` (M3 lexical weights: token
ids and weights) and ``colbert`` (a multivector of the ColBERT rows, compared with ``MAX_SIM``). All are stored as
``Embedder`` outputs them, L2-normalised where BGE normalises, and compared with the dot product, so scores are
FlagEmbedding's: ``dense`` = ``compute_score``'s dense, ``sparse`` = ``compute_lexical_matching_score``, and
``colbert`` = Qdrant's MAX_SIM sum divided by the query's ColBERT rows (FlagEmbedding's ``colbert_score``).
A dense-only model (bge v1.5, MiniLM) gets a ``dense`` vector only.

Search modes: ``dense``, ``sparse``, ``colbert`` (exhaustive MaxSim over every document); ``hybrid`` (default on
M3): the best ``prefetch_limit`` by dense and by sparse, re-scored by ColBERT; ``rrf``: dense and sparse lists
fused by reciprocal rank (Qdrant's ``Fusion.RRF``; scores are RRF's). Needs ``pip install 'bge-edge[qdrant]'``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from bge_edge.runtime import Embedder

from . import ModelLike, load, query_prefix, require

_qc = require("qdrant_client", "qdrant", "bge_edge.integrations.qdrant")
_m = require("qdrant_client.models", "qdrant", "bge_edge.integrations.qdrant")

__all__ = ["QdrantIndex", "Hit", "MODES"]

MODES = ("dense", "sparse", "colbert", "hybrid", "rrf")
UPLOAD_BATCH = 64  # texts encoded and upserted per step: ColBERT rows of 64 x 8,192 tokens stay ~2 GiB at most


@dataclass(frozen=True)
class Hit:
    id: int | str
    score: float
    text: str | None
    payload: dict[str, Any]


class QdrantIndex:
    """A Qdrant collection filled and searched with a bge-edge ``Embedder``.

    ``model``: an artifact folder or a loaded ``Embedder``; ``client``: a ``QdrantClient`` of your own (a server
    works too), else an embedded one, in memory or at ``path``. The collection is created when missing (with the
    vectors the model has) and checked when present. ``query_instruction`` as in the other adapters.
    """

    def __init__(self, model: ModelLike, collection: str = "bge-edge", *, client: Any = None,
                 path: str | os.PathLike[str] | None = None, query_instruction: str | None = None,
                 **embedder_kwargs: Any) -> None:
        self.embedder: Embedder = load(model, **embedder_kwargs)
        self.client = client if client is not None else (
            _qc.QdrantClient(path=str(path)) if path is not None else _qc.QdrantClient(":memory:"))
        self.collection = collection
        self.query_instruction = query_prefix(self.embedder, query_instruction)
        heads = set(self.embedder.manifest.heads)
        self.modes = ("dense",) + (("sparse",) if "sparse" in heads else ()) + \
            (("colbert", "hybrid", "rrf") if {"sparse", "colbert"} <= heads else ())
        self._ensure_collection()

    # ---- writing --------------------------------------------------------------------------------

    def _ensure_collection(self) -> None:
        H = self.embedder.manifest.hidden_size
        vectors = {"dense": _m.VectorParams(size=H, distance=_m.Distance.DOT)}
        sparse = {}
        if "colbert" in self.modes:
            vectors["colbert"] = _m.VectorParams(size=H, distance=_m.Distance.DOT, multivector_config=(
                _m.MultiVectorConfig(comparator=_m.MultiVectorComparator.MAX_SIM)))
        if "sparse" in self.modes:
            sparse["sparse"] = _m.SparseVectorParams()
        if not self.client.collection_exists(self.collection):
            self.client.create_collection(self.collection, vectors_config=vectors,
                                          sparse_vectors_config=sparse or None)
            return
        have = self.client.get_collection(self.collection).config.params
        got = set(have.vectors or {}) | set(have.sparse_vectors or {})
        want = set(vectors) | set(sparse)
        if got != want:
            raise ValueError(f"collection {self.collection!r} holds vectors {sorted(got)}, but this model "
                             f"({self.embedder.manifest.source.get('model_id')}) writes {sorted(want)}: use another "
                             f"collection name or delete it")

    def __len__(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def add(self, texts: Sequence[str], ids: Sequence[int | str] | None = None,
            payloads: Sequence[Mapping[str, Any]] | None = None, *, batch_size: int = UPLOAD_BATCH,
            store_text: bool = True, progress: bool = True, max_length: int | None = None,
            encoded: Mapping[str, Any] | None = None) -> list[int | str]:
        """Encode ``texts`` as documents (no instruction) and upsert them ``batch_size`` at a time; returns the ids.

        ``encoded``: this embedder's ``encode(texts, return_sparse=..., return_colbert_vecs=...)`` output when you
        have it already (every output the collection holds); nothing is encoded again.
        ``ids`` default to consecutive integers after the collection's current size; the payload holds ``text``
        (unless ``store_text=False``) and the given ``payloads``. ``progress`` shows a tqdm bar when tqdm is installed.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got one string: wrap it in a list")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        if ids is None:
            start = len(self)
            ids = list(range(start, start + len(texts)))
        if len(ids) != len(texts) or (payloads is not None and len(payloads) != len(texts)):
            raise ValueError(f"{len(texts)} texts need as many ids and payloads, got {len(ids)} ids and "
                             f"{'no' if payloads is None else len(payloads)} payloads")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        bar = _progress(len(texts), f"bge-edge -> qdrant:{self.collection}") if progress else None
        sparse, colbert = "sparse" in self.modes, "colbert" in self.modes
        if encoded is not None:
            need = ["dense_vecs"] + (["lexical_weights"] if sparse else []) + (["colbert_vecs"] if colbert else [])
            bad = [k for k in need if encoded.get(k) is None or len(encoded[k]) != len(texts)]
            if bad:
                raise ValueError(f"encoded must hold {need} for each of the {len(texts)} texts; {bad} do not")
        try:
            for i in range(0, len(texts), batch_size):
                chunk = texts[i:i + batch_size]
                if encoded is not None:
                    out = {k: v[i:i + batch_size] for k, v in encoded.items() if v is not None}
                else:
                    out = self.embedder.encode(chunk, batch_size=min(batch_size, 32), max_length=max_length,
                                               return_sparse=sparse, return_colbert_vecs=colbert)
                points = []
                for j, text in enumerate(chunk):
                    vec: dict[str, Any] = {"dense": out["dense_vecs"][j].tolist()}
                    if sparse:
                        vec["sparse"] = _sparse(out["lexical_weights"][j])
                    if colbert:
                        vec["colbert"] = out["colbert_vecs"][j].tolist()
                    payload = dict(payloads[i + j]) if payloads is not None else {}
                    if store_text:
                        payload["text"] = text
                    points.append(_m.PointStruct(id=ids[i + j], vector=vec, payload=payload))
                self.client.upsert(self.collection, points=points, wait=True)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return list(ids)

    # ---- searching ------------------------------------------------------------------------------

    def search(self, query: str, limit: int = 10, mode: str | None = None, *, prefetch_limit: int = 100,
               query_filter: Any = None, max_length: int | None = None) -> list[Hit]:
        """The best ``limit`` documents for ``query`` (with the query instruction), best first.

        ``mode``: one of ``MODES`` (default: ``hybrid`` for BGE-M3, ``dense`` otherwise); ``query_filter``: a
        ``qdrant_client.models.Filter`` on payloads.
        """
        mode = mode or ("hybrid" if "hybrid" in self.modes else "dense")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} needs the sparse and ColBERT heads of a BGE-M3 artifact; this model has "
                             f"{list(self.embedder.manifest.heads)}: use mode='dense'")
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        need_sparse = mode in ("sparse", "hybrid", "rrf")
        need_colbert = mode in ("colbert", "hybrid")
        q = self.embedder.encode(self.query_instruction + query, max_length=max_length, return_sparse=need_sparse,
                                 return_colbert_vecs=need_colbert)
        dense_q = q["dense_vecs"].tolist()
        sparse_q = _sparse(q["lexical_weights"]) if need_sparse else None
        colbert_q = q["colbert_vecs"].tolist() if need_colbert else None
        scale = 1.0
        kw: dict[str, Any] = {"limit": limit, "query_filter": query_filter, "with_payload": True}
        if mode == "dense":
            kw.update(query=dense_q, using="dense")
        elif mode == "sparse":
            kw.update(query=sparse_q, using="sparse")
        elif mode == "colbert":
            kw.update(query=colbert_q, using="colbert")
        else:
            pre = [_m.Prefetch(query=dense_q, using="dense", limit=prefetch_limit, filter=query_filter),
                   _m.Prefetch(query=sparse_q, using="sparse", limit=prefetch_limit, filter=query_filter)]
            if mode == "hybrid":
                kw.update(prefetch=pre, query=colbert_q, using="colbert")
            else:
                kw.update(prefetch=pre, query=_m.FusionQuery(fusion=_m.Fusion.RRF))
        if colbert_q is not None and mode in ("colbert", "hybrid"):
            scale = 1.0 / len(colbert_q)  # MAX_SIM sums over query rows; FlagEmbedding's colbert_score averages
        points = self.client.query_points(self.collection, **kw).points
        return [Hit(p.id, float(p.score) * scale, (p.payload or {}).get("text"), dict(p.payload or {}))
                for p in points]


def _sparse(weights: Mapping[str, Any]) -> Any:
    items = sorted((int(k), float(v)) for k, v in weights.items())
    return _m.SparseVector(indices=[k for k, _ in items], values=[v for _, v in items])


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="text")

