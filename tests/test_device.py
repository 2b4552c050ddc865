"""Device selection without a GPU: the provider list is built in one place and asserted here; CUDA asked for
and unavailable is an error, never a silent CPU run; ``auto`` falls back to the CPU and says so in ``info``.
The CUDA path's I/O binding wrapper is proven on the CPU: same outputs as ``run``, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bge_edge.runtime import BackendError, Embedder, MissingExtraError
from bge_edge.runtime import session as session_mod
from bge_edge.runtime.session import CPU, CUDA, BoundSession, bind_io, build_providers, parse_device


def test_cpu_never_lists_cuda_even_when_it_is_installed() -> None:
    assert build_providers("cpu", [CUDA, CPU]) == [(CPU, {})]


def test_cuda_n_selects_that_device_first_with_cpu_behind_it() -> None:
    providers = build_providers("cuda:1", [CUDA, CPU])
    assert [p for p, _ in providers] == [CUDA, CPU]
    assert providers[0][1]["device_id"] == 1


@pytest.mark.parametrize("available", [[CUDA, CPU], [CPU]])
def test_auto_prefers_cuda_only_when_present(available: list[str]) -> None:
    assert build_providers("auto", available)[0][0] == available[0]


def test_cuda_without_the_gpu_build_names_the_extra() -> None:
    with pytest.raises(MissingExtraError, match=r"bge-edge\[gpu\]"):
        build_providers("cuda", [CPU])


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:-1", "tpu"])
def test_unknown_device_is_a_clear_error(bad: str) -> None:
    with pytest.raises(BackendError, match="use 'cpu', 'cuda', 'cuda:N' or 'auto'"):
        parse_device(bad)


def test_embedder_on_cuda_without_provider_fails_before_any_session(m3_artifact: Path) -> None:
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(MissingExtraError, match="CUDA provider"):
        Embedder(m3_artifact, device="cuda", hash_cache=False)


class _FallbackSession:
    """What ONNX Runtime does when CUDA is listed but cannot start: it quietly runs on the CPU."""

    def __init__(self, path: str, so: object, providers: list) -> None:  # type: ignore[type-arg]
        self.asked = providers

    def get_providers(self) -> list[str]:
        return [CPU]


def test_silent_cpu_fallback_is_refused_for_cuda_and_allowed_for_auto(m3_artifact: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", _FallbackSession)
    graph = m3_artifact / "model.fp16.onnx"
    with pytest.raises(BackendError, match="could not start CUDA .* fell back"):
        session_mod.create_session(graph, device="cuda")
    sess = session_mod.create_session(graph, device="auto")
    assert sess.asked[0][0] == CUDA and sess.get_providers() == [CPU]


def test_auto_on_this_machine_runs_on_cpu_with_the_cpu_precision_and_says_so(m3_artifact: Path) -> None:
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    emb = Embedder(m3_artifact, device="auto", hash_cache=False)
    info = emb.info()
    assert info["providers"] == [CPU] and info["precision"] == "int8"
    assert emb.encode(["hello"])["dense_vecs"].shape == (1, emb.manifest.hidden_size)


def test_fp16_graph_runs_on_cpu_and_agrees_with_fp32(m3_artifact: Path) -> None:
    texts = ["hello world", "the model encodes every passage", "模型将每个段落编码"]
    d16 = Embedder(m3_artifact, precision="fp16", hash_cache=False).encode(texts)["dense_vecs"]
    d32 = Embedder(m3_artifact, precision="fp32", hash_cache=False).encode(texts)["dense_vecs"]
    cos = (d16 * d32).sum(1) / np.linalg.norm(d16, axis=1) / np.linalg.norm(d32, axis=1)
    assert cos.min() >= 0.999, cos


# ---- I/O binding (the CUDA session's run), proven on the CPU ---------------------------------------------------

HEADS = ["dense", "sparse", "colbert"]


def _feeds(artifact: Path) -> dict[str, np.ndarray]:
    """A padded batch of real token ids: three texts of different lengths, so the mask and padding matter."""
    from bge_edge.runtime.manifest import read_manifest
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    ids = [e.ids for e in tok.encode_batch(["the model encodes every passage into dense sparse and multi "
                                            "vector representations", "hello world", "模型将每个段落编码"])]
    pad = int(read_manifest(artifact).special_tokens["pad"] or 0)
    n = max(map(len, ids))
    input_ids = np.full((len(ids), n), pad, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)], mask[row, : len(x)] = x, 1
    return {"input_ids": input_ids, "attention_mask": mask}


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])
@pytest.mark.parametrize("outputs", [HEADS, ["colbert", "dense"], ["sparse"], None])
def test_io_binding_returns_exactly_what_run_returns(m3_artifact: Path, precision: str,
                                                     outputs: list[str] | None) -> None:
    plain = session_mod.create_session(m3_artifact / f"model.{precision}.onnx", device="cpu")
    bound = bind_io(plain)
    feeds = _feeds(m3_artifact)
    want, got = plain.run(outputs, feeds), bound.run(outputs, feeds)
    assert len(got) == len(want) == len(outputs or HEADS)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and np.array_equal(g, w)
    assert bound.get_providers() == plain.get_providers() == [CPU]


def test_embedder_through_io_binding_encodes_identically(m3_artifact: Path) -> None:
    texts = ["hello world", "the model encodes every passage", "模型将每个段落编码", ""]
    emb = Embedder(m3_artifact, precision="fp32", hash_cache=False)
    heads = {"return_dense": True, "return_sparse": True, "return_colbert_vecs": True}
    want = emb.encode(texts, **heads)
    emb._session = bind_io(emb._session)  # what create_session does on CUDA
    got = emb.encode(texts, **heads)
    assert np.array_equal(got["dense_vecs"], want["dense_vecs"])
    assert got["lexical_weights"] == want["lexical_weights"]
    assert all(np.array_equal(g, w) for g, w in zip(got["colbert_vecs"], want["colbert_vecs"]))


def test_io_binding_from_eight_threads_equals_serial(m3_artifact: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    bound = bind_io(session_mod.create_session(m3_artifact / "model.fp32.onnx", device="cpu", threads=1))
    feeds = _feeds(m3_artifact)
    jobs = [{k: v[i % 3:] for k, v in feeds.items()} for i in range(24)]  # three different batch shapes
    serial = [bound.run(HEADS, f) for f in jobs]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda f: bound.run(HEADS, f), jobs))
    assert all(np.array_equal(a, b) for s, t in zip(serial, threaded) for a, b in zip(s, t))


def test_io_binding_errors_are_backend_errors_without_onnxruntime_tracebacks(m3_artifact: Path) -> None:
    bound = bind_io(session_mod.create_session(m3_artifact / "model.fp32.onnx", device="cpu"))
    feeds = _feeds(m3_artifact)
    bad = [{k: v.astype(np.int32) for k, v in feeds.items()},  # wrong dtype
           {"input_ids": feeds["input_ids"]},  # an input missing
           feeds]  # an output that does not exist (below)
    for f, outputs in zip(bad, [HEADS, HEADS, ["dense", "nope"]]):
        with pytest.raises(BackendError, match=r"I/O binding on CPUExecutionProvider\) failed") as e:
            bound.run(outputs, f)
        assert e.value.__cause__ is None and e.value.__suppress_context__


class _CudaSession(_FallbackSession):
    """A session that started on CUDA (what onnxruntime-gpu gives on a working GPU)."""

    def get_providers(self) -> list[str]:
        return [CUDA, CPU]


def test_cuda_sessions_are_bound_and_cpu_sessions_are_not(m3_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graph = m3_artifact / "model.fp32.onnx"
    cpu = session_mod.create_session(graph, device="cpu")
    assert not isinstance(cpu, BoundSession) and cpu.get_providers() == [CPU]

    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", _CudaSession)
    for device in ("cuda", "cuda:1", "auto"):
        sess = session_mod.create_session(graph, device=device)
        assert isinstance(sess, BoundSession), device
        assert sess.get_providers() == [CUDA, CPU] and sess.asked[0][0] == CUDA  # passthrough to the session
    assert not isinstance(session_mod.create_session(graph, device="cuda", io_binding=False), BoundSession)
    monkeypatch.setattr(ort, "InferenceSession", _FallbackSession)
    assert not isinstance(session_mod.create_session(graph, device="auto"), BoundSession)  # auto fell back: CPU
    assert bind_io(bind_io(cpu)).sess is cpu  # never wrapped twice


def test_gpu_bench_without_cuda_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime as ort

    from bench import gpu

    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    for device in ("cuda", "cuda:1", "tpu"):
        assert gpu.main(["--device", device, "--quick"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("bench.gpu: ") and "Traceback" not in err, err
    assert "bge-edge[gpu]" in (gpu.check_device("cuda") or "")
