"""The ASGI application: endpoints, limits, error bodies, readiness, draining and metrics.

Every error is ``{"error": {"message", "type", "code"}}`` with a message naming the limit and the value:
400 empty input / missing head, 401 API key, 404/405 routing, 413 payload / inputs / tokens per input or request,
422 malformed JSON or wrong types, 429 queue full or too many concurrent requests (with Retry-After),
503 not ready or shutting down, 500 only for server faults (inference failure, bugs).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import bge_edge
from bge_edge.runtime.batching import MAX_BATCH_TOKENS
from bge_edge.runtime.errors import ArtifactError, BackendError, BgeEdgeError, InputError

from .batcher import Job, MicroBatcher, QueueFull, Stopped
from .config import ServeConfig
from .engine import Engine
from .metrics import CONTENT_TYPE, SIZE_BUCKETS, Registry
from .openapi import build_spec
from .tei import TEI_PATHS, error_body, info_fields

__all__ = ["create_app", "ServeApp", "ServeState", "ApiError"]

log = logging.getLogger("bge_edge.serve")

INFERENCE = ("/v1/embeddings", "/embed_dense", "/embed_lexical", "/embed_colbert", "/embed_all", "/score",
             "/", "/embed", "/embed_sparse")  # the last three: TEI's (bge_edge.serve.tei)
RERANK = ("/rerank", "/v1/rerank")  # cross-encoder endpoints: a reranker artifact, or one beside the embedder
INFERENCE = INFERENCE + RERANK
PUBLIC = ("/health", "/ready", "/openapi.json")
ENDPOINTS = INFERENCE + PUBLIC + ("/info", "/metrics", "/v1/models", "/tokenize")
INLINE_TOKENIZE_CHARS = 20_000  # above this many characters, count tokens on a worker thread
# A body over --max-request-bytes is read and dropped before its 413 (a client still sending gets the answer,
# not a reset) up to this much and this long; beyond, the connection is closed as it stands.
DISCARD_BYTES = 256 << 20
DISCARD_SECONDS = 30.0
ARRIVING = "bge_edge.arriving"  # scope key: this request counts in ServeState.arriving
CLIENT_CLOSED = 499  # the status recorded for a client that disconnected mid-request (nginx's convention)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.type = status, code, message, type
        self.headers = headers or {}


class ServeState:
    """Everything the app, the middleware and the CLI's server share."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.batcher: MicroBatcher | None = None
        self.reranker: Any = None  # a RerankerEngine: the served model itself, or --reranker DIR beside it
        self.rerank_batcher: MicroBatcher | None = None
        self.rerank_limit = 0  # tokens per (query, passage) pair
        self.executor: ThreadPoolExecutor | None = None
        self.ready = False
        self.load_error: str | None = None
        self.draining = False
        self.drain_started = 0.0
        self.concurrent = 0       # HTTP requests in progress (any path)
        self.active = 0           # accepted inference requests not yet answered
        self.arriving = 0         # accepted inference requests not yet handed to the batcher
        self.accepted = 0
        self.finished = 0
        self.ok = 0
        self.refused_draining = 0
        self.model_name = config.model_name or ""
        self.on_fatal: Callable[[str], None] | None = None
        m = self.metrics = Registry()
        self.m_requests = m.counter("bge_edge_requests_total", "HTTP requests by endpoint and status code.",
                                    ("endpoint", "code"))
        self.m_errors = m.counter("bge_edge_errors_total", "Error responses by status code and error code.",
                                  ("status", "error"))
        self.m_latency = m.histogram("bge_edge_request_duration_seconds", "Request latency, end to end.",
                                     ("endpoint",))
        self.m_queue_wait = m.histogram("bge_edge_queue_wait_seconds", "Time a request waited for the model.")
        self.m_infer = m.histogram("bge_edge_inference_duration_seconds", "Time of one merged Embedder call.")
        self.m_batch_inputs = m.histogram("bge_edge_batch_inputs", "Texts per merged Embedder call.",
                                          buckets=SIZE_BUCKETS)
        self.m_batch_requests = m.histogram("bge_edge_batch_requests", "Requests merged into one Embedder call.",
                                            buckets=SIZE_BUCKETS)
        self.m_tokens = m.counter("bge_edge_tokens_total", "Input tokens processed (after truncation).",
                                  ("endpoint",))
        self.m_inputs = m.counter("bge_edge_inputs_total", "Texts processed (pairs count two).", ("endpoint",))
        self.m_truncated = m.counter("bge_edge_truncated_inputs_total", "Texts truncated to max_input_tokens.")
        self.m_disconnects = m.counter("bge_edge_client_disconnects_total",
                                       "Requests whose client disconnected before sending the whole body (code 499).",
                                       ("endpoint",))
        m.gauge("bge_edge_queue_depth", "Requests waiting for the model.",
                fn=lambda: self.batcher.queued_jobs if self.batcher else 0)
        m.gauge("bge_edge_queue_inputs", "Texts waiting for the model.",
                fn=lambda: self.batcher.pending_inputs if self.batcher else 0)
        m.gauge("bge_edge_inflight_requests", "Accepted inference requests not yet answered.", fn=lambda: self.active)
        m.gauge("bge_edge_ready", "1 when the model is loaded and warmed up and the server is not draining.",
                fn=lambda: 1 if self.ready and not self.draining else 0)
        self.m_info = m.gauge("bge_edge_model_info", "The loaded model (value 1).",
                              ("model", "kind", "precision", "backend"))

    def observe(self, name: str, value: float) -> None:
        {"queue_wait": self.m_queue_wait, "inference_seconds": self.m_infer, "batch_inputs": self.m_batch_inputs,
         "batch_requests": self.m_batch_requests}[name].observe(value)

    def begin_drain(self) -> None:
        """Stop taking inference requests (503); accepted ones finish. Called on SIGTERM/SIGINT."""
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()

    @property
    def idle(self) -> bool:
        return self.active == 0

    def error(self, e: ApiError, path: str = "") -> Response:
        """The error response; on TEI's paths in TEI's body ``{"error", "error_type"}``."""
        self.m_errors.inc(str(e.status), e.code)
        body: dict[str, Any] = error_body(e.status, e.code, e.message) if path in TEI_PATHS else \
            {"error": {"message": e.message, "type": e.type, "code": e.code}}
        return JSONResponse(body, status_code=e.status, headers=e.headers)


# ---- request parsing -----------------------------------------------------------------------------


def _type(v: Any) -> str:
    return "null" if v is None else {dict: "object", list: "array", str: "string", bool: "boolean",
                                     int: "integer", float: "number"}.get(type(v), type(v).__name__)


def _invalid(msg: str) -> ApiError:
    return ApiError(422, "invalid_type", msg)


async def _discard_body(request: Request) -> None:
    """Read and drop the rest of a refused body (at most DISCARD_BYTES / DISCARD_SECONDS), so the client, still
    sending, reads its 413 instead of a connection reset; the response then closes the connection."""
    seen = 0

    async def drain() -> None:
        nonlocal seen
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > DISCARD_BYTES:
                return

    try:
        await asyncio.wait_for(drain(), DISCARD_SECONDS)
    except (asyncio.TimeoutError, ClientDisconnect, RuntimeError):  # slow, gone, or the stream was consumed
        pass


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    cl = request.headers.get("content-length")
    close = {"Connection": "close"}
    if cl is not None and cl.isdigit() and int(cl) > limit:
        await _discard_body(request)
        raise ApiError(413, "payload_too_large", f"request body is {int(cl):,} bytes > max_request_bytes {limit:,} "
                                                 f"(server flag --max-request-bytes); send fewer or shorter texts",
                       headers=close)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            del chunks
            await _discard_body(request)
            raise ApiError(413, "payload_too_large", f"request body exceeds max_request_bytes {limit:,} (server "
                                                     f"flag --max-request-bytes); send fewer or shorter texts",
                           headers=close)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise ApiError(422, "invalid_json", "request body is empty; send a JSON object such as {\"input\": \"text\"}")
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, too deep, too many digits
        raise ApiError(422, "invalid_json", f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise _invalid(f"request body must be a JSON object, got {_type(obj)}")
    return obj


def _texts(body: dict[str, Any], names: tuple[str, ...], max_inputs: int) -> list[str]:
    present = [n for n in names if n in body]
    if not present:
        raise _invalid(f"missing field {names[0]!r}: a string or a list of strings")
    if len(present) > 1:
        raise _invalid(f"send either {present[0]!r} or {present[1]!r}, not both")
    name = present[0]
    v = body[name]
    if isinstance(v, str):
        items = [v]
    elif isinstance(v, list):
        items = v
    else:
        raise _invalid(f"{name!r} must be a string or a list of strings, got {_type(v)}")
    if not items:
        raise ApiError(400, "empty_input", f"{name!r} is an empty list; send at least one text")
    if len(items) > max_inputs:
        raise ApiError(413, "too_many_inputs", f"{name!r} holds {len(items):,} texts > max_inputs {max_inputs:,} "
                                               f"(server flag --max-inputs); split the request")
    for k, t in enumerate(items):
        if not isinstance(t, str):
            hint = " (token-id input is not supported: send text)" if isinstance(t, (int, list)) else ""
            raise _invalid(f"{name}[{k}] is {_type(t)}, not a string{hint}")
        if not t:
            raise ApiError(400, "empty_input", f"{name}[{k}] is an empty string; every text needs at least one "
                                               f"character")
    return items


def _refuse_token_ids(body: dict[str, Any]) -> None:
    """OpenAI's API also takes token ids (``[int]`` or ``[[int]]``, tiktoken's ids for OpenAI's models); this model's
    tokenizer is a different one, so embedding them would be silent garbage. LangChain's ``OpenAIEmbeddings`` sends
    them unless ``check_embedding_ctx_length=False``: say so."""
    v = body.get("input")
    if not (isinstance(v, list) and v):
        return
    first = v[0]
    def is_id(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if is_id(first) or (isinstance(first, list) and (not first or is_id(first[0]))):
        raise ApiError(422, "token_ids_unsupported",
                       "'input' holds token ids: token-id input is not supported, send text. Ids made by OpenAI's "
                       "tokenizer (tiktoken) mean other tokens to this model, so they would embed garbage. LangChain's "
                       "OpenAIEmbeddings sends tiktoken ids by default: create it with "
                       "OpenAIEmbeddings(..., check_embedding_ctx_length=False) to send text")


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _invalid(f"{name!r} must be true or false, got {_type(v)}")
    return v


def _weights(body: dict[str, Any]) -> list[float] | None:
    w = body.get("weights")
    if w is None:
        return None
    if not (isinstance(w, list) and len(w) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         for x in w)):
        raise _invalid(f"'weights' must be three numbers [w_dense, w_sparse, w_colbert], got {json.dumps(w)[:80]}")
    if not all(math.isfinite(x) and x >= 0 for x in w) or w[0] + w[1] <= 0:
        raise ApiError(400, "invalid_weights", f"'weights' must be finite numbers >= 0 with w_dense + w_sparse > 0 "
                                               f"(it divides 'sparse+dense'), got {json.dumps(w)[:80]}")
    return [float(x) for x in w]


def _pairs(body: dict[str, Any], max_inputs: int) -> list[tuple[str, str]]:
    if "pairs" not in body:
        raise _invalid("missing field 'pairs': a list of [query, passage] string pairs")
    v = body["pairs"]
    if not isinstance(v, list):
        raise _invalid(f"'pairs' must be a list of [query, passage] pairs, got {_type(v)}")
    if not v:
        raise ApiError(400, "empty_input", "'pairs' is an empty list; send at least one [query, passage] pair")
    if len(v) > max_inputs:
        raise ApiError(413, "too_many_inputs", f"'pairs' holds {len(v):,} pairs > max_inputs {max_inputs:,} "
                                               f"(server flag --max-inputs); split the request")
    out = []
    for k, p in enumerate(v):
        if not (isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p)):
            raise _invalid(f"pairs[{k}] must be a [query, passage] pair of strings, got {json.dumps(p)[:80]}")
        for s, what in zip(p, ("query", "passage")):
            if not s:
                raise ApiError(400, "empty_input", f"pairs[{k}] has an empty {what}")
        out.append((p[0], p[1]))
    return out


def _query(body: dict[str, Any]) -> str:
    if "query" not in body:
        raise _invalid("missing field 'query': a string")
    q = body["query"]
    if not isinstance(q, str):
        raise _invalid(f"'query' must be a string, got {_type(q)}")
    if not q:
        raise ApiError(400, "empty_input", "'query' is an empty string; it needs at least one character")
    return q


def _documents(body: dict[str, Any], max_inputs: int) -> list[str]:
    """Cohere/Jina ``documents``: strings, or objects with a ``text`` field (Jina)."""
    docs = body.get("documents")
    if isinstance(docs, list):
        docs = [d["text"] if isinstance(d, dict) and isinstance(d.get("text"), str) else d for d in docs]
    return _texts({"documents": docs} if "documents" in body else {}, ("documents",), max_inputs)


def _ranked(scores: list[float]) -> list[int]:
    """Indices best first; ties keep input order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _floats(a: Any) -> Any:
    """float32 arrays to JSON numbers; 8 decimals keep every float32 digit that matters (|x| <= 1)."""
    return np.round(np.asarray(a, dtype=np.float64), 8).tolist()


def _sparse_json(d: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 8) for k, v in d.items()}


# ---- the application ----------------------------------------------------------------------------


def create_app(config: ServeConfig, load: Callable[[], Engine],
               load_reranker: Callable[[], Any] | None = None) -> ServeApp:
    """The server app. ``load`` builds the engine; it runs on the inference thread after start-up, so
    /health answers at once and /ready turns 200 when the model is loaded and warmed up.

    An engine of kind ``reranker`` serves /rerank and /v1/rerank only; ``load_reranker`` adds a reranker beside
    an embedder (``--reranker DIR``): its own queue, the same inference thread, limits and metrics."""
    st = ServeState(config)

    async def _load() -> None:
        loop = asyncio.get_running_loop()
        try:
            assert st.executor is not None
            engine = await loop.run_in_executor(st.executor, load)
            cfg = st.config.check(engine.max_length)
            await loop.run_in_executor(st.executor, engine.warmup)
            st.config, st.engine = cfg, engine
            st.model_name = cfg.model_name or engine.model_id
            info = engine.info()
            st.m_info.set(1, st.model_name, engine.kind, str(info.get("precision")), str(info.get("backend")))
            st.batcher = MicroBatcher(engine, int(cfg.max_input_tokens or engine.max_length), st.executor,
                                      wait_ms=cfg.batch_wait_ms, max_merge_inputs=cfg.max_merge_inputs,
                                      max_merge_tokens=cfg.max_merge_tokens, max_queue_inputs=cfg.max_queue_inputs,
                                      observe=st.observe, arriving=lambda: st.arriving)
            st.batcher.start()
            if engine.kind == "reranker":
                st.reranker, st.rerank_batcher, st.rerank_limit = engine, st.batcher, st.batcher.max_length
            elif load_reranker is not None:
                rr = await loop.run_in_executor(st.executor, load_reranker)
                if rr.kind != "reranker":
                    raise ArtifactError(f"--reranker {cfg.reranker} holds a {rr.kind!r} model, not a reranker")
                await loop.run_in_executor(st.executor, rr.warmup)
                st.rerank_limit = int(rr.max_length)
                st.rerank_batcher = MicroBatcher(rr, st.rerank_limit, st.executor, wait_ms=cfg.batch_wait_ms,
                                                 max_merge_inputs=cfg.max_merge_inputs,
                                                 max_merge_tokens=cfg.max_merge_tokens,
                                                 max_queue_inputs=cfg.max_queue_inputs, observe=st.observe,
                                                 arriving=lambda: st.arriving)
                st.rerank_batcher.start()
                st.reranker = rr
            st.ready = True
            log.info("bge-edge: model %s ready (%s)", st.model_name, info.get("precision"))
            if not info.get("batch_invariant", True):
                log.warning("bge-edge: the %s graph uses per-batch activation scales (--int8-recipe dynamic, or an "
                            "artifact exported before per-token INT8): a text's vector depends on the requests "
                            "batched with it; re-export with the default recipe for batch-invariant int8",
                            info.get("precision"))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            msg = str(e) if isinstance(e, (BgeEdgeError, ValueError)) else f"{type(e).__name__}: {e}"
            st.load_error = msg
            log.error("bge-edge: cannot serve: %s", msg)
            if st.on_fatal is not None:
                st.on_fatal(msg)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        st.executor = ThreadPoolExecutor(1, thread_name_prefix="bge-edge-infer")
        loader = asyncio.get_running_loop().create_task(_load(), name="bge-edge-load")
        try:
            yield
        finally:
            st.ready = False
            if not loader.done():
                loader.cancel()
            if st.batcher is not None:
                await st.batcher.stop()
            if st.rerank_batcher is not None and st.rerank_batcher is not st.batcher:
                await st.rerank_batcher.stop()
            st.executor.shutdown(wait=False, cancel_futures=True)

    def engine() -> Engine:
        if st.engine is None or st.batcher is None:  # the gate lets no inference request through before
            raise ApiError(503, "not_ready", "the model is not loaded yet", "unavailable", {"Retry-After": "1"})
        if st.engine.kind == "reranker":
            raise ApiError(400, "no_embedding_model", f"this server serves the reranker {st.model_name} only: use "
                                                      f"POST /rerank or /v1/rerank, or serve an embedder with "
                                                      f"`bge-edge serve EMBEDDER_DIR --reranker RERANKER_DIR`")
        return st.engine

    def need_heads(endpoint: str) -> None:
        e = engine()
        if not {"sparse", "colbert"} <= set(e.heads):
            raise ApiError(400, "head_unavailable", f"{endpoint} needs the sparse and ColBERT heads of a BGE-M3 "
                                                    f"artifact; this server's model ({st.model_name}, kind {e.kind!r}) "
                                                    f"has only {list(e.heads)}. Use /embed or /v1/embeddings.")

    async def count(texts: list[str], truncate: bool) -> tuple[list[int], int]:
        e = engine()
        try:
            if sum(map(len, texts)) > INLINE_TOKENIZE_CHARS:
                counts = await asyncio.get_running_loop().run_in_executor(None, e.count_tokens, texts)
            else:
                counts = e.count_tokens(texts)
        except InputError as err:
            raise ApiError(422, "invalid_text", str(err)) from None
        limit = int(st.config.max_input_tokens or e.max_length)
        over = [(k, c) for k, c in enumerate(counts) if c > limit]
        if over and not truncate:
            k, c = over[0]
            more = f" ({len(over)} texts are over it)" if len(over) > 1 else ""
            least = "at least " if c > e.max_length else ""  # long texts are counted only until they are over
            raise ApiError(413, "input_too_long", f"text {k} has {least}{c:,} tokens > max_input_tokens {limit:,}"
                                                  f"{more}; shorten it or send \"truncate\": true")
        counts = [min(c, limit) for c in counts]
        total = sum(counts)
        if total > st.config.max_request_tokens:
            raise ApiError(413, "too_many_tokens", f"the request holds {total:,} tokens > max_request_tokens "
                                                   f"{st.config.max_request_tokens:,} (server flag "
                                                   f"--max-request-tokens); split it into smaller requests")
        return counts, len(over)

    async def submit(request: Request, job: Job, batcher: MicroBatcher | None = None) -> Any:
        batcher = batcher or st.batcher
        assert batcher is not None
        if request.scope.pop(ARRIVING, False):
            st.arriving -= 1
        try:
            fut = batcher.submit(job)
        except QueueFull as e:
            raise ApiError(429, "queue_full", str(e), "rate_limit_error", {"Retry-After": str(e.retry_after)}) \
                from None
        except Stopped as e:
            raise ApiError(503, "shutting_down", str(e), "unavailable") from None
        try:
            return await fut
        except Stopped as e:
            raise ApiError(503, "shutting_down", str(e), "unavailable") from None

    def account(endpoint: str, tokens: list[int], truncated: int) -> dict[str, int]:
        n = sum(tokens)
        st.m_tokens.inc(endpoint, by=n)
        st.m_inputs.inc(endpoint, by=len(tokens))
        if truncated:
            st.m_truncated.inc(by=truncated)
        return {"prompt_tokens": n, "total_tokens": n}

    # -- endpoints --

    async def openai_embeddings(request: Request) -> Response:
        body = await _read_json(request, st.config.max_request_bytes)
        _refuse_token_ids(body)
        texts = _texts(body, ("input",), st.config.max_inputs)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64", None):
            raise _invalid(f"'encoding_format' must be \"float\" or \"base64\", got {json.dumps(fmt)[:40]}")
        if "model" in body and not isinstance(body["model"], (str, type(None))):
            raise _invalid(f"'model' must be a string, got {_type(body['model'])}")
        dims = body.get("dimensions")
        e = engine()
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool)):
            raise _invalid(f"'dimensions' must be an integer, got {_type(dims)}")
        if dims is not None and dims != e.hidden_size:
            raise ApiError(400, "unsupported_dimensions", f"'dimensions' {dims} is not supported: this model "
                                                          f"outputs {e.hidden_size} dimensions only")
        tokens, truncated = await count(texts, _bool(body, "truncate", st.config.truncate))
        res = await submit(request, Job("encode", texts, tokens=sum(tokens), dense=True))
        vecs = np.asarray(res["dense_vecs"], dtype=np.float32)
        if fmt == "base64":
            emb: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vecs]
        else:
            emb = _floats(vecs)
        data = [{"object": "embedding", "index": i, "embedding": x} for i, x in enumerate(emb)]
        return JSONResponse({"object": "list", "data": data, "model": st.model_name,
                             "usage": account("/v1/embeddings", tokens, truncated)})

    def embed_endpoint(path: str, dense: bool, sparse: bool, colbert: bool) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            body = await _read_json(request, st.config.max_request_bytes)
            texts = _texts(body, ("inputs", "input"), st.config.max_inputs)
            truncate = _bool(body, "truncate", st.config.truncate)
            as_tokens = _bool(body, "return_tokens", False) if sparse else False
            if sparse or colbert:
                need_heads(path)
            tokens, truncated = await count(texts, truncate)
            res = await submit(request, Job("encode", texts, tokens=sum(tokens), dense=dense, sparse=sparse,
                                            colbert=colbert))
            out: dict[str, Any] = {"model": st.model_name}
            if dense:
                out["dense_vecs"] = _floats(res["dense_vecs"])
            if sparse:
                lw = list(res["lexical_weights"])
                if as_tokens:
                    lw = engine().id_to_token(lw)
                out["lexical_weights"] = [_sparse_json(d) for d in lw]
            if colbert:
                out["colbert_vecs"] = [_floats(v) for v in res["colbert_vecs"]]
            out["usage"] = account(path, tokens, truncated)
            out["truncated"] = truncated
            return JSONResponse(out)
        return handler

    async def score(request: Request) -> Response:
        body = await _read_json(request, st.config.max_request_bytes)
        pairs = _pairs(body, st.config.max_inputs)
        weights = _weights(body)
        truncate = _bool(body, "truncate", st.config.truncate)
        tokens, truncated = await count([s for p in pairs for s in p], truncate)
        res = await submit(request, Job("score", pairs=pairs, tokens=sum(tokens), weights=weights))
        scores = {k: [round(float(x), 8) for x in v] for k, v in res.items()}
        return JSONResponse({"model": st.model_name, "scores": scores, "usage": account("/score", tokens, truncated),
                             "truncated": truncated})

    def rerank_engine() -> tuple[Any, MicroBatcher]:
        if st.reranker is None or st.rerank_batcher is None:
            if st.engine is None:
                raise ApiError(503, "not_ready", "the model is not loaded yet", "unavailable", {"Retry-After": "1"})
            raise ApiError(400, "no_reranker", f"this server has no reranker (it serves {st.model_name}, kind "
                                               f"{st.engine.kind!r}): start it with --reranker RERANKER_DIR, or "
                                               f"serve a reranker artifact")
        return st.reranker, st.rerank_batcher

    async def rerank_scores(request: Request, path: str, query: str, texts: list[str],
                            truncate: bool) -> tuple[list[float], dict[str, int]]:
        """Raw scores of (query, text) pairs through the reranker's queue, with the embedders' limits (tokens
        per pair = query + text + 4 special tokens), and the usage to report."""
        rr, batcher = rerank_engine()
        try:
            if len(query) * len(texts) + sum(map(len, texts)) > INLINE_TOKENIZE_CHARS:
                counts = await asyncio.get_running_loop().run_in_executor(None, rr.count_pair_tokens, query, texts)
            else:
                counts = rr.count_pair_tokens(query, texts)
        except InputError as err:
            raise ApiError(422, "invalid_text", str(err)) from None
        limit = st.rerank_limit
        over = [(k, c) for k, c in enumerate(counts) if c > limit]
        if over and not truncate:
            k, c = over[0]
            more = f" ({len(over)} pairs are over it)" if len(over) > 1 else ""
            raise ApiError(413, "input_too_long", f"the query with text {k} has {c:,} tokens > the reranker's "
                                                  f"max_input_tokens {limit:,}{more}; shorten it or send "
                                                  f"\"truncate\": true")
        counts = [min(c, limit) for c in counts]
        if sum(counts) > st.config.max_request_tokens:
            raise ApiError(413, "too_many_tokens", f"the request holds {sum(counts):,} tokens (query + text, per "
                                                   f"text) > max_request_tokens {st.config.max_request_tokens:,} "
                                                   f"(server flag --max-request-tokens); split it into smaller "
                                                   f"requests")
        scores = await submit(request, Job("rerank", pairs=[(query, t) for t in texts], tokens=sum(counts)), batcher)
        return [float(x) for x in scores], account(path, counts, len(over))

    async def tei_rerank(request: Request) -> Response:
        body = await _read_json(request, st.config.max_request_bytes)
        query = _query(body)
        texts = _texts(body, ("texts",), st.config.max_inputs)
        raw, with_text = _bool(body, "raw_scores", False), _bool(body, "return_text", False)
        scores, _ = await rerank_scores(request, "/rerank", query, texts, _bool(body, "truncate", st.config.truncate))
        out = []
        for i in _ranked(scores):
            item: dict[str, Any] = {"index": i, "score": round(scores[i] if raw else _sigmoid(scores[i]), 8)}
            if with_text:
                item["text"] = texts[i]
            out.append(item)
        return JSONResponse(out)

    async def cohere_rerank(request: Request) -> Response:
        body = await _read_json(request, st.config.max_request_bytes)
        if "model" in body and not isinstance(body["model"], (str, type(None))):
            raise _invalid(f"'model' must be a string, got {_type(body['model'])}")
        query = _query(body)
        texts = _documents(body, st.config.max_inputs)
        top_n = body.get("top_n")
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool)):
            raise _invalid(f"'top_n' must be an integer, got {_type(top_n)}")
        if top_n is not None and top_n < 1:
            raise ApiError(400, "invalid_top_n", f"'top_n' must be >= 1, got {top_n}")
        with_docs = _bool(body, "return_documents", False)
        scores, usage = await rerank_scores(request, "/v1/rerank", query, texts,
                                            _bool(body, "truncate", st.config.truncate))
        results = []
        for i in _ranked(scores)[:top_n]:
            item: dict[str, Any] = {"index": i, "relevance_score": round(_sigmoid(scores[i]), 8)}
            if with_docs:
                item["document"] = {"text": texts[i]}
            results.append(item)
        return JSONResponse({"model": st.model_name if st.engine is st.reranker else st.reranker.model_id,
                             "results": results, "usage": usage})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if st.draining:
            raise ApiError(503, "shutting_down", "the server is shutting down", "unavailable")
        if st.load_error:
            raise ApiError(503, "load_failed", f"the model could not be loaded: {st.load_error}", "unavailable")
        if not st.ready:
            raise ApiError(503, "not_ready", "the model is loading or warming up; retry shortly", "unavailable",
                           {"Retry-After": "1"})
        return JSONResponse({"status": "ready", "model": st.model_name})

    async def info(request: Request) -> Response:
        cfg = st.config
        out: dict[str, Any] = info_fields(st)  # TEI's fields first, then bge-edge's
        out.update({"version": bge_edge.__version__, "ready": st.ready and not st.draining,
                    "model": st.model_name or None})
        if st.engine is not None:
            out.update(st.engine.info())
            out["model"] = st.model_name
        if st.reranker is not None and st.reranker is not st.engine:
            out["reranker"] = st.reranker.info()
        out["limits"] = {"max_request_bytes": cfg.max_request_bytes, "max_inputs": cfg.max_inputs,
                         "max_input_tokens": cfg.max_input_tokens, "max_request_tokens": cfg.max_request_tokens,
                         "truncate": cfg.truncate,
                         "max_queue_inputs": cfg.max_queue_inputs, "max_concurrent": cfg.max_concurrent}
        out["batching"] = {"batch_wait_ms": cfg.batch_wait_ms, "max_merge_inputs": cfg.max_merge_inputs,
                           "max_merge_tokens": cfg.max_merge_tokens,
                           "runtime_max_batch_tokens": MAX_BATCH_TOKENS}
        out["auth"] = "bearer" if cfg.api_key else None
        return JSONResponse(out)

    async def metrics(request: Request) -> Response:
        return Response(st.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(request: Request) -> Response:
        return JSONResponse(build_spec(bge_edge.__version__))

    async def models(request: Request) -> Response:
        name = st.model_name or None
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "bge-edge"}] if name else []
        return JSONResponse({"object": "list", "data": data})

    def guarded(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as e:
                return st.error(e, request.url.path)
            except ClientDisconnect:  # the client went away mid-body: not a server fault, nobody to answer
                st.m_disconnects.inc(request.url.path if request.url.path in ENDPOINTS else "other")
                log.info("client disconnected before sending its whole request to %s", request.url.path)
                return Response(status_code=CLIENT_CLOSED)
            except InputError as e:
                return st.error(ApiError(400, "invalid_input", str(e)), request.url.path)
            except ArtifactError as e:
                log.error("artifact error while serving %s: %s", request.url.path, e)
                return st.error(ApiError(500, "artifact_error", str(e), "server_error"), request.url.path)
            except BackendError as e:
                log.error("inference failed on %s: %s", request.url.path, e)
                return st.error(ApiError(500, "inference_failed", str(e), "server_error"), request.url.path)
            except Exception:
                log.exception("unexpected error on %s", request.url.path)
                return st.error(ApiError(500, "internal_error", "internal server error; see the server log",
                                         "server_error"), request.url.path)
        return wrapped

    routes = [
        Route("/v1/embeddings", guarded(openai_embeddings), methods=["POST"]),
        Route("/embed_dense", guarded(embed_endpoint("/embed_dense", True, False, False)), methods=["POST"]),
        Route("/embed_lexical", guarded(embed_endpoint("/embed_lexical", False, True, False)), methods=["POST"]),
        Route("/embed_colbert", guarded(embed_endpoint("/embed_colbert", False, False, True)), methods=["POST"]),
        Route("/embed_all", guarded(embed_endpoint("/embed_all", True, True, True)), methods=["POST"]),
        Route("/score", guarded(score), methods=["POST"]),
        Route("/rerank", guarded(tei_rerank), methods=["POST"]),
        Route("/v1/rerank", guarded(cohere_rerank), methods=["POST"]),
        Route("/health", guarded(health), methods=["GET"]),
        Route("/ready", guarded(ready), methods=["GET"]),
        Route("/info", guarded(info), methods=["GET"]),
        Route("/metrics", guarded(metrics), methods=["GET"]),
        Route("/openapi.json", guarded(openapi), methods=["GET"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
    ]
    from .tei import tei_routes  # TEI's /, /embed, /embed_sparse, /tokenize (its /info fields are in info above)

    routes += tei_routes(st, engine=engine, need_heads=need_heads, count=count, submit=submit, account=account,
                         rerank=tei_rerank,
                         guarded=guarded)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        msg = {404: f"no endpoint at {request.url.path[:100]!r}; see /openapi.json",
               405: f"{request.method} is not allowed on {request.url.path}; allowed: "
                    f"{(exc.headers or {}).get('Allow', '?')}"}.get(exc.status_code, str(exc.detail))
        return st.error(ApiError(exc.status_code, code, msg, headers=dict(exc.headers or {})), request.url.path)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.serve = st
    return ServeApp(app, st)


class ServeApp:
    """Outermost ASGI layer: concurrency limit, API key, draining and readiness, metrics per request."""

    def __init__(self, app: Starlette, st: ServeState) -> None:
        self.app, self.st = app, st
        self.serve = st  # the shared state: readiness, draining, counters, metrics

    def _refuse(self, scope: Scope, path: str) -> ApiError | None:
        st, cfg = self.st, self.st.config
        if st.concurrent > cfg.max_concurrent:
            return ApiError(429, "too_many_concurrent_requests",
                            f"{st.concurrent - 1} requests are in progress = max_concurrent {cfg.max_concurrent} "
                            f"(server flag --max-concurrent); retry shortly", "rate_limit_error", {"Retry-After": "1"})
        if cfg.api_key and path not in PUBLIC:
            got = b""
            for k, v in scope.get("headers", ()):
                if k == b"authorization":
                    got = v
            want = b"Bearer " + cfg.api_key.encode()
            if not hmac.compare_digest(got, want):
                what = "no Authorization header" if not got else "a wrong API key"
                return ApiError(401, "invalid_api_key", f"this server needs 'Authorization: Bearer <API key>'; the "
                                                        f"request had {what}", "authentication_error",
                                {"WWW-Authenticate": "Bearer"})
        if path in INFERENCE:
            if st.draining:
                st.refused_draining += 1
                return ApiError(503, "shutting_down", "the server is shutting down and takes no new requests",
                                "unavailable", {"Connection": "close"})
            if not st.ready:
                msg = f"the model could not be loaded: {st.load_error}" if st.load_error else \
                    "the model is loading or warming up; retry after 1 s"
                return ApiError(503, "not_ready", msg, "unavailable", {"Retry-After": "1"})
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st = self.st
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = 500
        t0 = time.perf_counter()

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        st.concurrent += 1
        try:
            refusal = self._refuse(scope, path)
            if refusal is not None:
                await st.error(refusal, path)(scope, receive, send_status)
                return
            accepted = path in INFERENCE
            if accepted:
                st.active += 1
                st.accepted += 1
                st.arriving += 1
                scope[ARRIVING] = True
            try:
                await self.app(scope, receive, send_status)
            finally:
                if accepted:
                    if scope.pop(ARRIVING, False):  # refused before reaching the batcher
                        st.arriving -= 1
                        if st.batcher is not None:
                            st.batcher.poke()
                    st.active -= 1
                    st.finished += 1
                    st.ok += status == 200
        finally:
            st.concurrent -= 1
            st.m_requests.inc(endpoint, str(status))
            st.m_latency.observe(time.perf_counter() - t0, endpoint)
