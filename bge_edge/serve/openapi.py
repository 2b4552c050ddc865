"""The OpenAPI 3.1 description served at /openapi.json (written by hand; tests check it against the routes
and validate real responses against its schemas)."""

from __future__ import annotations

from typing import Any

__all__ = ["build_spec"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_TEXTS = {"oneOf": [{"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]}
_VEC = {"type": "array", "items": {"type": "number"}}
_USAGE = {"type": "object", "required": ["prompt_tokens", "total_tokens"],
          "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}}
_TRUNCATE = {"type": "boolean", "description": "truncate texts over max_input_tokens instead of answering 413 "
                                              "(default: the server's --truncate)"}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "string"}}}}},
    "Usage": _USAGE,
    "EmbeddingsRequest": {
        "type": "object", "required": ["input"],
        "properties": {"input": _TEXTS, "model": {"type": "string", "description": "ignored; the served model answers"},
                       "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float",
                                           "description": "base64: little-endian float32 bytes"},
                       "dimensions": {"type": "integer", "description": "must equal the model's dimension"},
                       "user": {"type": "string"}, "truncate": _TRUNCATE}},
    "EmbeddingsResponse": {
        "type": "object", "required": ["object", "data", "model", "usage"],
        "properties": {"object": {"const": "list"}, "model": {"type": "string"}, "usage": _ref("Usage"),
                       "data": {"type": "array", "items": {
                           "type": "object", "required": ["object", "index", "embedding"],
                           "properties": {"object": {"const": "embedding"}, "index": {"type": "integer"},
                                          "embedding": {"oneOf": [_VEC, {"type": "string"}]}}}}}},
    "EmbedRequest": {
        "type": "object", "required": ["inputs"],
        "properties": {"inputs": _TEXTS, "input": {**_TEXTS, "description": "alias of inputs"},
                       "truncate": _TRUNCATE,
                       "return_tokens": {"type": "boolean", "default": False,
                                         "description": "sparse output keyed by token strings instead of token ids"}}},
    "EmbedResponse": {
        "type": "object", "required": ["model", "usage", "truncated"],
        "properties": {"model": {"type": "string"}, "usage": _ref("Usage"),
                       "truncated": {"type": "integer", "description": "texts cut to max_input_tokens"},
                       "dense_vecs": {"type": "array", "items": _VEC,
                                      "description": "L2-normalised dense vectors, one per text"},
                       "lexical_weights": {"type": "array", "items": {
                           "type": "object", "additionalProperties": {"type": "number"}},
                           "description": "token id (or token string) -> weight, one object per text"},
                       "colbert_vecs": {"type": "array", "items": {"type": "array", "items": _VEC},
                                        "description": "(tokens - 1) x H normalised vectors per text"}}},
    "ScoreRequest": {
        "type": "object", "required": ["pairs"],
        "properties": {"pairs": {"type": "array", "minItems": 1, "items": {
                           "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "string", "minLength": 1}}},
                       "weights": {"type": "array", "minItems": 3, "maxItems": 3, "items": {"type": "number"},
                                   "description": "[w_dense, w_sparse, w_colbert], default [1, 1, 1]"},
                       "truncate": _TRUNCATE}},
    "ScoreResponse": {
        "type": "object", "required": ["model", "scores", "usage", "truncated"],
        "properties": {"model": {"type": "string"}, "usage": _ref("Usage"), "truncated": {"type": "integer"},
                       "scores": {"type": "object", "required": ["dense"], "additionalProperties": _VEC,
                                  "description": "dense (and for BGE-M3 sparse, colbert, sparse+dense, "
                                                 "colbert+sparse+dense), one score per pair"}}},
    "RerankRequest": {
        "type": "object", "required": ["query", "texts"],
        "description": "text-embeddings-inference's /rerank",
        "properties": {"query": {"type": "string", "minLength": 1},
                       "texts": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                       "raw_scores": {"type": "boolean", "default": False,
                                      "description": "the raw logit instead of its sigmoid"},
                       "return_text": {"type": "boolean", "default": False}, "truncate": _TRUNCATE}},
    "RerankResponse": {
        "type": "array", "description": "best first",
        "items": {"type": "object", "required": ["index", "score"],
                  "properties": {"index": {"type": "integer"}, "score": {"type": "number"},
                                 "text": {"type": "string"}}}},
    "CohereRerankRequest": {
        "type": "object", "required": ["query", "documents"],
        "description": "Cohere/Jina rerank, as LangChain and LlamaIndex clients send it",
        "properties": {"model": {"type": "string", "description": "ignored; the served reranker answers"},
                       "query": {"type": "string", "minLength": 1},
                       "documents": {"type": "array", "minItems": 1, "items": {"oneOf": [
                           {"type": "string", "minLength": 1},
                           {"type": "object", "required": ["text"],
                            "properties": {"text": {"type": "string", "minLength": 1}}}]}},
                       "top_n": {"type": "integer", "minimum": 1}, "return_documents": {"type": "boolean"},
                       "truncate": _TRUNCATE}},
    "CohereRerankResponse": {
        "type": "object", "required": ["model", "results", "usage"],
        "properties": {"model": {"type": "string"}, "usage": _ref("Usage"), "results": {
            "type": "array", "description": "best first, at most top_n",
            "items": {"type": "object", "required": ["index", "relevance_score"],
                      "properties": {"index": {"type": "integer"},
                                     "relevance_score": {"type": "number", "description": "sigmoid of the logit"},
                                     "document": {"type": "object", "required": ["text"],
                                                  "properties": {"text": {"type": "string"}}}}}}}},
    "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"},
                                                                          "model": {"type": "string"}}},
    "Info": {"type": "object", "required": ["version", "ready", "limits", "batching", "model_id", "model_dtype",
                                            "model_type", "max_input_length", "max_client_batch_size"],
             "description": "TEI's /info fields (model_id, model_sha, model_dtype, model_type, "
                            "max_concurrent_requests, max_input_length, max_batch_tokens, max_batch_requests, "
                            "max_client_batch_size, auto_truncate, tokenization_workers, version, sha, docker_label) "
                            "and bge-edge's",
             "properties": {"version": {"type": "string"}, "ready": {"type": "boolean"},
                            "model_id": {"type": ["string", "null"]}, "model_dtype": {"type": ["string", "null"]},
                            "model_type": {"type": ["object", "null"]},
                            "max_input_length": {"type": ["integer", "null"]},
                            "max_client_batch_size": {"type": "integer"},
                            "model": {"type": ["string", "null"]}, "limits": {"type": "object"},
                            "batching": {"type": "object"}}},
    "TeiError": {"type": "object", "required": ["error", "error_type"],
                 "properties": {"error": {"type": "string"},
                                "error_type": {"type": "string", "enum": ["Validation", "Tokenizer", "Empty",
                                                                          "Overloaded", "Unhealthy", "Backend",
                                                                          "Unauthorized"]}}},
    "TeiEmbedRequest": {
        "type": "object", "required": ["inputs"],
        "properties": {"inputs": _TEXTS, "truncate": {**_TRUNCATE, "type": ["boolean", "null"]},
                       "truncation_direction": {"type": ["string", "null"], "enum": ["right", "Right", None],
                                                "description": "only right truncation is supported"},
                       "prompt_name": {"type": ["string", "null"],
                                       "description": "'query' prepends the model's query instruction (bge v1.5)"},
                       "normalize": {"type": "boolean", "default": True, "description": "only true is supported"},
                       "dimensions": {"type": ["integer", "null"],
                                      "description": "only the model's own dimension is supported"}}},
    "TeiEmbedResponse": {"type": "array", "items": _VEC, "description": "one L2-normalised vector per input"},
    "TeiSparseResponse": {"type": "array", "items": {"type": "array", "items": {
        "type": "object", "required": ["index", "value"],
        "properties": {"index": {"type": "integer"}, "value": {"type": "number"}}}},
        "description": "BGE-M3 lexical weights per input: token id and weight, sorted by token id"},
    "TeiTokenizeRequest": {
        "type": "object", "required": ["inputs"],
        "properties": {"inputs": _TEXTS, "add_special_tokens": {"type": "boolean", "default": True},
                       "prompt_name": {"type": ["string", "null"]}}},
    "TeiTokenizeResponse": {"type": "array", "items": {"type": "array", "items": {
        "type": "object", "required": ["id", "text", "special", "start", "stop"],
        "properties": {"id": {"type": "integer"}, "text": {"type": "string"}, "special": {"type": "boolean"},
                       "start": {"type": ["integer", "null"], "description": "UTF-8 byte offset; null if special"},
                       "stop": {"type": ["integer", "null"], "description": "UTF-8 byte offset; null if special"}}}}},
    "Models": {"type": "object", "required": ["object", "data"],
               "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object"}}}},
}


def _err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": _ref("Error")}}}


_ERRORS = {"400": _err("empty input, missing model head, invalid weights"),
           "401": _err("missing or wrong API key (when the server has one)"),
           "413": _err("payload, inputs per request, tokens per input or tokens per request over the server's "
                   "limit"),
           "422": _err("malformed JSON or wrong types"),
           "429": _err("queue full or too many concurrent requests; see Retry-After"),
           "503": _err("model not ready, or the server is shutting down")}


def _post(summary: str, req: str, resp: str) -> dict[str, Any]:
    ok = {"description": "OK", "content": {"application/json": {"schema": _ref(resp)}}}
    return {"post": {"summary": summary,
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(req)}}},
                     "responses": {"200": ok, **_ERRORS}}}


def _tei_post(summary: str, req: str, resp: str) -> dict[str, Any]:
    op = _post(summary, req, resp)
    responses = op["post"]["responses"]
    for code, r in responses.items():
        if code != "200":
            responses[code] = {"description": r["description"],
                               "content": {"application/json": {"schema": _ref("TeiError")}}}
    op["post"]["tags"] = ["text-embeddings-inference"]
    return op


def _get(summary: str, schema: dict[str, Any] | None, media: str = "application/json",
         errors: tuple[str, ...] = ()) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK"}
    ok["content"] = {media: {"schema": schema if schema is not None else {"type": "string"}}}
    return {"get": {"summary": summary, "responses": {"200": ok, **{c: _ERRORS[c] for c in errors}}}}


def build_spec(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "bge-edge sidecar", "version": version,
                 "description": "BGE embeddings (dense, sparse, ColBERT) and scoring over HTTP; "
                                "POST /v1/embeddings is OpenAI-compatible; POST /, /embed, /embed_sparse, "
                                "/tokenize and GET /info follow Hugging Face text-embeddings-inference (TEI), "
                                "with TEI's error body {error, error_type}."},
        "paths": {
            "/v1/embeddings": _post("OpenAI-compatible dense embeddings", "EmbeddingsRequest", "EmbeddingsResponse"),
            "/embed_dense": _post("dense vectors", "EmbedRequest", "EmbedResponse"),
            "/embed_lexical": _post("lexical (sparse) weights; BGE-M3 only", "EmbedRequest", "EmbedResponse"),
            "/embed_colbert": _post("ColBERT multi-vectors; BGE-M3 only", "EmbedRequest", "EmbedResponse"),
            "/embed_all": _post("dense, sparse and ColBERT from one forward pass; BGE-M3 only", "EmbedRequest",
                                "EmbedResponse"),
            "/score": _post("compute_score on [query, passage] pairs", "ScoreRequest", "ScoreResponse"),
            "/rerank": _post("rerank texts for a query (TEI shape; a reranker artifact or --reranker)",
                             "RerankRequest", "RerankResponse"),
            "/v1/rerank": _post("rerank documents for a query (Cohere/Jina shape; a reranker artifact or "
                                "--reranker)", "CohereRerankRequest", "CohereRerankResponse"),
            "/health": _get("the process is alive", _ref("Status")),
            "/ready": _get("the model is loaded and warmed up and the server is not draining", _ref("Status"),
                           errors=("503",)),
            "/info": _get("artifact, precision, backend, limits", _ref("Info"), errors=("401",)),
            "/metrics": _get("Prometheus text exposition", None, "text/plain", errors=("401",)),
            "/openapi.json": _get("this document", {"type": "object"}),
            "/": _tei_post("TEI: the loaded model's default task (an embedder: /embed)", "TeiEmbedRequest",
                           "TeiEmbedResponse"),
            "/embed": _tei_post("TEI: dense vectors, a bare list", "TeiEmbedRequest", "TeiEmbedResponse"),
            "/embed_sparse": _tei_post("TEI: lexical weights as index/value lists; BGE-M3 only", "TeiEmbedRequest",
                                       "TeiSparseResponse"),
            "/tokenize": _tei_post("TEI: tokens with UTF-8 byte offsets", "TeiTokenizeRequest", "TeiTokenizeResponse"),
            "/v1/models": _get("OpenAI-compatible model list", _ref("Models"), errors=("401",)),
        },
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "only when the server runs with --api-key"}}},
    }
