"""``Reranker``: score (query, passage) pairs with a cross-encoder artifact (bge-reranker-v2-m3, -base, -large).

Semantics are FlagEmbedding's ``FlagReranker`` (FlagEmbedding 1.3/1.4, ``inference/reranker/encoder_only/base.py``,
``compute_score_single_gpu``), fp32:
  1. the query is tokenised without special tokens and cut to ``query_max_length`` tokens (default
     ``max_length * 3 // 4``), the passage likewise to ``max_length``;
  2. the pair becomes ``<s> q </s> </s> p </s>`` and, when longer than ``max_length``, only the passage is cut
     from the right by the overflow (transformers' ``prepare_for_model(truncation="only_second")``); when the
     passage is not longer than the overflow nothing is cut (transformers logs an error and keeps the pair);
  3. score = the model's one logit; ``normalize=True`` applies the sigmoid.
Defaults are FlagReranker's: ``max_length`` 512 (whatever the model's own limit: pass e.g. 1024 or 8192 to read
longer passages with bge-reranker-v2-m3), ``batch_size`` 128, ``normalize`` False.
Tokenisation is ``tokenizer.json`` through the ``tokenizers`` library (= transformers 4.x fast tokenizers, as
for the Embedder). Pairs are length-sorted and cut into batches by ``batching.plan_batches``, the embedder's;
long pairs on a linear-attention graph (v2-m3 exports) run alone on the flash-attention branch.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from .batching import DEFAULT_MEMORY_MB, LINEAR_ATTENTION_FROM, MAX_BATCH_TOKENS, plan_batches
from .errors import ArtifactError, BackendError, InputError
from .loading import open_graph
from .manifest import Manifest, read_manifest
from .ov_session import OpenVINOSession

__all__ = ["Reranker", "RerankStats", "pair_ids", "DEFAULT_MAX_LENGTH", "DEFAULT_BATCH_SIZE", "PAIR_SPECIAL_TOKENS"]

DEFAULT_MAX_LENGTH = 512  # FlagReranker's max_length
DEFAULT_BATCH_SIZE = 128  # FlagReranker's batch_size (FlagEmbedding >= 1.3)
PAIR_SPECIAL_TOKENS = 4  # <s> q </s> </s> p </s>: XLM-RoBERTa's pair template

Pair = Union[tuple[str, str], Sequence[str]]


def pair_ids(query: Sequence[int], passage: Sequence[int], cls_id: int, eos_id: int, max_length: int,
             query_max_length: int) -> tuple[list[int], bool]:
    """The model input of one pair from its untruncated query and passage token ids (module docstring, 1-2);
    returns (ids, whether anything was cut)."""
    q, p = list(query[:query_max_length]), list(passage[:max_length])
    cut = len(q) < len(query) or len(p) < len(passage)
    over = len(q) + len(p) + PAIR_SPECIAL_TOKENS - max_length
    if 0 < over < len(p):  # transformers cuts the second sequence only when it is longer than the overflow
        p, cut = p[: len(p) - over], True
    return [cls_id, *q, eos_id, eos_id, *p, eos_id], cut


@dataclass
class RerankStats:
    """What the last ``compute_score`` call did."""

    pairs: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    truncated: int = 0
    batches: int = 0
    batch_shapes: list[tuple[int, int]] = field(default_factory=list)


class Reranker:
    """Score (query, passage) pairs with a bge-edge reranker artifact; FlagReranker's scores (module docstring).

    ``backend`` "auto" runs the artifact's OpenVINO graph when openvino is installed and the device is the CPU,
    else ONNX Runtime. ``precision`` None picks int8 on CPU (else fp32) and fp16 on CUDA (else fp32). Every file
    read is checked against the manifest's size and SHA-256 first (``hash_cache`` as for ``Embedder``).
    """

    def __init__(self, artifact_dir: str | os.PathLike[str], precision: str | None = None, backend: str = "auto",
                 device: str = "cpu", threads: int | None = None,
                 hash_cache: bool | str | os.PathLike[str] = True, spin: bool = False) -> None:
        self.root = Path(artifact_dir)
        self.manifest: Manifest = read_manifest(self.root)
        if self.manifest.kind != "reranker":
            raise ArtifactError(f"{self.root} holds a {self.manifest.kind!r} embedding model "
                                f"({self.manifest.source.get('model_id')}), not a reranker: load it with "
                                f"bge_edge.runtime.Embedder, or export a cross-encoder such as "
                                f"BAAI/bge-reranker-v2-m3 for Reranker.")
        sp = self.manifest.special_tokens
        if sp.get("cls") is None or sp.get("eos") is None:
            raise ArtifactError(f"{self.root}/manifest.json lacks the cls/eos token ids a pair needs; re-export it.")
        self._cls, self._eos, self._pad = int(sp["cls"] or 0), int(sp["eos"] or 0), int(sp.get("pad") or 0)
        self.device = device
        g = open_graph(self.root, self.manifest, precision=precision, backend=backend, device=device, threads=threads,
                       hash_cache=hash_cache, spin=spin)
        self.backend, self.backend_reason = g.backend, g.backend_reason
        self.graph, self.precision = g.graph, g.precision
        self._tokenizer, self._session, self.providers = g.tokenizer, g.session, g.providers
        self.max_length = self.manifest.max_length  # the model's limit; FlagReranker's default is DEFAULT_MAX_LENGTH
        self.last_stats = RerankStats()
        self._stats_lock = threading.Lock()

    # ---- public API -------------------------------------------------------------------------

    def compute_score(self, sentence_pairs: Pair | Sequence[Pair], batch_size: int = DEFAULT_BATCH_SIZE,
                      max_length: int = DEFAULT_MAX_LENGTH, query_max_length: int | None = None,
                      normalize: bool = False, max_batch_tokens: int = MAX_BATCH_TOKENS) -> float | list[float]:
        """Relevance score of each (query, passage) pair: a list of floats, or one float for one pair.

        ``max_length`` bounds the pair's tokens (capped at the model's own limit), ``query_max_length`` the
        query's (default ``max_length * 3 // 4``); ``normalize`` maps the raw logit through the sigmoid.
        """
        single = _is_pair(sentence_pairs)
        pairs: list[Any] = [sentence_pairs] if single else self._check_pairs(sentence_pairs)
        scores = self._scores(pairs, batch_size, max_length, query_max_length, max_batch_tokens)
        out = [_sigmoid(s) for s in scores] if normalize else [float(s) for s in scores]
        return out[0] if single else out

    def rerank(self, query: str, passages: Sequence[str], top_k: int | None = None, *,
               batch_size: int = DEFAULT_BATCH_SIZE, max_length: int = DEFAULT_MAX_LENGTH,
               query_max_length: int | None = None, normalize: bool = False) -> list[tuple[int, float]]:
        """``[(index into passages, score), ...]`` best first (ties: lower index first), at most ``top_k``."""
        if not isinstance(query, str):
            raise InputError(f"query must be a string, got {type(query).__name__}.")
        if isinstance(passages, str) or not hasattr(passages, "__iter__"):
            raise InputError(f"passages must be a list of strings, got {type(passages).__name__}.")
        items = list(passages)
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise InputError(f"top_k must be a positive integer or None (all passages), got {top_k!r}.")
        for k, p in enumerate(items):
            if not isinstance(p, str):
                raise InputError(f"passages[{k}] is {type(p).__name__}, not str; every passage must be a string.")
        if not items:
            return []
        scores = self.compute_score([(query, p) for p in items], batch_size=batch_size, max_length=max_length,
                                    query_max_length=query_max_length, normalize=normalize)
        assert isinstance(scores, list)
        order = sorted(range(len(items)), key=lambda i: (-scores[i], i))
        return [(i, scores[i]) for i in order[:top_k]]

    def count_tokens(self, pairs: Sequence[Pair]) -> list[int]:
        """Tokens of each pair as the model would read it untruncated (special tokens included), e.g. for a
        server's limits."""
        items = self._check_pairs(pairs)
        q, p = self._token_ids([a for a, _ in items]), self._token_ids([b for _, b in items])
        return [len(a) + len(b) + PAIR_SPECIAL_TOKENS for a, b in zip(q, p)]

    def info(self) -> dict[str, Any]:
        """What is loaded: artifact, graph, backend, providers, limits."""
        m = self.manifest
        return {"artifact": str(self.root), "model_id": m.source.get("model_id"), "kind": m.kind,
                "heads": list(m.heads), "hidden_size": m.hidden_size, "max_length": m.max_length,
                "default_max_length": min(DEFAULT_MAX_LENGTH, m.max_length), "precision": self.precision,
                "graph": self.graph.file, "backend": self.backend, "backend_reason": self.backend_reason,
                "device": self.device, "providers": self.providers, "accuracy": dict(self.graph.accuracy),
                "batch_invariant": self.graph.batch_invariant,
                "max_batch_tokens": MAX_BATCH_TOKENS,
                "long_inputs": (f"over {LINEAR_ATTENTION_FROM} tokens: alone, unpadded, flash attention (linear memory)"
                                if self.graph.linear_attention else "padded batches, full attention matrix")}

    # ---- internals ----------------------------------------------------------------------------

    def _check_pairs(self, pairs: Any) -> list[tuple[str, str]]:
        if pairs is None or isinstance(pairs, (str, bytes, bytearray, dict)) or not hasattr(pairs, "__iter__"):
            raise InputError(f"sentence_pairs must be a (query, passage) pair or a list of them, got "
                             f"{type(pairs).__name__}.")
        items = list(pairs)
        for k, p in enumerate(items):
            if not _is_pair(p):
                raise InputError(f"sentence_pairs[{k}] must be a (query, passage) pair of strings, got {p!r:.80}.")
        return [(p[0], p[1]) for p in items]

    def _check_lengths(self, max_length: Any, query_max_length: Any) -> tuple[int, int]:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < PAIR_SPECIAL_TOKENS + 2:
            raise InputError(f"max_length must be an integer >= {PAIR_SPECIAL_TOKENS + 2} (tokens of the whole pair, "
                             f"special tokens included), got {max_length!r}.")
        max_length = min(max_length, self.max_length)
        if query_max_length is None:
            return max_length, max_length * 3 // 4  # FlagReranker's default
        if not isinstance(query_max_length, int) or isinstance(query_max_length, bool) or query_max_length < 1:
            raise InputError(f"query_max_length must be a positive integer or None (3/4 of max_length), got "
                             f"{query_max_length!r}.")
        return max_length, query_max_length

    def _scores(self, pairs: list[tuple[str, str]], batch_size: Any, max_length: Any, query_max_length: Any,
                max_batch_tokens: Any) -> np.ndarray:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not isinstance(max_batch_tokens, int) or isinstance(max_batch_tokens, bool) or max_batch_tokens < 1:
            raise InputError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}.")
        max_length, qmax = self._check_lengths(max_length, query_max_length)
        stats = RerankStats(pairs=len(pairs))
        scores = np.zeros(len(pairs), dtype=np.float32)
        if not pairs:
            with self._stats_lock:
                self.last_stats = stats
            return scores
        queries = list(dict.fromkeys(q for q, _ in pairs))  # rerank: one query for many passages
        qids = dict(zip(queries, self._token_ids(queries)))
        pids = self._token_ids([p for _, p in pairs])
        ids = []
        for (q, _), p in zip(pairs, pids):
            x, cut = pair_ids(qids[q], p, self._cls, self._eos, max_length, qmax)
            ids.append(x)
            stats.truncated += cut
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        stats.tokens = int(lengths.sum())
        m = self.manifest
        batches = plan_batches(lengths, max(max_length, int(lengths.max())), batch_size, max_batch_tokens,
                               m.hidden_size, m.attention_heads, DEFAULT_MEMORY_MB * 2**20,
                               self.graph.linear_attention)
        feeds = (self._feed(b.indices, b.length, ids) for b in batches)
        runs = self._session.run_many(["score"], feeds) if isinstance(self._session, OpenVINOSession) else \
            (self._run(f) for f in feeds)
        for b, out in zip(batches, runs):
            scores[b.indices] = np.asarray(out[0], dtype=np.float32).reshape(-1)
            stats.padded_tokens += len(b.indices) * b.length
            stats.batch_shapes.append((len(b.indices), b.length))
        stats.batches = len(batches)
        with self._stats_lock:
            self.last_stats = stats
        return scores

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text without special tokens, untruncated; InputError for invalid Unicode."""
        try:
            encs = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        except TypeError:
            for k, t in enumerate(texts):
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise InputError(f"a query or passage (text {k} of this call) holds a lone surrogate "
                                     f"({t[err.start]!r} at position {err.start}): not valid Unicode. Clean it "
                                     f"first, e.g. t.encode('utf-8', 'replace').decode('utf-8').") from None
            raise
        return [e.ids for e in encs]

    def _feed(self, indices: np.ndarray, length: int, ids: list[list[int]]) -> dict[str, np.ndarray]:
        input_ids = np.full((len(indices), length), self._pad, dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for row, i in enumerate(indices):
            x = ids[i]
            input_ids[row, : len(x)] = x
            mask[row, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return list(self._session.run(["score"], feeds))
        except Exception as e:
            raise BackendError(f"inference failed on a batch of shape {feeds['input_ids'].shape}: "
                               f"{str(e).strip()[:400]}. If this is out of memory, lower batch_size or "
                               f"max_batch_tokens.") from None


def _is_pair(p: Any) -> bool:
    return isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(s, str) for s in p)


def _sigmoid(x: float) -> float:
    """FlagEmbedding's ``1 / (1 + exp(-x))`` in float64, without overflow for very negative logits."""
    x = float(x)
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
