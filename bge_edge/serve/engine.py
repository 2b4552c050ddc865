"""What the server needs from a model, and its implementation over ``bge_edge.runtime.Embedder``.

The server talks to an ``Engine`` only, so its batching, limits and shutdown are tested with a fake
one (tests/test_serve.py) as well as with real artifacts. Every method may block; the server calls
``encode``/``score``/``warmup`` on its single inference thread and ``count_tokens`` anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

__all__ = ["Engine", "EmbedderEngine", "RerankerEngine"]


class Engine(Protocol):
    model_id: str
    kind: str                 # "m3" | "dense"
    heads: tuple[str, ...]    # ("dense",) or ("dense", "sparse", "colbert")
    hidden_size: int
    max_length: int           # the model's own max tokens per text

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, special tokens included, before truncation. InputError for invalid text.
        A count above ``max_length`` may be a lower bound (long texts are not tokenised to their end)."""

    def encode(self, texts: list[str], max_length: int, dense: bool, sparse: bool,
               colbert: bool) -> dict[str, Any]:
        """``Embedder.encode`` on a list: dense_vecs (n, H), lexical_weights, colbert_vecs (None if not asked)."""

    def score(self, pairs: list[tuple[str, str]], max_length: int,
              weights: Sequence[float] | None) -> dict[str, list[float]]:
        """``Embedder.compute_score`` on a list of pairs."""

    def id_to_token(self, weights: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Token-id keys to token strings (``Embedder.convert_id_to_token``)."""

    def tokenize(self, texts: list[str], add_special_tokens: bool) -> list[tuple[list[int], list[str],
                                                                            list[tuple[int, int]], list[int]]]:
        """Per text: token ids, token strings, character offsets, special-token mask (TEI's /tokenize)."""

    def warmup(self) -> None:
        """Run every output once so the first request does not pay for lazy initialisation."""

    def info(self) -> dict[str, Any]:
        """Artifact, precision, backend, providers (``Embedder.info``)."""


class EmbedderEngine:
    """An ``Engine`` over a loaded ``Embedder``.

    Token counting is ``Embedder.count_tokens``: the request handler counts tokens to enforce
    ``max_input_tokens`` and report usage before queueing, and the Embedder tokenises again in ``encode``
    (tokenisation is ~2 % of encode time; passing the ids through would save that).
    """

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        m = embedder.manifest
        self.model_id = str(m.source.get("model_id") or Path(embedder.root).name)
        self.kind = m.kind
        self.heads = tuple(m.heads)
        self.hidden_size = int(m.hidden_size)
        self.max_length = int(embedder.max_length)
        # prompts by name (TEI's prompt_name): the query instruction of bge v1.5 models; none for M3
        self.prompts = {"query": m.query_instruction} if m.query_instruction else {}

    @classmethod
    def load(cls, artifact: str, precision: str | None = None, device: str = "cpu",
             threads: int | None = None) -> EmbedderEngine:
        from bge_edge.runtime import Embedder

        return cls(Embedder(artifact, precision=precision, device=device, threads=threads))

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        # bounded: a long text is tokenised only until it is known to be over the model's max length, so a
        # request's memory does not grow with its text (Embedder._token_ids); counts above it are lower bounds
        return self.embedder.count_tokens(list(texts), limit=self.max_length)

    def encode(self, texts: list[str], max_length: int, dense: bool, sparse: bool, colbert: bool) -> dict[str, Any]:
        return self.embedder.encode(texts, max_length=max_length, return_dense=dense, return_sparse=sparse,
                                    return_colbert_vecs=colbert)

    def score(self, pairs: list[tuple[str, str]], max_length: int,
              weights: Sequence[float] | None) -> dict[str, list[float]]:
        return self.embedder.compute_score(pairs, max_query_length=max_length, max_passage_length=max_length,
                                           weights_for_different_modes=weights)

    def id_to_token(self, weights: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.embedder.convert_id_to_token(weights)

    def tokenize(self, texts: list[str], add_special_tokens: bool) -> list[tuple[list[int], list[str],
                                                                            list[tuple[int, int]], list[int]]]:
        from bge_edge.runtime.errors import InputError

        for k, t in enumerate(texts):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as err:
                raise InputError(f"inputs[{k}] holds a lone surrogate ({t[err.start]!r} at position {err.start}): "
                                 f"not valid Unicode") from None
        encs = self.embedder._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [(e.ids, e.tokens, e.offsets, e.special_tokens_mask) for e in encs]

    def warmup(self) -> None:
        m3 = self.kind == "m3"
        texts = ["warm up", " ".join(["warm up the model with a longer text"] * 8)]
        self.encode(texts, self.max_length, True, m3, m3)

    def info(self) -> dict[str, Any]:
        return self.embedder.info()


class RerankerEngine:
    """A reranker for /rerank and /v1/rerank, over a loaded ``bge_edge.runtime.Reranker``.

    Pairs are truncated FlagReranker's way at the server's token limit per pair (the model's max length, e.g.
    8,192 for bge-reranker-v2-m3 and 512 for -base/-large, or --max-input-tokens when the reranker is the
    served model), not at FlagReranker's default of 512.
    """

    kind = "reranker"
    heads = ("score",)

    def __init__(self, reranker: Any) -> None:
        self.reranker = reranker
        m = reranker.manifest
        self.model_id = str(m.source.get("model_id") or Path(reranker.root).name)
        self.hidden_size = int(m.hidden_size)
        self.max_length = int(reranker.max_length)

    @classmethod
    def load(cls, artifact: str, precision: str | None = None, device: str = "cpu",
             threads: int | None = None) -> RerankerEngine:
        from bge_edge.runtime import Reranker

        return cls(Reranker(artifact, precision=precision, device=device, threads=threads))

    def count_pair_tokens(self, query: str, texts: Sequence[str]) -> list[int]:
        """Tokens of each (query, text) pair untruncated, special tokens included. InputError for invalid text."""
        return self.reranker.count_tokens([(query, t) for t in texts])

    def rerank(self, pairs: list[tuple[str, str]], max_length: int) -> list[float]:
        """Raw scores (logits), in input order."""
        return list(self.reranker.compute_score(pairs, max_length=max_length))

    def warmup(self) -> None:
        self.rerank([("warm up", "warm up"), ("warm up", " ".join(["warm up the model with a longer text"] * 8))],
                    self.max_length)

    def info(self) -> dict[str, Any]:
        return self.reranker.info()
