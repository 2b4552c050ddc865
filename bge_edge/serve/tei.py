"""Hugging Face text-embeddings-inference (TEI) routes, so clients written for TEI's HTTP API work unchanged
(tests/test_tei.py runs ``huggingface_hub.InferenceClient.feature_extraction`` against them).

TEI's request fields and response shapes, on TEI's paths:

  POST /              dispatched by the loaded model's kind, as TEI does (embedder -> /embed)
  POST /embed         {"inputs": str | [str], "truncate"?, "truncation_direction"?, "normalize"?, "prompt_name"?,
                      "dimensions"?} -> [[float]] (always a list of vectors, also for one string)
  POST /embed_sparse  same request (no normalize/dimensions) -> [[{"index": token id, "value": weight}]] (BGE-M3
                      lexical weights: one entry per distinct token, sorted by index)
  POST /tokenize      {"inputs": str | [str], "add_special_tokens"? (true), "prompt_name"?} ->
                      [[{"id", "text", "special", "start", "stop"}]]: start/stop are UTF-8 byte offsets into the
                      (prompted) input and null for special tokens, whose text is the token itself
  GET  /info          TEI's fields (model_id, model_sha, model_dtype, model_type, max_input_length, ...) beside
                      bge-edge's own (precision, backend, limits, batching)

Errors on these paths use TEI's body ``{"error": message, "error_type": ...}`` with TEI's error types (Validation,
Tokenizer, Empty, Overloaded, Unhealthy, Backend); the status codes are bge-edge's (see ``bge_edge.serve.app``).
What TEI does and bge-edge refuses, with a 422 naming the field: token-id inputs, ``normalize: false`` (the graphs
output L2-normalised vectors only), ``truncation_direction: "left"``, ``dimensions`` other than the model's.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import numpy as np

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["TEI_PATHS", "error_body", "info_fields", "tei_routes"]

TEI_PATHS = frozenset({"/", "/embed", "/embed_sparse", "/tokenize", "/info"})

Handler = Callable[["Request"], Awaitable["Response"]]


def error_type(status: int, code: str) -> str:
    """TEI's ``error_type`` for one of bge-edge's error codes."""
    if code in ("invalid_text",):
        return "Tokenizer"
    if code == "empty_input":
        return "Empty"
    if status == 429:
        return "Overloaded"
    if status == 503:
        return "Unhealthy"
    if status >= 500:
        return "Backend"
    if status == 401:
        return "Unauthorized"
    return "Validation"


def error_body(status: int, code: str, message: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type(status, code)}


_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8", "bf16": "bfloat16"}


def info_fields(st: Any) -> dict[str, Any]:
    """TEI's ``/info`` fields for the server state ``st`` (a ``ServeState``); null where not loaded yet."""
    cfg, e = st.config, st.engine
    info: dict[str, Any] = e.info() if e is not None else {}
    source = getattr(getattr(getattr(e, "embedder", None), "manifest", None), "source", None) or {}
    max_input = cfg.max_input_tokens or (e.max_length if e is not None else None)
    return {
        "model_id": st.model_name or None,
        "model_sha": source.get("revision"),
        "model_dtype": _DTYPES.get(str(info.get("precision")), info.get("precision")),
        "model_type": {"embedding": {"pooling": info.get("pooling") or "cls"}} if e is not None else None,
        "max_concurrent_requests": cfg.max_concurrent,
        "max_input_length": max_input,
        "max_batch_tokens": cfg.max_merge_tokens,
        "max_batch_requests": None,
        "max_client_batch_size": cfg.max_inputs,
        "auto_truncate": cfg.truncate,
        "tokenization_workers": 1,
        "sha": None,
        "docker_label": None,
    }


def _byte_offsets(text: str) -> np.ndarray:
    """``b[i]`` = UTF-8 byte offset of character ``i`` of ``text`` (``len(text) + 1`` entries)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    width = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)])


def tokens_json(text: str, ids: list[int], tokens: list[str], offsets: list[tuple[int, int]],
                special: list[int]) -> list[dict[str, Any]]:
    """One text's tokens in TEI's ``/tokenize`` shape (character offsets in, byte offsets out)."""
    b = _byte_offsets(text)
    out = []
    for i, tok, (s, t), sp in zip(ids, tokens, offsets, special):
        if sp:
            out.append({"id": int(i), "text": tok, "special": True, "start": None, "stop": None})
        else:
            out.append({"id": int(i), "text": text[s:t], "special": False, "start": int(b[s]), "stop": int(b[t])})
    return out


def tei_routes(st: Any, *, engine: Callable[[], Any], need_heads: Callable[[str], None],
               count: Callable[..., Awaitable[tuple[list[int], int]]], submit: Callable[..., Awaitable[Any]],
               account: Callable[[str, list[int], int], Any], guarded: Callable[[Handler], Handler],
               rerank: Handler | None = None) -> list[Any]:
    """The TEI routes, built on the app's own parsing, limits, queue and accounting (``create_app`` passes them);
    ``rerank`` is the app's TEI-shaped /rerank handler, which ``POST /`` runs for a reranker."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from .app import INLINE_TOKENIZE_CHARS, ApiError, _bool, _floats, _read_json, _texts, _type
    from .batcher import Job

    def invalid(msg: str) -> ApiError:
        return ApiError(422, "invalid_type", msg)

    def prompt(body: dict[str, Any]) -> str:
        name = body.get("prompt_name")
        if name is None:
            return ""
        if not isinstance(name, str):
            raise invalid(f"'prompt_name' must be a string or null, got {_type(name)}")
        prompts = dict(getattr(engine(), "prompts", None) or {})
        if name not in prompts:
            have = sorted(prompts) or "none"
            raise invalid(f"'prompt_name' {name!r} is not one of this model's prompts ({have}); the model's query "
                          f"instruction, when it has one, is the prompt named 'query'")
        return str(prompts[name])

    def direction(body: dict[str, Any]) -> None:
        d = body.get("truncation_direction")
        if d is not None and (not isinstance(d, str) or d.lower() != "right"):
            raise invalid(f"'truncation_direction' {d!r} is not supported: texts are truncated on the right "
                          f"(the end of the text is cut), as FlagEmbedding does; send \"right\" or leave it out")

    async def encode(request: Request, path: str, sparse: bool) -> tuple[Any, list[int], int]:
        body = await _read_json(request, st.config.max_request_bytes)
        texts = _texts(body, ("inputs",), st.config.max_inputs)
        truncate = _bool(body, "truncate", st.config.truncate)
        direction(body)
        if not sparse:
            if not _bool(body, "normalize", True):
                raise invalid("'normalize': false is not supported: this server's graphs output L2-normalised "
                              "vectors only (BGE's own output); leave it out or send true")
            dims = body.get("dimensions")
            hidden = engine().hidden_size
            if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims != hidden):
                raise invalid(f"'dimensions' {dims!r} is not supported: this model outputs {hidden} dimensions "
                              f"only (it is not a Matryoshka model); leave it out or send {hidden}")
        else:
            need_heads(path)
        pre = prompt(body)
        if pre:
            texts = [pre + t for t in texts]
        tokens, truncated = await count(texts, truncate)
        res = await submit(request, Job("encode", texts, tokens=sum(tokens), dense=not sparse, sparse=sparse))
        return res, tokens, truncated

    async def embed(request: Request) -> Response:
        res, tokens, truncated = await encode(request, "/embed", sparse=False)
        account("/embed", tokens, truncated)
        return JSONResponse(_floats(res["dense_vecs"]))

    async def embed_sparse(request: Request) -> Response:
        res, tokens, truncated = await encode(request, "/embed_sparse", sparse=True)
        account("/embed_sparse", tokens, truncated)
        out = [[{"index": int(k), "value": round(float(v), 8)} for k, v in sorted(d.items(), key=lambda kv: int(kv[0]))]
               for d in res["lexical_weights"]]
        return JSONResponse(out)

    async def tokenize(request: Request) -> Response:
        body = await _read_json(request, st.config.max_request_bytes)
        texts = _texts(body, ("inputs",), st.config.max_inputs)
        special = _bool(body, "add_special_tokens", True)
        pre = prompt(body)
        if pre:
            texts = [pre + t for t in texts]
        e = engine()
        try:
            if sum(map(len, texts)) > INLINE_TOKENIZE_CHARS:  # long texts: off the event loop
                encs = await asyncio.get_running_loop().run_in_executor(None, e.tokenize, texts, special)
            else:
                encs = e.tokenize(texts, special)
        except Exception as err:  # InputError: a lone surrogate
            from bge_edge.runtime.errors import InputError

            if isinstance(err, InputError):
                raise ApiError(422, "invalid_text", str(err)) from None
            raise
        return JSONResponse([tokens_json(t, *enc) for t, enc in zip(texts, encs)])

    # POST / answers as TEI does for the served model's kind
    by_kind: dict[str, Handler] = {"m3": embed, "dense": embed}
    if rerank is not None:
        by_kind["reranker"] = rerank

    async def root(request: Request) -> Response:
        kind = st.engine.kind if st.engine is not None else engine().kind  # engine() says why not ready
        handler = by_kind.get(kind)
        if handler is None:
            raise ApiError(400, "unsupported_model", f"POST / has no route for a model of kind {kind!r}")
        return await handler(request)

    return [
        Route("/", guarded(root), methods=["POST"]),
        Route("/embed", guarded(embed), methods=["POST"]),
        Route("/embed_sparse", guarded(embed_sparse), methods=["POST"]),
        Route("/tokenize", guarded(tokenize), methods=["POST"]),
    ]
