"""Fuzz: >= 2,000 malformed and hostile requests against the real tiny BGE-M3 server -> no 5xx, every
error a well-formed JSON error body, and the server still ready afterwards."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from bge_edge.runtime import Embedder  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from bge_edge.serve import ServeConfig, create_app  # noqa: E402
from bge_edge.serve.engine import EmbedderEngine  # noqa: E402

EXAMPLES = 2200
PATHS = ["/v1/embeddings", "/embed_dense", "/embed_lexical", "/embed_colbert", "/embed_all", "/score", "/health",
         "/ready", "/info", "/metrics", "/openapi.json", "/v1/models", "/", "/embed", "/embed_sparse", "/tokenize"]
TEI_PATHS = {"/", "/embed", "/embed_sparse", "/tokenize", "/info"}  # TEI's error body there
FIELDS = ["input", "inputs", "pairs", "weights", "truncate", "return_tokens", "encoding_format", "model",
          "dimensions", "user", "normalize", "prompt_name", "truncation_direction", "add_special_tokens"]

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                      st.sampled_from(["", " ", "\x00", "a\ud800b", "🙂" * 30, "<s></s><pad><unk><mask>",
                                       "word " * 200, "float", "base64"]))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=6),
                                                            st.dictionaries(st.text(max_size=12), kids, max_size=5)),
                          max_leaves=25)
# objects shaped like real requests, with hostile values
request_like = st.dictionaries(st.sampled_from(FIELDS), json_value, min_size=1, max_size=4)
pairs_like = st.fixed_dictionaries({"pairs": st.lists(st.lists(st.text(max_size=20), min_size=0, max_size=3),
                                                      max_size=5)},
                                   optional={"weights": st.lists(st.floats(), max_size=4)})


def _dumps(v: Any) -> bytes:
    return json.dumps(v, allow_nan=True).encode("utf-8", "surrogatepass")


texts = st.one_of(st.text(min_size=0, max_size=60), st.lists(st.text(max_size=30), max_size=20))
valid_ish = st.one_of(
    st.fixed_dictionaries({"input": texts}, optional={"encoding_format": st.sampled_from(["float", "base64", "x"]),
                                                      "model": st.text(max_size=10), "truncate": st.booleans()}),
    st.fixed_dictionaries({"inputs": texts}, optional={"return_tokens": st.booleans(), "truncate": st.booleans()}),
    st.fixed_dictionaries({"pairs": st.lists(st.tuples(st.text(max_size=30), st.text(max_size=30)).map(list),
                                             max_size=20)},
                          optional={"weights": st.lists(st.floats(min_value=-1, max_value=2), min_size=3, max_size=3)}),
)
bodies = st.one_of(
    st.binary(max_size=200),
    valid_ish.map(_dumps),
    valid_ish.map(_dumps),
    st.integers(min_value=63_990, max_value=70_000).map(lambda n: b'{"inputs": "' + b"x" * n + b'"}'),
    json_value.map(_dumps),
    request_like.map(_dumps),
    pairs_like.map(_dumps),
    request_like.map(lambda d: _dumps(d)[: max(1, len(_dumps(d)) // 2)]),  # truncated JSON
    st.integers(min_value=1, max_value=40_000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
    st.integers(min_value=1, max_value=400).map(lambda n: b'{"inputs": ' + b"9" * (n * 20) + b"}"),  # huge ints
    st.text(max_size=50).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
random_path = st.text(alphabet="abcdefgh/_.%?=&", max_size=30).map(lambda p: "/" + p)
requests = st.tuples(
    st.sampled_from(["POST"] * 12 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    st.integers(0, 15).flatmap(lambda k: random_path if k == 0 else st.sampled_from(PATHS[:6] * 6 + PATHS[6:])),
    bodies,
    st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                     "multipart/form-data; boundary=x"]),
    st.sampled_from([None, "Bearer x", "Basic Zm9vOmJhcg==", "Bearer " + "k" * 500]),
)


@pytest.fixture(scope="module")
def client(m3_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    emb = Embedder(m3_artifact, precision="int8", hash_cache=tmp_path_factory.mktemp("hc"))
    app = create_app(ServeConfig(artifact=str(m3_artifact), max_request_bytes=64_000, max_inputs=16,
                                 max_input_tokens=64), lambda: EmbedderEngine(emb))
    with TestClient(app, raise_server_exceptions=True) as c:
        end = time.monotonic() + 60
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.02)
        yield c


@pytest.mark.slow
def test_fuzz_hostile_requests_never_give_5xx(client: TestClient) -> None:
    seen: dict[int, int] = {}
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(requests)
    def one(req: tuple[str, str, bytes, str | None, str | None]) -> None:
        method, path, body, ctype, auth = req
        headers = {k: v for k, v in (("content-type", ctype), ("authorization", auth)) if v is not None}
        r = client.request(method, path, content=body, headers=headers)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (method, path, body[:200], r.status_code, r.text[:300])
        if r.status_code >= 400 and method != "HEAD":
            body = r.json()
            if set(body) == {"error", "error_type"}:  # TEI's body, on TEI's paths only
                sent = r.request.url.path  # as the client normalised it ("/." is "/")
                assert body["error"] and re.sub("/+", "/", sent) in TEI_PATHS, (path, sent, r.text)
            else:
                err = body["error"]
                assert set(err) == {"message", "type", "code"} and err["message"], r.text

    one()
    assert sum(seen.values()) >= 2000, seen
    assert client.get("/ready").status_code == 200
    assert client.post("/embed_dense", json={"inputs": ["still works"]}).status_code == 200
    assert {200, 404, 405, 413, 422} <= set(seen), seen
    print(f"fuzz: {sum(seen.values())} requests in {time.monotonic() - started:.1f} s, status counts {seen}")
