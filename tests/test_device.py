"""Device selection without a GPU: the provider list is built in one place and asserted here; CUDA asked for
and unavailable is an error, never a silent CPU run; ``auto`` falls back to the CPU and says so in ``info``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bge_edge.runtime import BackendError, Embedder, MissingExtraError
from bge_edge.runtime import session as session_mod
from bge_edge.runtime.session import CPU, CUDA, build_providers, parse_device


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
