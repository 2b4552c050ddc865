"""``Embedder``: load a verified artifact and encode texts with FlagEmbedding's output semantics.

Tokenisation is the artifact's ``tokenizer.json`` through the ``tokenizers`` library, which equals
transformers 4.x fast tokenizers (transformers 5 rebuilds XLM-R tokenizers and differs on trailing
spaces and on special tokens written inside text). Truncation and padding are always set here, never
taken from the shipped tokenizer.json (all-MiniLM-L6-v2's own file truncates at 128).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union, overload

import numpy as np

from . import heads
from .batching import DEFAULT_BATCH_SIZE, DEFAULT_MEMORY_MB, LINEAR_ATTENTION_FROM, MAX_BATCH_TOKENS, plan_batches
from .errors import ArtifactError, BackendError, InputError
from .loading import open_graph
from .manifest import Manifest, read_manifest
from .ov_session import OpenVINOSession

__all__ = ["Embedder", "EncodeStats"]

# Long texts are tokenised only as far as the max length needs (Embedder._token_ids). Memory: tokenizers holds
# ~200 B per character read (373 MB for one 1.95 M-character text, XLM-R-style Unigram tokenizer), so an M3
# text (8,192 tokens) reads at most (8,192 + 16) * 8 = 66k characters (~13 MB) when it averages under 8
# characters per token (English ~4.5, CJK ~1.5), and never more than 8,192 * 32 = 262k characters (~50 MB)
# whatever it holds; a 512-token model at most 4k-16k characters (1-3 MB).
CHARS_PER_TOKEN_FIRST = 8    # the first prefix read: this many characters per token wanted
MAX_CHARS_PER_TOKEN = 32     # characters per token beyond which a text is cut unread (counted as truncated)
TRUNCATION_MARGIN = 16       # tokens read past the limit, so that the cut word never reaches the kept tokens

Texts = Union[str, Sequence[str]]


@dataclass
class EncodeStats:
    """What the last ``encode`` call did: counts, truncations, padding, batches."""

    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    truncated: int = 0
    batches: int = 0
    batch_shapes: list[tuple[int, int]] = field(default_factory=list)


class Embedder:
    """Encode texts with a bge-edge artifact folder; same outputs as FlagEmbedding's BGEM3FlagModel.

    ``backend`` "auto" runs the artifact's OpenVINO graphs when openvino is installed and the device is the
    CPU, else ONNX Runtime (``backend_reason`` says why). ``precision`` None picks int8 on CPU (else fp32)
    and fp16 on CUDA (else fp32). OpenVINO only: ``streams`` batches compute at once; ``shapes="bucket"`` adds
    a compiled plan per bucket length (1.09-1.10x once warm, ~0.5 s and ~95 MB per new length on MiniLM:
    for long-running processes).
    Every file the embedder reads is checked against the manifest's size and SHA-256 before any session exists;
    ``hash_cache`` (True: the user cache dir, False: re-hash every time, or a folder) keeps that cheap.
    ``query_max_length`` / ``passage_max_length`` are FlagEmbedding's constructor arguments: the default
    ``max_length`` of ``encode_queries`` (and of ``compute_score``'s queries) and of ``encode``/``encode_corpus``
    (and passages). None means the model's own length (8,192 for BGE-M3); FlagEmbedding's default is 512 for both,
    so code ported from it passes 512 to get the same numbers.
    """

    def __init__(self, artifact_dir: str | os.PathLike[str], precision: str | None = None,
                 backend: str = "auto", device: str = "cpu", threads: int | None = None,
                 hash_cache: bool | str | os.PathLike[str] = True, spin: bool = False,
                 max_memory_mb: int | None = None, streams: int = 1, shapes: str = "dynamic",
                 query_max_length: int | None = None, passage_max_length: int | None = None) -> None:
        if max_memory_mb is not None and (not isinstance(max_memory_mb, int) or isinstance(max_memory_mb, bool)
                                          or max_memory_mb < 1):
            raise InputError(f"max_memory_mb must be a positive integer (MiB of working memory per batch, weights "
                             f"excluded) or None ({DEFAULT_MEMORY_MB} MiB, never refusing a text), got "
                             f"{max_memory_mb!r}.")
        self.max_memory_mb = max_memory_mb
        self.root = Path(artifact_dir)
        self.manifest: Manifest = read_manifest(self.root)
        if self.manifest.kind == "reranker":
            raise ArtifactError(f"{self.root} is a reranker ({self.manifest.source.get('model_id')}), not an embedding "
                                f"model: use bge_edge.runtime.Reranker.")
        self.device = device
        g = open_graph(self.root, self.manifest, precision=precision, backend=backend, device=device, threads=threads,
                       hash_cache=hash_cache, spin=spin, streams=streams, shapes=shapes)
        self.backend, self.backend_reason = g.backend, g.backend_reason
        self.graph, self.precision = g.graph, g.precision
        self._tokenizer, self._session, self.providers = g.tokenizer, g.session, g.providers
        self._check_declared_outputs()
        sp = self.manifest.special_tokens
        self._pad_id = int(sp.get("pad") or 0)
        self._unused = [v for k in ("cls", "eos", "pad", "unk") if (v := sp.get(k)) is not None]
        self.max_length = self.manifest.max_length
        self.query_max_length = self._check_max_length(query_max_length, "query_max_length")
        self.passage_max_length = self._check_max_length(passage_max_length, "passage_max_length")
        self.last_stats = EncodeStats()
        self._stats_lock = threading.Lock()

    # ---- public API -------------------------------------------------------------------------

    def encode(self, texts: Texts, batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None,
               return_dense: bool = True, return_sparse: bool = False, return_colbert_vecs: bool = False,
               max_batch_tokens: int = MAX_BATCH_TOKENS, sort_by_length: bool = True) -> dict[str, Any]:
        """Encode ``texts``: ``{"dense_vecs", "lexical_weights", "colbert_vecs"}`` (None where not asked for).

        A single string gives unwrapped values (``(H,)`` array, one dict, one array); a list gives an
        ``(n, H)`` array and lists. Inputs longer than ``max_length`` tokens (default ``passage_max_length``,
        as in FlagEmbedding) are truncated and counted in ``self.last_stats.truncated``.
        """
        single = isinstance(texts, str)
        items = self._check_texts(texts)
        for name, flag in (("return_dense", return_dense), ("return_sparse", return_sparse),
                           ("return_colbert_vecs", return_colbert_vecs), ("sort_by_length", sort_by_length)):
            if not isinstance(flag, (bool, np.bool_)):
                raise InputError(f"{name} must be True or False, got {flag!r:.40}.")
        self._check_heads(return_sparse, return_colbert_vecs)
        max_length = self.passage_max_length if max_length is None else self._check_max_length(max_length)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r:.40}.")
        if not isinstance(max_batch_tokens, int) or isinstance(max_batch_tokens, bool) or max_batch_tokens < 1:
            raise InputError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r:.40}.")
        ids = self._tokenize(items, max_length)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        stats = EncodeStats(texts=len(items), tokens=int(lengths.sum()),
                            truncated=int(sum(1 for x in ids if getattr(x, "truncated", False))))
        H = self.manifest.hidden_size
        dense = np.zeros((len(items), H), dtype=np.float32) if return_dense else None
        sparse: list[Any] = [None] * len(items) if return_sparse else []
        colbert: list[Any] = [None] * len(items) if return_colbert_vecs else []
        outputs = (["dense"] if return_dense else []) + (["sparse"] if return_sparse else []) + \
                  (["colbert"] if return_colbert_vecs else [])
        if not outputs:
            raise InputError("nothing to compute: set at least one of return_dense, return_sparse, "
                             "return_colbert_vecs.")
        budget = (self.max_memory_mb or DEFAULT_MEMORY_MB) * 2**20
        linear = self.graph.linear_attention
        batches = plan_batches(lengths, max_length, batch_size, max_batch_tokens, H, self.manifest.attention_heads,
                               budget, linear, sort=sort_by_length)
        over = next((b for b in batches if b.working_bytes > budget), None) if self.max_memory_mb else None
        if over is not None:
            k = int(over.indices[0])
            raise InputError(
                f"texts[{k}] has {int(lengths[k])} tokens: it needs ~{over.working_bytes / 2**20:,.0f} MiB of working "
                f"memory, over max_memory_mb={self.max_memory_mb}. Raise max_memory_mb or pass a smaller "
                f"max_length" + ("." if linear else "; a BGE-M3 artifact exported by this version of "
                                 "bge-edge needs much less for long texts (linear-memory attention)."))
        feeds = (self._feed(b.indices, b.length, ids) for b in batches)
        for b, out in zip(batches, self._run_many(outputs, feeds)):
            res = dict(zip(outputs, out))
            self._check_outputs(res, b.indices, b.length)
            stats.padded_tokens += len(b.indices) * b.length
            stats.batch_shapes.append((len(b.indices), b.length))
            for row, i in enumerate(b.indices):
                n = int(lengths[i])
                if dense is not None:
                    dense[i] = res["dense"][row]
                if return_sparse:
                    sparse[i] = heads.lexical_weights(np.asarray(ids[i], dtype=np.int64), res["sparse"][row, :n],
                                                      self._unused)
                if return_colbert_vecs:
                    colbert[i] = heads.colbert_rows(res["colbert"][row], n)
        stats.batches = len(batches)
        with self._stats_lock:
            self.last_stats = stats
        if single:
            return {"dense_vecs": None if dense is None else dense[0],
                    "lexical_weights": sparse[0] if return_sparse else None,
                    "colbert_vecs": colbert[0] if return_colbert_vecs else None}
        return {"dense_vecs": dense, "lexical_weights": sparse if return_sparse else None,
                "colbert_vecs": colbert if return_colbert_vecs else None}

    def encode_queries(self, queries: Texts, max_length: int | None = None, **kwargs: Any) -> dict[str, Any]:
        """``encode`` with the manifest's query instruction prepended (bge v1.5 English/Chinese; none for M3),
        truncated at ``query_max_length`` unless ``max_length`` is given."""
        instr = self.manifest.query_instruction
        if instr:
            items = self._check_texts(queries)
            queries = instr + queries if isinstance(queries, str) else [instr + q for q in items]
        return self.encode(queries, max_length=self.query_max_length if max_length is None else max_length, **kwargs)

    def encode_corpus(self, corpus: Texts, **kwargs: Any) -> dict[str, Any]:
        """``encode`` for passages (no instruction)."""
        return self.encode(corpus, **kwargs)

    def compute_score(self, sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str], batch_size: int = 256,
                      max_query_length: int | None = None, max_passage_length: int | None = None,
                      weights_for_different_modes: Sequence[float] | None = None) -> dict[str, Any]:
        """FlagEmbedding's ``compute_score``: dense, sparse, colbert and weighted combinations per pair.

        Keys ``dense``, ``sparse``, ``colbert``, ``sparse+dense``, ``colbert+sparse+dense`` for M3
        artifacts (``dense`` only for dense artifacts); one pair gives floats, a list gives lists. Queries and
        passages are truncated at ``max_query_length`` / ``max_passage_length`` (default: the constructor's
        ``query_max_length`` / ``passage_max_length``). No query instruction is added, as in FlagEmbedding.
        """
        from bge_edge.kernels import colbert_score, combine_scores, lexical_matching_score

        single = isinstance(sentence_pairs, tuple) and len(sentence_pairs) == 2 and \
            all(isinstance(s, str) for s in sentence_pairs)
        pairs: list[Any] = [sentence_pairs] if single else list(sentence_pairs)
        for k, p in enumerate(pairs):
            if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(s, str) for s in p)):
                raise InputError(f"sentence_pairs[{k}] must be a (query, passage) pair of strings, got {p!r:.80}.")
        m3 = self.manifest.kind == "m3"
        ql = self.query_max_length if max_query_length is None else \
            self._check_max_length(max_query_length, "max_query_length")
        pl = self.passage_max_length if max_passage_length is None else \
            self._check_max_length(max_passage_length, "max_passage_length")
        q = self.encode([p[0] for p in pairs], batch_size=batch_size, max_length=ql, return_sparse=m3,
                        return_colbert_vecs=m3)
        d = self.encode([p[1] for p in pairs], batch_size=batch_size, max_length=pl, return_sparse=m3,
                        return_colbert_vecs=m3)
        dense = np.einsum("ij,ij->i", q["dense_vecs"], d["dense_vecs"]).astype(np.float32)
        if not m3:
            scores: dict[str, Any] = {"dense": dense}
        else:
            sparse = np.array([lexical_matching_score(a, b) for a, b in zip(q["lexical_weights"],
                                                                           d["lexical_weights"])], dtype=np.float32)
            col = np.array([colbert_score(a, b) for a, b in zip(q["colbert_vecs"], d["colbert_vecs"])],
                           dtype=np.float32)
            w = [1.0, 1.0, 1.0] if weights_for_different_modes is None else list(weights_for_different_modes)
            scores = combine_scores(dense, sparse, col, weights=w)
        if single:
            return {k: float(v[0]) for k, v in scores.items()}
        return {k: [float(x) for x in v] for k, v in scores.items()}

    def convert_id_to_token(self, lexical_weights: dict[str, Any] | list[dict[str, Any]]) -> Any:
        """Replace token-id keys by token strings (FlagEmbedding's helper), for reading sparse output."""
        def one(d: Any, where: str) -> dict[str, Any]:
            if not isinstance(d, dict):
                raise InputError(f"{where} must be a dict of token id -> weight (lexical_weights from encode), got "
                                 f"{type(d).__name__}.")
            out: dict[str, Any] = {}
            for k, v in d.items():
                key = k if isinstance(k, str) else None
                tid = int(key) if key is not None and key.isascii() and key.isdigit() and len(key) < 12 else \
                    (k if isinstance(k, int) and not isinstance(k, bool) else -1)
                tok = self._tokenizer.id_to_token(tid) if 0 <= tid < 2**31 else None
                if tok is None:
                    raise InputError(f"{where} key {k!r:.40} is not a token id of this model's vocabulary (keys are "
                                     f"ids as strings, e.g. '{self._pad_id}', as encode returns them).")
                out[tok] = v
            return out

        if isinstance(lexical_weights, dict):
            return one(lexical_weights, "lexical_weights")
        if isinstance(lexical_weights, (str, bytes)) or not isinstance(lexical_weights, (list, tuple)):
            raise InputError(f"lexical_weights must be a dict or a list of dicts (encode's lexical_weights), got "
                             f"{type(lexical_weights).__name__}.")
        return [one(d, f"lexical_weights[{i}]") for i, d in enumerate(lexical_weights)]

    def info(self) -> dict[str, Any]:
        """What is loaded: artifact, graph, backend, providers, limits."""
        m = self.manifest
        return {"artifact": str(self.root), "model_id": m.source.get("model_id"), "kind": m.kind,
                "heads": list(m.heads), "pooling": m.pooling, "hidden_size": m.hidden_size,
                "max_length": m.max_length, "precision": self.precision, "graph": self.graph.file,
                "backend": self.backend, "backend_reason": self.backend_reason, "device": self.device,
                "providers": self.providers, "accuracy": dict(self.graph.accuracy),
                "batch_invariant": self.graph.batch_invariant, "max_batch_tokens": MAX_BATCH_TOKENS,
                "max_memory_mb": self.max_memory_mb or DEFAULT_MEMORY_MB,
                "long_inputs": (f"over {LINEAR_ATTENTION_FROM} tokens: alone, unpadded, flash attention (linear memory)"
                                if self.graph.linear_attention else "padded batches, full attention matrix")}

    # ---- internals ----------------------------------------------------------------------------

    def _check_texts(self, texts: Any) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        if texts is None or isinstance(texts, (bytes, bytearray, dict)) or not hasattr(texts, "__iter__"):
            raise InputError(f"texts must be a string or a list of strings, got {type(texts).__name__}.")
        items = list(texts)
        for k, t in enumerate(items):
            if not isinstance(t, str):
                hint = " (decode bytes first: b.decode('utf-8'))" if isinstance(t, (bytes, bytearray)) else ""
                raise InputError(f"texts[{k}] is {type(t).__name__}, not str{hint}; every item must be a string.")
        return items

    def _check_heads(self, sparse: bool, colbert: bool) -> None:
        missing = [h for h, want in (("sparse", sparse), ("colbert", colbert)) if want and h not in self.manifest.heads]
        if missing:
            raise ArtifactError(f"this artifact ({self.manifest.source.get('model_id')}, kind "
                                f"{self.manifest.kind!r}) has only the {list(self.manifest.heads)} head(s); "
                                f"{missing} output(s) need a BGE-M3 artifact. Set return_sparse/"
                                f"return_colbert_vecs to False.")

    def _check_max_length(self, max_length: int | None, name: str = "max_length") -> int:
        """A length limit in tokens, clipped to the model's own (None: the model's own)."""
        if max_length is None:
            return self.max_length
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 2 <= max_length:
            raise InputError(f"{name} must be an integer >= 2 (tokens) or None (the model's own, "
                             f"{self.max_length}), got {max_length!r:.40}.")
        return min(max_length, self.max_length)

    @overload
    def count_tokens(self, texts: str, limit: int | None = None) -> int: ...  # type: ignore[overload-overlap]

    @overload
    def count_tokens(self, texts: Sequence[str], limit: int | None = None) -> list[int]: ...

    def count_tokens(self, texts: Texts, limit: int | None = None) -> int | list[int]:
        """Tokens per text, special tokens included, before truncation (e.g. for a server's limits).

        A single string gives one count, a list a list of counts. ``limit`` bounds the work for long texts
        (see ``_token_ids``): counts up to ``limit`` are exact, a count above it only says the text is over
        (it is a lower bound, and a text longer than ``limit * MAX_CHARS_PER_TOKEN`` characters counts as
        ``limit + 1`` unless its first characters already hold more tokens).
        """
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 2):
            raise InputError(f"limit must be an integer >= 2 or None, got {limit!r:.40}.")
        counts = []
        for x in self._token_ids(self._check_texts(texts), limit):
            counts.append(max(len(x), limit + 1) if limit is not None and getattr(x, "capped", False) else len(x))
        return counts[0] if isinstance(texts, str) else counts

    def _encode_all(self, items: list[str]) -> list[list[int]]:
        """Token ids of each text, untruncated; InputError naming the text for invalid Unicode."""
        try:
            encs = self._tokenizer.encode_batch(items)
        except TypeError:
            for k, t in enumerate(items):
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise InputError(f"texts[{k}] holds a lone surrogate ({t[err.start]!r} at position "
                                     f"{err.start}): not valid Unicode. Clean it first, e.g. "
                                     f"t.encode('utf-8', 'replace').decode('utf-8').") from None
            raise
        return [enc.ids for enc in encs]

    def _token_ids(self, items: list[str], limit: int | None = None) -> list[Any]:
        """Token ids of each text; with ``limit``, long texts are tokenised only as far as needed.

        Tokenising costs memory and time in proportion to the characters read (tokenizers keeps offsets and
        alignments per character: ~200 bytes each, measured), so a text longer than ``(limit + margin) *
        CHARS_PER_TOKEN_FIRST`` characters is tokenised by prefixes, cut at whitespace and doubled until they
        hold ``limit + TRUNCATION_MARGIN`` tokens (then the first ``limit`` tokens are those of the whole text)
        or reach the text's end, and never beyond ``limit * MAX_CHARS_PER_TOKEN`` characters (``_Prefix``,
        ``capped``: the rest of the text is not read).
        """
        if limit is None:
            return self._encode_all(items)
        need = limit + TRUNCATION_MARGIN
        first, cap = need * CHARS_PER_TOKEN_FIRST, limit * MAX_CHARS_PER_TOKEN
        out: list[Any] = [None] * len(items)
        short = [k for k, t in enumerate(items) if len(t) <= first]
        for k, ids in zip(short, self._encode_all([items[k] for k in short])):
            out[k] = ids
        for k, text in enumerate(items):
            if out[k] is not None:
                continue
            width = first
            while True:
                cut = _cut_at_space(text, width)
                if len(cut) == len(text):  # the prefix reached the end: the whole text
                    out[k] = self._encode_all([text])[0]
                    break
                ids = self._encode_all([cut])[0]
                if len(ids) >= need or width >= cap:
                    out[k] = _Prefix(ids, capped=len(ids) < need)
                    break
                width = min(2 * width, cap)
        return out

    def _tokenize(self, items: list[str], max_length: int) -> list[Any]:
        out = []
        for x in self._token_ids(items, max_length):
            if len(x) > max_length or getattr(x, "capped", False):
                # same as tokenizers' truncation: content cut, closing special kept
                x = _Truncated(x[: max_length - 1] + x[-1:] if len(x) > max_length else x)
            out.append(x)
        return out

    def _feed(self, indices: np.ndarray, length: int, ids: list[Any]) -> dict[str, np.ndarray]:
        """The padded ``input_ids`` / ``attention_mask`` of one batch."""
        input_ids = np.full((len(indices), length), self._pad_id, dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for row, i in enumerate(indices):
            x = ids[i]
            input_ids[row, : len(x)] = x
            mask[row, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def _expected_shapes(self, rows: int | None, length: int | None) -> dict[str, tuple[int | None, ...]]:
        H = self.manifest.hidden_size
        return {"dense": (rows, H), "sparse": (rows, length),
                "colbert": (rows, None if length is None else length - 1, H)}

    def _mismatch(self, name: str, got: Any, want: tuple[int | None, ...]) -> ArtifactError:
        shown = tuple("?" if d is None else d for d in want)
        return ArtifactError(f"the graph {self.graph.file} ({self.graph.format}/{self.precision}) has a {name!r} "
                             f"output of shape {got}, but its manifest says {shown} (hidden_size "
                             f"{self.manifest.hidden_size}): the graph does not belong to this manifest. Re-export "
                             f"the artifact.")

    def _check_declared_outputs(self) -> None:
        """Once at load: the graph has the outputs the manifest's heads need, of the manifest's width."""
        get_outputs = getattr(self._session, "get_outputs", None)
        if get_outputs is None:  # OpenVINO: shapes are checked on every batch (_check_outputs)
            return
        declared = {o.name: list(o.shape or []) for o in get_outputs()}
        for name, want in self._expected_shapes(None, None).items():
            if name not in self.manifest.heads:
                continue
            if name not in declared:
                raise ArtifactError(f"the graph {self.graph.file} has no {name!r} output (it has "
                                    f"{sorted(declared)}), but its manifest lists the {name} head. Re-export the "
                                    f"artifact.")
            got = declared[name]
            if len(got) != len(want) or any(isinstance(g, int) and w is not None and g != w
                                            for g, w in zip(got, want)):
                raise self._mismatch(name, tuple(got), want)

    def _check_outputs(self, res: dict[str, np.ndarray], indices: np.ndarray, length: int) -> None:
        """Every batch: outputs of the expected shapes, and finite (a NaN would become invalid JSON downstream)."""
        for name, arr in res.items():
            want = self._expected_shapes(len(indices), length)[name]
            if arr.shape != want:
                raise self._mismatch(name, arr.shape, want)
            finite = np.isfinite(arr)
            if not finite.all():
                bad = indices[~finite.reshape(len(indices), -1).all(axis=1)]
                which = ", ".join(f"texts[{int(i)}]" for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
                raise BackendError(f"the model produced NaN or infinite values in its {name!r} output for {which} "
                                   f"({self.graph.format}/{self.precision} graph {self.graph.file}); refusing to "
                                   f"return them. The graph is broken or overflows at this precision: try "
                                   f"precision='fp32', or re-export the artifact.")

    def _run_many(self, outputs: list[str], feeds: Iterator[dict[str, np.ndarray]]) -> Iterator[list[np.ndarray]]:
        if isinstance(self._session, OpenVINOSession):
            return self._session.run_many(outputs, feeds)  # keeps `streams` batches in flight
        return (self._run(outputs, f) for f in feeds)

    def _run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._session.run(outputs, feeds)
        except Exception as e:
            raise BackendError(f"inference failed on a batch of shape {feeds['input_ids'].shape}: "
                               f"{str(e).strip()[:400]}. If this is out of memory, lower batch_size or "
                               f"max_batch_tokens.") from None


class _Truncated(list):  # type: ignore[type-arg]
    """Token ids of a text that was cut at max_length."""

    truncated = True


class _Prefix(list):  # type: ignore[type-arg]
    """Token ids of the start of a text (``_token_ids``); ``capped``: the text was cut at the character bound
    before it reached ``limit + TRUNCATION_MARGIN`` tokens."""

    def __init__(self, ids: list[int], capped: bool) -> None:
        super().__init__(ids)
        self.capped = capped


def _cut_at_space(text: str, width: int) -> str:
    """``text[:width]``, shortened to end before its last whitespace in the second half (a word is not split, so
    the pre-tokeniser sees the same words as in the whole text); a text without one there is cut at ``width``."""
    if len(text) <= width:
        return text
    head = text[:width]
    for k in range(width - 1, width // 2, -1):
        if head[k].isspace():
            return head[:k]
    return head
