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
from typing import Any, Iterator, Sequence, Union

import numpy as np

from . import heads
from .batching import DEFAULT_BATCH_SIZE, DEFAULT_MEMORY_MB, LINEAR_ATTENTION_FROM, MAX_BATCH_TOKENS, plan_batches
from .errors import ArtifactError, BackendError, InputError
from .integrity import default_cache_dir, verify_files
from .manifest import Manifest, read_manifest
from .ov_session import SHAPES, OpenVINOSession
from .session import choose_backend, create_session, parse_device, physical_cores

__all__ = ["Embedder", "EncodeStats"]

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
    """

    def __init__(self, artifact_dir: str | os.PathLike[str], precision: str | None = None,
                 backend: str = "auto", device: str = "cpu", threads: int | None = None,
                 hash_cache: bool | str | os.PathLike[str] = True, spin: bool = False,
                 max_memory_mb: int | None = None, streams: int = 1, shapes: str = "dynamic") -> None:
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a positive integer or None (physical cores), got {threads!r}.")
        if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
            raise InputError(f"streams must be a positive integer (batches computing at once, OpenVINO), got "
                             f"{streams!r}.")
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
        kind, _ = parse_device(device)
        self.device = device
        self.backend, self.backend_reason = choose_backend(self.manifest, backend, device, precision)
        if streams > 1 and self.backend != "openvino":
            raise InputError(f"streams={streams} applies to the OpenVINO backend only; this embedder runs on "
                             f"{self.backend} ({self.backend_reason}).")
        if shapes not in SHAPES:
            raise InputError(f"shapes must be one of {list(SHAPES)}, got {shapes!r}.")
        if shapes != "dynamic" and self.backend != "openvino":
            raise InputError(f"shapes={shapes!r} applies to the OpenVINO backend only; this embedder runs on "
                             f"{self.backend} ({self.backend_reason}).")
        fmt = "openvino" if self.backend == "openvino" else "onnx"
        if precision is None:
            prefs = ("fp16", "fp32", "int8") if kind == "cuda" else ("int8", "fp32", "fp16")
            have = {g.precision for g in self.manifest.graphs if g.format == fmt}
            precision = next((p for p in prefs if p in have), None)
            if precision is None:
                raise ArtifactError(f"{self.root} has no {fmt} graph; re-export it with --format {fmt}.")
        self.graph = self.manifest.graph(precision, fmt)
        self.precision = precision
        cache = default_cache_dir() if hash_cache is True else (Path(hash_cache) if hash_cache else None)
        tok_path, graph_path, *data = verify_files(
            self.root, self.manifest, [self.manifest.tokenizer, self.graph.file, *self.graph.external_data], cache)
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:
            raise ArtifactError(f"cannot read {tok_path}: {e}") from None
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        if self.backend == "openvino":
            self._session: Any = OpenVINOSession(graph_path, data[0], precision, threads or physical_cores(), streams,
                                                        shapes)
        else:
            self._session = create_session(graph_path, device=device, threads=threads, spin=spin)
        self.providers: list[str] = list(self._session.get_providers())
        sp = self.manifest.special_tokens
        self._pad_id = int(sp.get("pad") or 0)
        self._unused = [v for k in ("cls", "eos", "pad", "unk") if (v := sp.get(k)) is not None]
        self.max_length = self.manifest.max_length
        self.last_stats = EncodeStats()
        self._stats_lock = threading.Lock()

    # ---- public API -------------------------------------------------------------------------

    def encode(self, texts: Texts, batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None,
               return_dense: bool = True, return_sparse: bool = False, return_colbert_vecs: bool = False,
               max_batch_tokens: int = MAX_BATCH_TOKENS, sort_by_length: bool = True) -> dict[str, Any]:
        """Encode ``texts``: ``{"dense_vecs", "lexical_weights", "colbert_vecs"}`` (None where not asked for).

        A single string gives unwrapped values (``(H,)`` array, one dict, one array); a list gives an
        ``(n, H)`` array and lists. Inputs longer than ``max_length`` tokens are truncated and counted
        in ``self.last_stats.truncated``.
        """
        single = isinstance(texts, str)
        items = self._check_texts(texts)
        self._check_heads(return_sparse, return_colbert_vecs)
        max_length = self._check_max_length(max_length)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
            raise InputError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}.")
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

    def encode_queries(self, queries: Texts, **kwargs: Any) -> dict[str, Any]:
        """``encode`` with the manifest's query instruction prepended (bge v1.5 English/Chinese; none for M3)."""
        instr = self.manifest.query_instruction
        if instr:
            items = self._check_texts(queries)
            queries = instr + queries if isinstance(queries, str) else [instr + q for q in items]
        return self.encode(queries, **kwargs)

    def encode_corpus(self, corpus: Texts, **kwargs: Any) -> dict[str, Any]:
        """``encode`` for passages (no instruction)."""
        return self.encode(corpus, **kwargs)

    def compute_score(self, sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str], batch_size: int = 256,
                      max_query_length: int = 512, max_passage_length: int = 8192,
                      weights_for_different_modes: Sequence[float] | None = None) -> dict[str, Any]:
        """FlagEmbedding's ``compute_score``: dense, sparse, colbert and weighted combinations per pair.

        Keys ``dense``, ``sparse``, ``colbert``, ``sparse+dense``, ``colbert+sparse+dense`` for M3
        artifacts (``dense`` only for dense artifacts); one pair gives floats, a list gives lists.
        """
        from bge_edge.kernels import colbert_score, combine_scores, lexical_matching_score

        single = isinstance(sentence_pairs, tuple) and len(sentence_pairs) == 2 and \
            all(isinstance(s, str) for s in sentence_pairs)
        pairs: list[Any] = [sentence_pairs] if single else list(sentence_pairs)
        for k, p in enumerate(pairs):
            if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(s, str) for s in p)):
                raise InputError(f"sentence_pairs[{k}] must be a (query, passage) pair of strings, got {p!r:.80}.")
        m3 = self.manifest.kind == "m3"
        ql = min(max_query_length, self.max_length)
        pl = min(max_passage_length, self.max_length)
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
        def one(d: dict[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for k, v in d.items():
                tok = self._tokenizer.id_to_token(int(k))
                if tok is None:
                    raise InputError(f"token id {k!r} is not in this model's vocabulary.")
                out[tok] = v
            return out

        if isinstance(lexical_weights, dict):
            return one(lexical_weights)
        return [one(d) for d in lexical_weights]

    def info(self) -> dict[str, Any]:
        """What is loaded: artifact, graph, backend, providers, limits."""
        m = self.manifest
        return {"artifact": str(self.root), "model_id": m.source.get("model_id"), "kind": m.kind,
                "heads": list(m.heads), "pooling": m.pooling, "hidden_size": m.hidden_size,
                "max_length": m.max_length, "precision": self.precision, "graph": self.graph.file,
                "backend": self.backend, "backend_reason": self.backend_reason, "device": self.device,
                "providers": self.providers,
                "accuracy": dict(self.graph.accuracy), "max_batch_tokens": MAX_BATCH_TOKENS,
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

    def _check_max_length(self, max_length: int | None) -> int:
        if max_length is None:
            return self.max_length
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 2 <= max_length:
            raise InputError(f"max_length must be an integer >= 2, got {max_length!r}.")
        return min(max_length, self.max_length)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, special tokens included, before truncation (e.g. for a server's limits)."""
        return [len(x) for x in self._token_ids(self._check_texts(list(texts)))]

    def _token_ids(self, items: list[str]) -> list[list[int]]:
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

    def _tokenize(self, items: list[str], max_length: int) -> list[Any]:
        out = []
        for x in self._token_ids(items):
            if len(x) > max_length:  # same as tokenizers' truncation: content cut, closing special kept
                x = _Truncated(x[: max_length - 1] + x[-1:])
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
