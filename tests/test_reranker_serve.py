"""POST /rerank (text-embeddings-inference shape) and /v1/rerank (Cohere/Jina shape) on real tiny rerankers, in
process: scores equal Reranker's, limits/errors/metrics/drain as for the embedding endpoints, a reranker beside an
embedder in one process (--reranker), the OpenAPI document against real responses, and the CLI `rerank`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from bge_edge.runtime import Embedder, Reranker  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from test_serve_api import _check, error_of, wait_ready  # noqa: E402

from bge_edge.serve import ConfigError, ServeConfig, create_app  # noqa: E402
from bge_edge.serve.engine import EmbedderEngine, RerankerEngine  # noqa: E402

QUERY = "the model encodes"
TEXTS = ["hi", "the model encodes every passage into dense sparse and multi vector representations",
         "模型将每个段落编码为稠密稀疏和多向量表示以便检索", "Emoji 🙂🚀 ok", "das modell kodiert jede passage"]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def rr(reranker_m3_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Reranker:
    return Reranker(reranker_m3_artifact, precision="fp32", backend="onnxruntime",
                    hash_cache=tmp_path_factory.mktemp("hc"))


@pytest.fixture(scope="module")
def served(rr: Reranker, reranker_m3_artifact: Path) -> Iterator[TestClient]:
    """`bge-edge serve RERANKER_DIR`: the reranker is the served model."""
    app = create_app(ServeConfig(artifact=str(reranker_m3_artifact), max_inputs=8, max_input_tokens=1024,
                                 max_request_tokens=4096),
                     lambda: RerankerEngine(rr))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def test_tei_rerank_matches_the_runtime(served: TestClient, rr: Reranker) -> None:
    raw = rr.compute_score([(QUERY, t) for t in TEXTS], max_length=1024)
    assert isinstance(raw, list)
    order = sorted(range(len(TEXTS)), key=lambda i: (-raw[i], i))
    r = served.post("/rerank", json={"query": QUERY, "texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["index"] for x in body] == order and all(set(x) == {"index", "score"} for x in body)
    assert np.allclose([x["score"] for x in body], [sigmoid(raw[i]) for i in order], atol=1e-7)
    body = served.post("/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True,
                                        "return_text": True}).json()
    assert np.allclose([x["score"] for x in body], [raw[i] for i in order], atol=1e-6)
    assert [x["text"] for x in body] == [TEXTS[i] for i in order]


def test_tei_root_route_reranks_when_the_served_model_is_a_reranker(served: TestClient) -> None:
    req = {"query": QUERY, "texts": TEXTS, "raw_scores": True}
    assert served.post("/", json=req).json() == served.post("/rerank", json=req).json()


def test_cohere_rerank_matches_the_runtime(served: TestClient, rr: Reranker) -> None:
    raw = rr.compute_score([(QUERY, t) for t in TEXTS], max_length=1024)
    assert isinstance(raw, list)
    order = sorted(range(len(TEXTS)), key=lambda i: (-raw[i], i))
    r = served.post("/v1/rerank", json={"model": "bge-reranker-v2-m3", "query": QUERY, "documents": TEXTS,
                                        "top_n": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["index"] for x in body["results"]] == order[:3]
    assert np.allclose([x["relevance_score"] for x in body["results"]], [sigmoid(raw[i]) for i in order[:3]],
                       atol=1e-7)
    tokens = sum(rr.count_tokens([(QUERY, t) for t in TEXTS]))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    jina = served.post("/v1/rerank", json={"query": QUERY, "documents": [{"text": t} for t in TEXTS],
                                           "return_documents": True}).json()
    assert [x["index"] for x in jina["results"]] == order
    assert [x["document"]["text"] for x in jina["results"]] == [TEXTS[i] for i in order]


def test_rerank_errors_and_limits(served: TestClient) -> None:
    assert "missing field 'query'" in error_of(served.post("/rerank", json={"texts": ["a"]}), 422, "invalid_type")
    error_of(served.post("/rerank", json={"query": "q", "texts": []}), 400, "empty_input")
    error_of(served.post("/rerank", json={"query": "", "texts": ["a"]}), 400, "empty_input")
    error_of(served.post("/rerank", json={"query": "q", "texts": 5}), 422, "invalid_type")
    error_of(served.post("/v1/rerank", json={"query": "q", "documents": [1]}), 422, "invalid_type")
    error_of(served.post("/v1/rerank", json={"query": "q", "documents": ["a"], "top_n": 0}), 400, "invalid_top_n")
    error_of(served.post("/v1/rerank", json={"query": "q", "documents": ["a"], "top_n": "2"}), 422, "invalid_type")
    error_of(served.post("/rerank", json={"query": "q", "texts": ["a"] * 9}), 413, "too_many_inputs")
    long_text = " ".join(["science protein cell gene study results patients effect treatment data"] * 20)  # ~840
    error_of(served.post("/rerank", json={"query": "q", "texts": [long_text] * 5}), 413, "too_many_tokens")
    error_of(served.post("/rerank", json={"query": "q", "texts": [long_text * 2]}), 413, "input_too_long")
    lone = b'{"query": "q", "texts": ["ok", "a\\ud800b"]}'  # a lone surrogate, legal in JSON text
    error_of(served.post("/rerank", content=lone, headers={"content-type": "application/json"}), 422, "invalid_text")
    assert "serves the reranker" in error_of(served.post("/embed_dense", json={"inputs": ["a"]}), 400,
                                             "no_embedding_model")
    tei = served.post("/embed", json={"inputs": ["a"]})  # TEI's route answers in TEI's error body
    assert tei.status_code == 400 and "serves the reranker" in tei.json()["error"]
    metrics = served.get("/metrics").text
    assert 'bge_edge_requests_total{endpoint="/rerank",code="200"}' in metrics or \
        'bge_edge_requests_total{endpoint="/rerank",code="413"}' in metrics
    assert 'bge_edge_tokens_total{endpoint="/v1/rerank"}' in metrics


def test_pair_over_the_token_limit_is_413_unless_truncated(rr: Reranker, reranker_m3_artifact: Path) -> None:
    app = create_app(ServeConfig(artifact=str(reranker_m3_artifact), max_input_tokens=32), lambda: RerankerEngine(rr))
    long_text = "science protein cell gene study results patients effect treatment data"
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        msg = error_of(c.post("/rerank", json={"query": "q", "texts": ["ok", long_text]}), 413, "input_too_long")
        assert "text 1 has" in msg and "max_input_tokens 32" in msg
        r = c.post("/rerank", json={"query": "q", "texts": ["ok", long_text], "truncate": True, "raw_scores": True})
        assert r.status_code == 200
        want = rr.compute_score(("q", long_text), max_length=32)
        assert abs(next(x["score"] for x in r.json() if x["index"] == 1) - want) < 1e-6
        c.app.serve.begin_drain()
        error_of(c.post("/rerank", json={"query": "q", "texts": ["ok"]}), 503, "shutting_down")


def test_openapi_rerank_paths_match_real_responses(served: TestClient) -> None:
    spec = served.get("/openapi.json").json()
    bodies = {"/rerank": [{"query": QUERY, "texts": TEXTS, "return_text": True}],
              "/v1/rerank": [{"query": QUERY, "documents": TEXTS, "top_n": 2, "return_documents": True},
                             {"query": QUERY, "documents": [{"text": "a"}]}]}
    for path, reqs in bodies.items():
        op = spec["paths"][path]["post"]
        for body in reqs:
            _check(body, op["requestBody"]["content"]["application/json"]["schema"], spec, f"request {path}")
            r = served.post(path, json=body)
            _check(r.json(), op["responses"]["200"]["content"]["application/json"]["schema"], spec, path)
        r = served.post(path, json={})
        assert str(r.status_code) in op["responses"]
        _check(r.json(), op["responses"][str(r.status_code)]["content"]["application/json"]["schema"], spec)


def test_embedder_and_reranker_in_one_process(bert_artifact: Path, reranker_base_artifact: Path,
                                              tmp_path: Path) -> None:
    emb = Embedder(bert_artifact, precision="fp32", hash_cache=tmp_path)
    rer = Reranker(reranker_base_artifact, precision="fp32", hash_cache=tmp_path)
    cfg = ServeConfig(artifact=str(bert_artifact), reranker=str(reranker_base_artifact))
    app = create_app(cfg, lambda: EmbedderEngine(emb), lambda: RerankerEngine(rer))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        vecs = c.post("/embed", json={"inputs": TEXTS}).json()  # TEI's shape: a bare [[float]]
        assert np.abs(np.array(vecs) - emb.encode(TEXTS)["dense_vecs"]).max() < 1e-7
        ranked = c.post("/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": True}).json()
        want = rer.rerank(QUERY, TEXTS, max_length=rer.max_length)
        assert [x["index"] for x in ranked] == [i for i, _ in want]
        assert np.allclose([x["score"] for x in ranked], [s for _, s in want], atol=1e-6)
        info = c.get("/info").json()
        assert info["kind"] == "dense" and info["reranker"]["kind"] == "reranker"
        assert c.post("/v1/rerank", json={"query": QUERY, "documents": TEXTS}).json()["model"] == \
            read_model_id(reranker_base_artifact)
    plain = create_app(ServeConfig(artifact=str(bert_artifact)), lambda: EmbedderEngine(emb))
    with TestClient(plain, raise_server_exceptions=False) as c:
        wait_ready(c)
        assert "--reranker" in error_of(c.post("/rerank", json={"query": "q", "texts": ["a"]}), 400, "no_reranker")


def read_model_id(artifact: Path) -> str:
    return str(json.loads((artifact / "manifest.json").read_text())["source"]["model_id"])


def test_serve_refuses_contradictory_reranker_settings(reranker_base_artifact: Path, bert_artifact: Path) -> None:
    from bge_edge.serve import run

    with pytest.raises(ConfigError, match="is itself a reranker"):
        run(ServeConfig(artifact=str(reranker_base_artifact), reranker=str(reranker_base_artifact)))
    with pytest.raises(ConfigError, match="not a reranker"):
        run(ServeConfig(artifact=str(bert_artifact), reranker=str(bert_artifact)))


def test_cli_rerank_prints_sorted_json_lines(reranker_base_artifact: Path, rr: Reranker) -> None:
    rer = Reranker(reranker_base_artifact, precision="fp32", hash_cache=False)
    want = rer.rerank(QUERY, TEXTS)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "bge_edge.cli", "rerank", str(reranker_base_artifact), "--query",
                        QUERY, "--precision", "fp32", "--top-k", "4"], input="\n".join(TEXTS) + "\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["index"] for x in lines] == [i for i, _ in want][:4]
    assert np.allclose([x["score"] for x in lines], [s for _, s in want][:4], atol=1e-6)
    assert lines[0]["text"] == TEXTS[want[0][0]] and time.perf_counter() - t < 120
    bad = subprocess.run([sys.executable, "-m", "bge_edge.cli", "rerank", str(reranker_base_artifact)],
                         input="a\n", capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--query" in bad.stderr
