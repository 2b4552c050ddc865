"""The HTTP API on real tiny artifacts, in process: every endpoint against the Embedder it serves, every
error code, and the OpenAPI document checked against the routes and against real responses."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from bge_edge.runtime import Embedder  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from bge_edge.serve import ServeConfig, create_app  # noqa: E402
from bge_edge.serve.engine import EmbedderEngine  # noqa: E402

TEXTS = ["hello world", "the model encodes every passage", "模型将每个段落编码", "Emoji 🙂🚀 ok"]


def client_for(artifact: Path, cache: Path, **cfg: Any) -> tuple[Any, Embedder]:
    emb = Embedder(artifact, precision="fp32", hash_cache=cache)
    app = create_app(ServeConfig(artifact=str(artifact), **cfg), lambda: EmbedderEngine(emb))
    return app, emb


@pytest.fixture(scope="module")
def m3(m3_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Embedder]]:
    app, emb = client_for(m3_artifact, tmp_path_factory.mktemp("hc"))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c, emb


@pytest.fixture(scope="module")
def small(m3_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app, _ = client_for(m3_artifact, tmp_path_factory.mktemp("hc"), max_request_bytes=4096, max_inputs=4,
                        max_input_tokens=16, max_request_tokens=40)
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def wait_ready(c: TestClient, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while c.get("/ready").status_code != 200:
        assert time.monotonic() < end, c.get("/ready").text
        time.sleep(0.02)


def error_of(r: Any, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


# ---- every endpoint against the Embedder -------------------------------------------------------------


def test_openai_embeddings_match_encode(m3: tuple[TestClient, Embedder]) -> None:
    c, emb = m3
    ref = emb.encode(TEXTS)["dense_vecs"]
    tokens = emb.last_stats.tokens
    r = c.post("/v1/embeddings", json={"input": TEXTS, "model": "bge-m3"})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert np.abs(np.array([d["embedding"] for d in body["data"]]) - ref).max() < 1e-7
    r = c.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"})
    v = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(v, ref[0])
    assert c.get("/v1/models").json()["data"][0]["id"] == body["model"]


def test_embed_endpoints_match_encode(m3: tuple[TestClient, Embedder]) -> None:
    c, emb = m3
    ref = emb.encode(TEXTS, return_sparse=True, return_colbert_vecs=True)
    r = c.post("/embed_dense", json={"inputs": TEXTS})
    assert np.abs(np.array(r.json()["dense_vecs"]) - ref["dense_vecs"]).max() < 1e-7
    assert set(r.json()) == {"model", "dense_vecs", "usage", "truncated"}

    sp = c.post("/embed_lexical", json={"inputs": TEXTS}).json()["lexical_weights"]
    for got, want in zip(sp, ref["lexical_weights"]):
        assert set(got) == set(want) and all(abs(got[k] - float(want[k])) < 1e-7 for k in want)
    named = c.post("/embed_lexical", json={"inputs": TEXTS, "return_tokens": True}).json()["lexical_weights"]
    assert [set(d) for d in named] == [set(d) for d in emb.convert_id_to_token(ref["lexical_weights"])]

    col = c.post("/embed_colbert", json={"input": TEXTS}).json()["colbert_vecs"]  # "input" is an alias
    for got, want in zip(col, ref["colbert_vecs"]):
        assert np.array(got).shape == want.shape and np.abs(np.array(got) - want).max() < 1e-7

    all3 = c.post("/embed_all", json={"inputs": TEXTS}).json()
    assert all3["lexical_weights"] == sp and all3["colbert_vecs"] == col
    assert np.abs(np.array(all3["dense_vecs"]) - ref["dense_vecs"]).max() < 1e-7
    assert all3["usage"]["prompt_tokens"] == emb.last_stats.tokens


def test_score_matches_compute_score(m3: tuple[TestClient, Embedder]) -> None:
    c, emb = m3
    pairs = [("what is bge m3", "bge m3 is an embedding model"), ("模型", "hello world")]
    for w in (None, [0.4, 0.2, 0.4]):
        ref = emb.compute_score(pairs, weights_for_different_modes=w, max_query_length=emb.max_length,
                                max_passage_length=emb.max_length)
        body = c.post("/score", json={"pairs": [list(p) for p in pairs], **({"weights": w} if w else {})}).json()
        assert set(body["scores"]) == set(ref)
        for k in ref:
            assert np.abs(np.array(body["scores"][k]) - np.array(ref[k])).max() < 1e-6, k


def test_health_ready_info(m3: tuple[TestClient, Embedder]) -> None:
    c, emb = m3
    assert c.get("/health").json() == {"status": "ok"}
    assert c.get("/ready").json()["status"] == "ready"
    info = c.get("/info").json()
    assert info["precision"] == "fp32" and info["backend"] == "onnxruntime" and info["kind"] == "m3"
    assert info["limits"]["max_input_tokens"] == emb.max_length and info["limits"]["max_inputs"] == 256
    assert info["batching"]["batch_wait_ms"] == 2.0


def test_a_batch_dependent_int8_graph_is_named_in_info_and_warned_about_at_ready(
        tiny_m3_dir: Path, m3_artifact: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A graph exported with `--int8-recipe dynamic` changes with the requests micro-batched beside it: /info says
    batch_invariant false and the ready log warns; the default per-token int8 graph says true and logs no warning."""
    import functools
    import logging

    from bge_edge.export import export_model

    export_model(tiny_m3_dir, tmp_path / "dyn", ["int8"], int8_recipe="dynamic", quiet=True)
    for art, invariant in ((tmp_path / "dyn", False), (m3_artifact, True)):
        emb = Embedder(art, precision="int8", hash_cache=tmp_path / "hc")
        app = create_app(ServeConfig(artifact=str(art)), functools.partial(EmbedderEngine, emb))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bge_edge.serve"), TestClient(app) as c:
            wait_ready(c)
            assert c.get("/info").json()["batch_invariant"] is invariant
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert (warned != []) is not invariant, warned
        assert all("--int8-recipe dynamic" in w for w in warned)


def test_dense_artifact_has_no_sparse_or_colbert(bert_artifact: Path, tmp_path: Path) -> None:
    app, emb = client_for(bert_artifact, tmp_path)
    with TestClient(app) as c:
        wait_ready(c)
        assert c.post("/embed_dense", json={"inputs": ["a"]}).status_code == 200
        for path in ("/embed_lexical", "/embed_colbert", "/embed_all"):
            msg = error_of(c.post(path, json={"inputs": ["a"]}), 400, "head_unavailable")
            assert "kind 'dense'" in msg and "BGE-M3" in msg
        s = c.post("/score", json={"pairs": [["a", "b"]]}).json()["scores"]
        assert set(s) == {"dense"} and abs(s["dense"][0] - emb.compute_score(("a", "b"))["dense"]) < 1e-6


# ---- every error code ---------------------------------------------------------------------------------


def test_413_payload_inputs_and_tokens(small: TestClient) -> None:
    msg = error_of(small.post("/embed_dense", json={"inputs": "x" * 5000}), 413, "payload_too_large")
    assert "max_request_bytes 4,096" in msg and "5,0" in msg

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"inputs": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    error_of(small.post("/embed_dense", content=chunks()), 413, "payload_too_large")
    msg = error_of(small.post("/v1/embeddings", json={"input": ["a"] * 5}), 413, "too_many_inputs")
    assert "5 texts > max_inputs 4" in msg
    error_of(small.post("/score", json={"pairs": [["a", "b"]] * 5}), 413, "too_many_inputs")
    long = " ".join(["word"] * 40)
    msg = error_of(small.post("/embed_dense", json={"inputs": ["ok", long]}), 413, "input_too_long")
    assert "text 1 has" in msg and "max_input_tokens 16" in msg and '"truncate": true' in msg
    r = small.post("/embed_dense", json={"inputs": ["ok", long], "truncate": True})
    assert r.status_code == 200 and r.json()["truncated"] == 1
    assert r.json()["usage"]["prompt_tokens"] == 16 + small.app.serve.engine.count_tokens(["ok"])[0]
    msg = error_of(small.post("/embed_dense", json={"inputs": [long] * 4, "truncate": True}), 413, "too_many_tokens")
    assert "64 tokens > max_request_tokens 40" in msg  # counted after truncation: 4 x 16
    error_of(small.post("/score", json={"pairs": [[long, long]] * 2, "truncate": True}), 413, "too_many_tokens")
    assert small.post("/score", json={"pairs": [[long, "ok"]], "truncate": True}).status_code == 200


def test_400_and_422(small: TestClient) -> None:
    error_of(small.post("/embed_dense", json={"inputs": []}), 400, "empty_input")
    assert "inputs[1] is an empty string" in error_of(small.post("/embed_dense", json={"inputs": ["a", ""]}), 400,
                                                      "empty_input")
    error_of(small.post("/v1/embeddings", json={"input": ""}), 400, "empty_input")
    error_of(small.post("/score", json={"pairs": [["q", ""]]}), 400, "empty_input")
    error_of(small.post("/score", json={"pairs": [["q", "p"]], "weights": [0, 0, 1]}), 400, "invalid_weights")
    error_of(small.post("/v1/embeddings", json={"input": "a", "dimensions": 7}), 400, "unsupported_dimensions")
    error_of(small.post("/embed_dense", content=b'{"inputs": ["a",'), 422, "invalid_json")
    error_of(small.post("/embed_dense", content=b""), 422, "invalid_json")
    error_of(small.post("/embed_dense", content=b"\xff\xfe\x00garbage"), 422, "invalid_json")
    error_of(small.post("/embed_dense", content=b"[" * 100_000 + b"]" * 100_000), 413, "payload_too_large")
    error_of(small.post("/embed_dense", content=b"[" * 2000 + b"]" * 2000), 422, "invalid_json")  # too deep
    error_of(small.post("/embed_dense", json=["a"]), 422, "invalid_type")
    assert "got integer" in error_of(small.post("/embed_dense", json={"inputs": 3}), 422, "invalid_type")
    assert "token-id input" in error_of(small.post("/v1/embeddings", json={"input": [[1, 2]]}), 422,
                                        "token_ids_unsupported")
    assert "check_embedding_ctx_length=False" in error_of(small.post("/v1/embeddings", json={"input": [1, 2]}),
                                                          422, "token_ids_unsupported")
    error_of(small.post("/embed_dense", json={"inputs": "a", "truncate": "yes"}), 422, "invalid_type")
    error_of(small.post("/embed_dense", json={"inputs": "a", "input": "b"}), 422, "invalid_type")
    error_of(small.post("/embed_dense", json={"text": "a"}), 422, "invalid_type")
    error_of(small.post("/v1/embeddings", json={"input": "a", "encoding_format": "hex"}), 422, "invalid_type")
    error_of(small.post("/score", json={"pairs": [["a", "b", "c"]]}), 422, "invalid_type")
    error_of(small.post("/score", json={"pairs": [["a", "b"]], "weights": [1, 1]}), 422, "invalid_type")
    assert "lone surrogate" in error_of(small.post("/embed_dense", content=b'{"inputs": "a\\ud800b"}'), 422,
                                        "invalid_text")
    error_of(small.get("/nope"), 404, "not_found")
    r = small.get("/embed_dense")
    assert "allowed: POST" in error_of(r, 405, "method_not_allowed") and r.headers["allow"] == "POST"
    assert small.get("/ready").status_code == 200


# ---- OpenAPI -------------------------------------------------------------------------------------------


def _check(value: Any, schema: dict[str, Any], spec: dict[str, Any], where: str = "$") -> None:
    """A small JSON-Schema check for the keywords the spec uses."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        _check(value, spec["components"]["schemas"][name], spec, where)
        return
    if "oneOf" in schema:
        ok = 0
        for s in schema["oneOf"]:
            try:
                _check(value, s, spec, where)
                ok += 1
            except AssertionError:
                pass
        assert ok == 1, f"{where}: matches {ok} of oneOf"
        return
    if "const" in schema:
        assert value == schema["const"], where
    if "enum" in schema:
        assert value in schema["enum"], where
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        py = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
              "integer": int, "number": (int, float)}
        assert any(isinstance(value, py[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                   for t in types), f"{where}: {type(value).__name__} is not {types}"
    if isinstance(value, dict):
        for k in schema.get("required", []):
            assert k in value, f"{where}: missing {k}"
        for k, v in value.items():
            if k in schema.get("properties", {}):
                _check(v, schema["properties"][k], spec, f"{where}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                _check(v, schema["additionalProperties"], spec, f"{where}.{k}")
    if isinstance(value, list):
        assert len(value) >= schema.get("minItems", 0) and len(value) <= schema.get("maxItems", 1 << 30), where
        if "items" in schema:
            for i, v in enumerate(value[:3]):
                _check(v, schema["items"], spec, f"{where}[{i}]")
    if isinstance(value, str):
        assert len(value) >= schema.get("minLength", 0), where


def test_openapi_document_matches_routes_and_responses(m3: tuple[TestClient, Embedder]) -> None:
    c, _ = m3
    spec = c.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1") and spec["info"]["title"]
    routes = {(r.path, m.lower()) for r in c.app.app.routes for m in r.methods if m != "HEAD"}
    documented = {(p, m) for p, ops in spec["paths"].items() for m in ops}
    assert routes == documented
    requests = {
        "/v1/embeddings": [{"input": TEXTS}, {"input": "x", "encoding_format": "base64"}],
        "/embed_dense": [{"inputs": TEXTS}], "/embed_lexical": [{"inputs": TEXTS, "return_tokens": True}],
        "/embed_colbert": [{"inputs": "x"}], "/embed_all": [{"inputs": TEXTS}],
        "/score": [{"pairs": [["q", "p"]], "weights": [1, 1, 1]}],
        "/": [{"inputs": "x"}], "/embed": [{"inputs": TEXTS, "truncate": None, "normalize": True}],
        "/embed_sparse": [{"inputs": TEXTS}], "/tokenize": [{"inputs": TEXTS, "add_special_tokens": False}],
    }
    for (path, method) in sorted(documented):
        op = spec["paths"][path][method]
        if path in ("/rerank", "/v1/rerank"):
            continue  # this server has no reranker: tests/test_reranker_serve.py checks them against one
        if method == "post":
            req_schema = op["requestBody"]["content"]["application/json"]["schema"]
            for body in requests[path]:
                _check(body, req_schema, spec, f"request {path}")
                r = c.post(path, json=body)
                _check(r.json(), op["responses"]["200"]["content"]["application/json"]["schema"], spec, path)
            r = c.post(path, json={})
            assert str(r.status_code) in op["responses"], (path, r.status_code)
            _check(r.json(), op["responses"][str(r.status_code)]["content"]["application/json"]["schema"], spec)
        else:
            r = c.get(path)
            media = next(iter(op["responses"]["200"]["content"]))
            assert r.headers["content-type"].startswith(media), path
            if media == "application/json":
                _check(r.json(), op["responses"]["200"]["content"][media]["schema"], spec, path)
    assert json.loads(json.dumps(spec)) == spec


def test_int8_sidecar_gives_one_vector_for_one_query_under_concurrent_clients(minilm_artifact: Path,
                                                                              tmp_path: Path) -> None:
    """32 clients send the same query with different neighbours; the server merges them into batches of its own
    choosing. With per-token INT8 scales every client gets the vector the query has alone (issue 18 measured 16
    distinct vectors here with the previous, per-batch INT8)."""
    from concurrent.futures import ThreadPoolExecutor

    emb = Embedder(minilm_artifact, precision="int8", hash_cache=tmp_path)
    app = create_app(ServeConfig(artifact=str(minilm_artifact)), lambda: EmbedderEngine(emb))
    query = "vitamin D deficiency and respiratory infections in children"
    words = "cell protein gene expression tumour patients cohort trial dose effect".split()
    others = [" ".join(words[(i + k) % len(words)] for k in range(3 + 5 * i)) for i in range(32)]
    alone = emb.encode([query])["dense_vecs"][0]
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)

        def call(i: int) -> Any:
            return c.post("/v1/embeddings", json={"input": [query, *others[i: i + 1 + i % 5]], "model": "m"})

        with ThreadPoolExecutor(32) as ex:
            responses = list(ex.map(call, range(32)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:1]
    got = np.array([r.json()["data"][0]["embedding"] for r in responses])
    np.testing.assert_allclose(got, np.broadcast_to(alone, got.shape), atol=1e-5, rtol=0)
