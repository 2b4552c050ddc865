"""What the server needs from a model, and its implementation over ``bge_edge.runtime.Embedder``.

The server talks to an ``Engine`` only, so its batching, limits and shutdown are tested with a fake
one (tests/test_serve.py) as well as with real artifacts. Every method may block; the server calls
``encode``/``score``/``warmup`` on its single inference thread and ``count_tokens`` anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

from bge_edge.runtime.errors import InputError

__all__ = ["Engine", "EmbedderEngine"]


class Engine(Protocol):
    model_id: str
    kind: str                 # "m3" | "dense"
    heads: tuple[str, ...]    # ("dense",) or ("dense", "sparse", "colbert")
    hidden_size: int
    max_length: int           # the model's own max tokens per text

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, special tokens included, before truncation. InputError for invalid text."""

    def encode(self, texts: list[str], max_length: int, dense: bool, sparse: bool,
               colbert: bool) -> dict[str, Any]:
        """``Embedder.encode`` on a list: dense_vecs (n, H), lexical_weights, colbert_vecs (None if not asked)."""

    def score(self, pairs: list[tuple[str, str]], max_length: int,
              weights: Sequence[float] | None) -> dict[str, list[float]]:
        """``Embedder.compute_score`` on a list of pairs."""

    def id_to_token(self, weights: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Token-id keys to token strings (``Embedder.convert_id_to_token``)."""

    def warmup(self) -> None:
        """Run every output once so the first request does not pay for lazy initialisation."""

    def info(self) -> dict[str, Any]:
        """Artifact, precision, backend, providers (``Embedder.info``)."""


class EmbedderEngine:
    """An ``Engine`` over a loaded ``Embedder``.

    Token counting uses a second ``tokenizers.Tokenizer`` read from the same verified ``tokenizer.json``
    (the Embedder has no public counting method): the request handler counts tokens to enforce
    ``max_input_tokens`` and report usage before queueing, and the Embedder tokenises again in ``encode``.
    """

    def __init__(self, embedder: Any) -> None:
        from tokenizers import Tokenizer

        self.embedder = embedder
        m = embedder.manifest
        self.model_id = str(m.source.get("model_id") or Path(embedder.root).name)
        self.kind = m.kind
        self.heads = tuple(m.heads)
        self.hidden_size = int(m.hidden_size)
        self.max_length = int(embedder.max_length)
        self._tokenizer = Tokenizer.from_file(str(Path(embedder.root) / m.tokenizer))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    @classmethod
    def load(cls, artifact: str, precision: str | None = None, device: str = "cpu",
             threads: int | None = None) -> EmbedderEngine:
        from bge_edge.runtime import Embedder

        return cls(Embedder(artifact, precision=precision, device=device, threads=threads))

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        try:
            encs = self._tokenizer.encode_batch(list(texts))
        except Exception:  # lone surrogates and other text the tokenizer cannot take
            for k, t in enumerate(texts):
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise InputError(f"input[{k}] holds a lone surrogate ({t[e.start]!r} at position {e.start}): "
                                     f"not valid Unicode; send UTF-8 text.") from None
            raise
        return [len(e.ids) for e in encs]

    def encode(self, texts: list[str], max_length: int, dense: bool, sparse: bool, colbert: bool) -> dict[str, Any]:
        return self.embedder.encode(texts, max_length=max_length, return_dense=dense, return_sparse=sparse,
                                    return_colbert_vecs=colbert)

    def score(self, pairs: list[tuple[str, str]], max_length: int,
              weights: Sequence[float] | None) -> dict[str, list[float]]:
        return self.embedder.compute_score(pairs, max_query_length=max_length, max_passage_length=max_length,
                                           weights_for_different_modes=weights)

    def id_to_token(self, weights: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.embedder.convert_id_to_token(weights)

    def warmup(self) -> None:
        m3 = self.kind == "m3"
        texts = ["warm up", " ".join(["warm up the model with a longer text"] * 8)]
        self.encode(texts, self.max_length, True, m3, m3)

    def info(self) -> dict[str, Any]:
        return self.embedder.info()
