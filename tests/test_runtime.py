"""Runtime: parity with FlagEmbedding's math, batching invariants, integrity checks, bad input, threads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from bge_edge.runtime import ArtifactError, Embedder, InputError, IntegrityError
from conftest import LONG_MAX_LENGTH, PARITY_TEXTS
from reference import Reference, colbert_score, lexical_score


@pytest.fixture(scope="module")
def m3(m3_artifact: Path) -> Embedder:
    return Embedder(m3_artifact, precision="fp32", hash_cache=False)


def test_m3_dense_sparse_colbert_match_reference(m3: Embedder, m3_reference: Reference) -> None:
    out = m3.encode(PARITY_TEXTS, max_length=LONG_MAX_LENGTH, return_sparse=True, return_colbert_vecs=True)
    assert out["dense_vecs"].dtype == np.float32 and out["dense_vecs"].shape == (len(PARITY_TEXTS), 32)
    assert m3.last_stats.truncated == 1
    for k, text in enumerate(PARITY_TEXTS):
        ref = m3_reference.encode_one(text)
        assert np.abs(out["dense_vecs"][k] - ref["dense"]).max() <= 1e-5
        got_lex = out["lexical_weights"][k]
        assert set(got_lex) == set(ref["sparse"]), text
        for t, w in ref["sparse"].items():
            assert abs(float(got_lex[t]) - float(w)) <= 1e-5
            assert isinstance(got_lex[t], np.float32)
        col = out["colbert_vecs"][k]
        assert col.dtype == np.float32 and col.shape == ref["colbert"].shape
        assert np.abs(col - ref["colbert"]).max() <= 1e-5


def test_empty_string_gives_one_colbert_row_and_no_special_tokens_in_sparse(m3: Embedder) -> None:
    out = m3.encode("", return_sparse=True, return_colbert_vecs=True)
    assert out["colbert_vecs"].shape == (1, 32)
    assert out["dense_vecs"].shape == (32,)
    assert not set(out["lexical_weights"]) & {"0", "1", "2", "3"}


def test_mask_token_is_kept_in_sparse_weights(m3: Embedder, m3_reference: Reference) -> None:
    text = "hello <mask> world <mask>"
    out = m3.encode(text, return_sparse=True)
    ref = m3_reference.encode_one(text)
    mask_id = str(m3.manifest.special_tokens["mask"])
    assert mask_id in [str(i) for i in ref["ids"]]
    assert set(out["lexical_weights"]) == set(ref["sparse"])


def test_single_string_unwraps_and_list_does_not(m3: Embedder) -> None:
    one = m3.encode("hello world", return_sparse=True, return_colbert_vecs=True)
    many = m3.encode(["hello world"], return_sparse=True, return_colbert_vecs=True)
    assert one["dense_vecs"].shape == (32,) and many["dense_vecs"].shape == (1, 32)
    assert isinstance(one["lexical_weights"], dict) and isinstance(many["lexical_weights"], list)
    assert isinstance(one["colbert_vecs"], np.ndarray) and isinstance(many["colbert_vecs"], list)
    assert m3.encode("x")["lexical_weights"] is None and m3.encode("x")["colbert_vecs"] is None


def test_batched_equals_one_by_one_and_order_is_kept(m3: Embedder) -> None:
    rng = np.random.default_rng(0)
    words = "the model encodes every passage into dense sparse vectors 模型 🙂".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(0, 60)))) for _ in range(40)]
    batched = m3.encode(texts, batch_size=7, return_sparse=True, return_colbert_vecs=True)
    assert m3.last_stats.batches >= 6
    for k, t in enumerate(texts):
        one = m3.encode(t, return_sparse=True, return_colbert_vecs=True)
        assert np.abs(batched["dense_vecs"][k] - one["dense_vecs"]).max() <= 1e-5
        assert set(batched["lexical_weights"][k]) == set(one["lexical_weights"])
        assert np.abs(batched["colbert_vecs"][k] - one["colbert_vecs"]).max() <= 1e-5
    unsorted = m3.encode(texts, batch_size=7, sort_by_length=False)
    assert np.abs(unsorted["dense_vecs"] - batched["dense_vecs"]).max() <= 1e-5


def test_compute_score_matches_flagembedding_formulas(m3: Embedder, m3_reference: Reference) -> None:
    pairs = [("what is bge", "the model encodes every passage"), ("模型", "模型将每个段落编码"), ("", "hello")]
    got = m3.compute_score(pairs, weights_for_different_modes=[0.4, 0.2, 0.4])
    assert set(got) == {"dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"}
    for k, (q, p) in enumerate(pairs):
        rq, rp = m3_reference.encode_one(q), m3_reference.encode_one(p)
        dense = float(rq["dense"] @ rp["dense"])
        sparse = lexical_score(rq["sparse"], rp["sparse"])
        col = colbert_score(rq["colbert"], rp["colbert"])
        assert abs(got["dense"][k] - dense) <= 1e-5
        assert abs(got["sparse"][k] - sparse) <= 1e-5
        assert abs(got["colbert"][k] - col) <= 1e-5
        assert abs(got["sparse+dense"][k] - (0.2 * sparse + 0.4 * dense) / 0.6) <= 1e-5
        assert abs(got["colbert+sparse+dense"][k] - (0.4 * col + 0.2 * sparse + 0.4 * dense)) <= 1e-5
    single = m3.compute_score(pairs[0])
    assert isinstance(single["dense"], float)


def test_convert_id_to_token_reads_sparse_weights(m3: Embedder) -> None:
    lex = m3.encode("hello world", return_sparse=True)["lexical_weights"]
    tokens = m3.convert_id_to_token(lex)
    assert len(tokens) == len(lex) and all(isinstance(t, str) for t in tokens)


def test_dense_model_parity_and_query_instruction(bert_artifact: Path, tiny_bert_dir: Path) -> None:
    model = Embedder(bert_artifact, precision="fp32", hash_cache=False)
    ref = Reference(tiny_bert_dir, max_length=LONG_MAX_LENGTH, pooling="cls")
    out = model.encode(PARITY_TEXTS, max_length=LONG_MAX_LENGTH)["dense_vecs"]
    for k, t in enumerate(PARITY_TEXTS):
        assert np.abs(out[k] - ref.encode_one(t)["dense"]).max() <= 1e-5
    q = model.encode_queries(["what is bge"])["dense_vecs"][0]
    assert np.abs(q - ref.encode_one(model.manifest.query_instruction + "what is bge")["dense"]).max() <= 1e-5
    corpus = model.encode_corpus(["what is bge"])["dense_vecs"][0]
    assert np.abs(corpus - ref.encode_one("what is bge")["dense"]).max() <= 1e-5


def test_dense_artifact_refuses_sparse_and_colbert(bert_artifact: Path) -> None:
    model = Embedder(bert_artifact, hash_cache=False)
    with pytest.raises(ArtifactError, match="only the \\['dense'\\] head"):
        model.encode("x", return_sparse=True)
    with pytest.raises(ArtifactError, match="BGE-M3"):
        model.encode("x", return_colbert_vecs=True)


@pytest.mark.slow
def test_real_minilm_matches_reference(minilm_artifact: Path, minilm_dir: Path) -> None:
    model = Embedder(minilm_artifact, precision="fp32", hash_cache=False)
    ref = Reference(minilm_dir, max_length=256, pooling="mean")
    texts = PARITY_TEXTS + ["word " * 400]
    out = model.encode(texts)["dense_vecs"]
    assert model.last_stats.truncated == 1
    worst = max(np.abs(out[k] - ref.encode_one(t)["dense"]).max() for k, t in enumerate(texts))
    assert worst <= 1e-5, worst


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (None, "got NoneType"),
    (["ok", 3], r"texts\[1\] is int"),
    (b"bytes", "got bytes"),
    (["ok", b"bytes"], "decode bytes first"),
    (["fine", "a\ud800b"], r"texts\[1\] holds a lone surrogate"),
])
def test_bad_texts_raise_input_error(m3: Embedder, bad: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        m3.encode(bad)  # type: ignore[arg-type]


def test_empty_list_returns_empty_outputs(m3: Embedder) -> None:
    out = m3.encode([], return_sparse=True, return_colbert_vecs=True)
    assert out["dense_vecs"].shape == (0, 32) and out["lexical_weights"] == [] and out["colbert_vecs"] == []


def test_megabyte_string_is_truncated_and_counted(m3: Embedder) -> None:
    text = "science protein cell " * 50_000  # ~1 MB
    out = m3.encode([text, "short"], max_length=512, return_colbert_vecs=True)
    assert m3.last_stats.truncated == 1
    assert out["colbert_vecs"][0].shape == (511, 32)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size"), ({"max_length": 1}, "max_length"), ({"max_length": "64"}, "max_length"),
    ({"return_dense": False}, "nothing to compute"),
])
def test_bad_arguments_raise_input_error(m3: Embedder, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        m3.encode("x", **kwargs)


def test_missing_artifact_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        Embedder(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Embedder(tmp_path)


def test_unexported_precision_lists_what_exists(bert_artifact: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no onnx graph at precision 'fp16'; it has: onnx/fp32, onnx/int8"):
        Embedder(bert_artifact, precision="fp16", hash_cache=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", ["tokenizer.json", "model.int8.onnx"])
def test_flipped_byte_is_refused_before_any_session(bert_artifact: Path, tmp_path: Path, name: str,
                                                   hash_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    art = _copy(bert_artifact, tmp_path / "art")
    Embedder(art, precision="int8", hash_cache=hash_cache)  # a good verdict is cached first
    f = art / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    import bge_edge.runtime.loading as loading  # the one place sessions are built (Embedder and Reranker)

    def no_session(*a: object, **k: object) -> None:
        raise AssertionError("a session was created for a corrupt artifact")

    monkeypatch.setattr(loading, "create_session", no_session)
    with pytest.raises(IntegrityError, match=f"{name}.*SHA-256"):
        Embedder(art, precision="int8", hash_cache=hash_cache)


def test_truncated_file_and_escaping_paths_are_refused(bert_artifact: Path, tmp_path: Path) -> None:
    art = _copy(bert_artifact, tmp_path / "art")
    with open(art / "model.fp32.onnx", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(IntegrityError, match="1000 bytes"):
        Embedder(art, precision="fp32", hash_cache=False)
    manifest = json.loads((art / "manifest.json").read_text())
    entry = manifest["files"].pop("tokenizer.json")
    manifest["files"]["../tokenizer.json"] = entry
    manifest["tokenizer"] = "../tokenizer.json"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a plain relative path"):  # refused when the manifest is read
        Embedder(art, precision="int8", hash_cache=False)


def test_unknown_schema_version_is_refused(bert_artifact: Path, tmp_path: Path) -> None:
    art = _copy(bert_artifact, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="schema_version 99 is not supported"):
        Embedder(art)


def test_hash_cache_skips_rehashing_but_not_after_a_change(bert_artifact: Path, tmp_path: Path,
                                                           hash_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bge_edge.runtime.integrity as integrity

    art = _copy(bert_artifact, tmp_path / "art")
    calls: list[str] = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: calls.append(p.name) or real(p))
    Embedder(art, precision="int8", hash_cache=hash_cache)
    assert sorted(calls) == ["model.int8.onnx", "tokenizer.json"]
    calls.clear()
    Embedder(art, precision="int8", hash_cache=hash_cache)
    assert calls == []
    (art / "tokenizer.json").touch()  # same bytes, new mtime: the verdict no longer applies
    Embedder(art, precision="int8", hash_cache=hash_cache)
    assert calls == ["tokenizer.json"]


def test_backend_errors_do_not_leak_onnxruntime_tracebacks(m3: Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    from bge_edge.runtime import BackendError

    class Broken:
        def run(self, *a: object) -> None:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bad_alloc")

    monkeypatch.setattr(m3, "_session", Broken())
    with pytest.raises(BackendError, match="lower batch_size") as e:
        m3.encode("x")
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_one_embedder_from_eight_threads_equals_serial(m3: Embedder) -> None:
    rng = np.random.default_rng(1)
    words = "alpha beta gamma delta 模型 🙂 passage retrieval".split()
    jobs = [[" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(12)] for _ in range(16)]
    serial = [m3.encode(j, return_sparse=True, return_colbert_vecs=True) for j in jobs]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda j: m3.encode(j, return_sparse=True, return_colbert_vecs=True), jobs))
    for s, p in zip(serial, parallel):
        assert np.array_equal(s["dense_vecs"], p["dense_vecs"])
        assert s["lexical_weights"] == p["lexical_weights"]
        assert all(np.array_equal(a, b) for a, b in zip(s["colbert_vecs"], p["colbert_vecs"]))


def test_runtime_never_imports_heavy_packages(m3_artifact: Path, reranker_base_artifact: Path) -> None:
    code = (
        "import sys\n"
        "from bge_edge.runtime import Embedder, Reranker\n"
        f"m = Embedder({str(m3_artifact)!r}, hash_cache=False)\n"
        "m.encode(['hello'], return_sparse=True, return_colbert_vecs=True)\n"
        f"r = Reranker({str(reranker_base_artifact)!r}, backend='onnxruntime', hash_cache=False)\n"
        "r.compute_score([('a', 'b')]); r.rerank('a', ['b', 'c'])\n"
        "m.compute_score([('a', 'b')])\n"
        "import bge_edge.kernels, bge_edge.cli\n"
        "bad = [n for n in ('torch', 'transformers', 'optimum', 'onnx', 'openvino', 'bge_edge.export') "
        "if n in sys.modules]\n"
        "print(bad)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_count_tokens_counts_before_truncation_and_refuses_invalid_text(m3: Embedder) -> None:
    long_text = "repeat " * 100
    assert m3.count_tokens(["", long_text]) == [2, len(m3._tokenizer.encode(long_text).ids)]
    assert m3.count_tokens([long_text])[0] > 64  # the encode below truncates it, the count does not
    m3.encode([long_text], max_length=64)
    assert m3.last_stats.truncated == 1
    with pytest.raises(InputError, match=r"texts\[1\] holds a lone surrogate"):
        m3.count_tokens(["ok", "a\ud800b"])
