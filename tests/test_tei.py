"""text-embeddings-inference compatibility: `bge-edge serve` on a 127.0.0.1 port (uvicorn in a thread, stopped at
the end) answering Hugging Face's own client, `huggingface_hub.InferenceClient`, and TEI's routes, shapes and error
body checked against the Embedder it serves."""

from __future__ import annotations

import importlib.util
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
hub = pytest.importorskip("huggingface_hub")

from bge_edge.runtime import Embedder  # noqa: E402

from bge_edge.serve import ServeConfig, create_app  # noqa: E402
from bge_edge.serve.engine import EmbedderEngine  # noqa: E402

TEXTS = ["hello world", "the model encodes every passage", "模型将每个段落编码", "Emoji 🙂🚀 ok"]


@contextmanager
def serving(embedder: Embedder, **cfg: Any) -> Iterator[str]:
    """The app on a free loopback port; yields its base URL once /ready; stops the server on exit."""
    app = create_app(ServeConfig(artifact=str(embedder.root), **cfg), lambda: EmbedderEngine(embedder))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 60
        while not (server.started and server.servers):
            assert thread.is_alive() and time.monotonic() < end, "server did not start"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        while httpx.get(url + "/ready", timeout=5).status_code != 200:
            assert time.monotonic() < end, "server never became ready"
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def m3(m3_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Embedder]]:
    emb = Embedder(m3_artifact, precision="fp32", hash_cache=tmp_path_factory.mktemp("hc"))
    with serving(emb, max_inputs=8, max_input_tokens=32) as url:
        yield url, emb


def tei_error(r: Any, status: int, error_type: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    return str(body["error"])


def test_inference_client_feature_extraction(m3: tuple[str, Embedder]) -> None:
    """What a TEI user runs, pointed at bge-edge: POST / (and /embed) with InferenceClient's payload."""
    url, emb = m3
    ref = emb.encode(TEXTS)["dense_vecs"]
    client = hub.InferenceClient(base_url=url)
    for k, text in enumerate(TEXTS):
        got = client.feature_extraction(text)
        assert got.shape == (1, ref.shape[1]) and got.dtype == np.float32
        np.testing.assert_allclose(got[0], ref[k], atol=1e-6)
    got = hub.InferenceClient(base_url=url + "/embed").feature_extraction(TEXTS[0], normalize=True, truncate=True,
                                                                          truncation_direction="right")
    np.testing.assert_allclose(got[0], ref[0], atol=1e-6)
    with pytest.raises(hub.errors.HfHubHTTPError) as exc:
        client.feature_extraction(" ".join(["word"] * 60))  # over max_input_tokens 32, truncate not asked
    assert exc.value.response.status_code == 413 and "max_input_tokens 32" in str(exc.value)
    assert exc.value.response.json()["error_type"] == "Validation"
    long = client.feature_extraction(" ".join(["word"] * 60), truncate=True)
    assert long.shape == (1, ref.shape[1])
    with pytest.raises(hub.errors.HfHubHTTPError, match="normalize"):
        client.feature_extraction("x", normalize=False)
    with pytest.raises(hub.errors.HfHubHTTPError, match="dimensions"):
        client.feature_extraction("x", dimensions=4)


def test_embed_is_a_bare_list_and_sparse_is_index_value(m3: tuple[str, Embedder]) -> None:
    url, emb = m3
    ref = emb.encode(TEXTS, return_sparse=True)
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/embed", json={"inputs": TEXTS})
        assert r.status_code == 200 and isinstance(r.json(), list)
        np.testing.assert_allclose(np.array(r.json()), ref["dense_vecs"], atol=1e-6)
        one = c.post("/embed", json={"inputs": "hello world"}).json()
        assert np.array(one).shape == (1, ref["dense_vecs"].shape[1])
        sp = c.post("/embed_sparse", json={"inputs": TEXTS}).json()
        assert len(sp) == len(TEXTS)
        for got, want in zip(sp, ref["lexical_weights"]):
            assert [e["index"] for e in got] == sorted(int(k) for k in want)
            assert all(abs(e["value"] - float(want[str(e["index"])])) < 1e-6 for e in got)


def test_tokenize_gives_ids_text_and_byte_offsets(m3: tuple[str, Embedder]) -> None:
    url, emb = m3
    with httpx.Client(base_url=url, timeout=30) as c:
        toks = c.post("/tokenize", json={"inputs": TEXTS}).json()
        single = c.post("/tokenize", json={"inputs": TEXTS[2]}).json()
        bare = c.post("/tokenize", json={"inputs": TEXTS[2], "add_special_tokens": False}).json()
    assert len(toks) == len(TEXTS) and single == [toks[2]]
    for text, tt in zip(TEXTS, toks):
        ids = [t["id"] for t in tt]
        assert len(ids) == emb.count_tokens([text])[0]
        assert tt[0]["special"] and tt[-1]["special"] and tt[0]["start"] is None
        data = text.encode("utf-8")
        for t in tt[1:-1]:
            assert not t["special"]
            assert data[t["start"]:t["stop"]].decode("utf-8") == t["text"]  # UTF-8 byte offsets
    assert [t["id"] for t in bare[0]] == [t["id"] for t in toks[2][1:-1]]
    assert any(t["stop"] - t["start"] > len(t["text"]) for t in bare[0])  # CJK: 3 bytes per character


def test_info_has_tei_fields(m3: tuple[str, Embedder]) -> None:
    url, emb = m3
    info = httpx.get(url + "/info", timeout=30).json()
    assert info["model_type"] == {"embedding": {"pooling": "cls"}} and info["model_dtype"] == "float32"
    assert info["max_input_length"] == 32 and info["max_client_batch_size"] == 8
    assert info["auto_truncate"] is False and info["model_id"] and "max_batch_tokens" in info
    assert info["precision"] == "fp32" and info["limits"]["max_inputs"] == 8  # bge-edge's own fields stay


def test_tei_errors(m3: tuple[str, Embedder]) -> None:
    url, _ = m3
    with httpx.Client(base_url=url, timeout=30) as c:
        tei_error(c.post("/embed", json={"inputs": []}), 400, "Empty")
        tei_error(c.post("/", json={"inputs": ""}), 400, "Empty")
        msg = tei_error(c.post("/embed", json={"inputs": ["a"] * 9}), 413, "Validation")
        assert "9 texts > max_inputs 8" in msg
        assert "token-id" in tei_error(c.post("/embed", json={"inputs": [[1, 2, 3]]}), 422, "Validation")
        assert "right" in tei_error(c.post("/embed", json={"inputs": "a", "truncation_direction": "left"}), 422,
                                    "Validation")
        assert "'query'" in tei_error(c.post("/embed", json={"inputs": "a", "prompt_name": "query"}), 422,
                                      "Validation")  # M3 has no query instruction
        tei_error(c.post("/embed", content=b"{nope"), 422, "Validation")
        tei_error(c.post("/tokenize", content=b'{"inputs": "a\\ud800b"}'), 422, "Tokenizer")
        tei_error(c.get("/embed"), 405, "Validation")
        # bge-edge's own routes keep their OpenAI-style error body
        assert set(c.post("/embed_dense", json={"inputs": []}).json()["error"]) == {"message", "type", "code"}


def test_prompt_name_query_is_the_query_instruction(bert_artifact: Path, tmp_path: Path) -> None:
    emb = Embedder(bert_artifact, precision="fp32", hash_cache=tmp_path)
    assert emb.manifest.query_instruction
    with serving(emb) as url:
        got = hub.InferenceClient(base_url=url).feature_extraction("what is bge?", prompt_name="query")
        np.testing.assert_allclose(got[0], emb.encode_queries(["what is bge?"])["dense_vecs"][0], atol=1e-6)
        r = httpx.post(url + "/embed_sparse", json={"inputs": "a"}, timeout=30)
        assert "BGE-M3" in tei_error(r, 400, "Validation")
        info = httpx.get(url + "/info", timeout=30).json()
        assert info["model_type"] == {"embedding": {"pooling": emb.manifest.pooling}}


# ---- LangChain's OpenAIEmbeddings against /v1/embeddings ------------------------------------------------------


def test_langchain_openai_embeddings_defaults_get_a_clear_422(m3: tuple[str, Embedder],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAIEmbeddings' default check_embedding_ctx_length=True sends tiktoken token ids: the server must refuse
    them with a 422 that says what to set, never embed them; with the setting it sends text and matches."""
    openai = pytest.importorskip("openai")
    lc_openai = pytest.importorskip("langchain_openai")
    tiktoken = pytest.importorskip("tiktoken")
    # tiktoken downloads its BPE tables on first use and tests have no network. llama-index-core ships tiktoken's
    # cache of cl100k_base (OpenAI's embedding tokenizer): point tiktoken at it, so LangChain sends the real ids.
    # Without it, a byte-level tiktoken encoding gives the same request shape (lists of token ids).
    spec = importlib.util.find_spec("llama_index.core")
    cache = Path(spec.origin).parent / "_static" / "tiktoken_cache" if spec and spec.origin else None
    if cache is not None and cache.is_dir():
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    else:
        byte_level = tiktoken.Encoding("bytes", pat_str=r"\S+|\s+", special_tokens={},
                                       mergeable_ranks={bytes([i]): i for i in range(256)})
        monkeypatch.setattr(tiktoken, "encoding_for_model", lambda name: byte_level)
    url, emb = m3
    kw: dict[str, Any] = {"model": "bge-m3", "base_url": url + "/v1", "api_key": "unused", "max_retries": 0}
    default = lc_openai.OpenAIEmbeddings(**kw)
    assert default.check_embedding_ctx_length is True
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        default.embed_documents(TEXTS[:2])
    assert exc.value.status_code == 422 and "check_embedding_ctx_length=False" in str(exc.value)
    with pytest.raises(openai.UnprocessableEntityError):
        default.embed_query(TEXTS[0])
    texts = lc_openai.OpenAIEmbeddings(**kw, check_embedding_ctx_length=False)
    np.testing.assert_allclose(np.array(texts.embed_documents(TEXTS)), emb.encode(TEXTS)["dense_vecs"], atol=1e-6)


def test_long_tokenize_request_runs_off_the_event_loop(m3: tuple[str, Embedder]) -> None:
    url, emb = m3
    text = "bge edge tokenises long texts on a worker thread. " * 500  # > INLINE_TOKENIZE_CHARS
    toks = httpx.post(url + "/tokenize", json={"inputs": text}, timeout=60).json()[0]
    assert len(toks) == emb.count_tokens([text])[0] and toks[-2]["stop"] <= len(text.encode("utf-8"))
