"""Rerankers (issue 19): export of a one-label sequence classifier, the runtime ``Reranker`` and its parity with
FlagReranker's math in PyTorch (tests/reference_reranker.py) in both layouts (v2-m3: 8,194 positions; base: 514)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from bge_edge.runtime import Embedder, Reranker
from bge_edge.runtime.errors import ArtifactError, InputError, IntegrityError
from bge_edge.runtime.manifest import read_manifest

PARITY_TOLERANCE = 1e-5

# with the tiny models' tokenizer: ~840 tokens (> 512) and ~2,600 tokens (> 2,048)
LONG_PASSAGE = " ".join(["science protein cell gene study results patients effect treatment data"] * 20)
VERY_LONG_PASSAGE = " ".join(["the model encodes every passage into dense sparse and multi vector "
                              "representations for retrieval search query document"] * 40)
PAIRS = [
    ("what is panda?", "hi"),
    ("the model encodes", "the model encodes every passage into dense sparse and multi vector representations"),
    ("das modell", "das modell kodiert jede passage schnell und genau für die suche nach dokumenten"),
    ("le modèle", "le modèle encode chaque passage pour la recherche de documents très rapidement"),
    ("модель", "модель кодирует каждый фрагмент текста для поиска документов быстро"),
    ("模型", "模型将每个段落编码为稠密稀疏和多向量表示以便检索"),
    ("モデル", "モデルはすべての文章を検索のためにベクトルに変換します"),
    ("النموذج", "النموذج يرمز كل فقرة من أجل البحث عن المستندات بسرعة"),
    ("המודל", "המודל מקודד כל פסקה לחיפוש מסמכים במהירות"),
    ("मॉडल", "मॉडल हर अनुच्छेद को खोज के लिए तेजी से एन्कोड करता है"),
    ("", "a passage for an empty query"),
    ("a query for an empty passage", ""),
    ("", ""),
    ("Emoji 🙂🚀", "👍🏽 🇩🇪 ❤️ 🧬 science"),
    ("repeat " * 40, "repeat repeat repeat"),  # a query over 3/4 of the small max lengths
    ("protein", LONG_PASSAGE),
    ("treatment effect", VERY_LONG_PASSAGE),
]


@pytest.fixture(scope="module")
def m3_reference(tiny_reranker_m3_dir: Path):  # type: ignore[no-untyped-def]
    from reference_reranker import RerankerReference

    return RerankerReference(tiny_reranker_m3_dir)


@pytest.fixture(scope="module")
def base_reference(tiny_reranker_base_dir: Path):  # type: ignore[no-untyped-def]
    from reference_reranker import RerankerReference

    return RerankerReference(tiny_reranker_base_dir)


@pytest.fixture(scope="module")
def m3_fp32(reranker_m3_artifact: Path) -> Reranker:
    return Reranker(reranker_m3_artifact, precision="fp32", backend="onnxruntime", hash_cache=False)


@pytest.fixture(scope="module")
def base_fp32(reranker_base_artifact: Path) -> Reranker:
    return Reranker(reranker_base_artifact, precision="fp32", backend="onnxruntime", hash_cache=False)


def _max_diff(a: list[float], b: list[float]) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# ---- export ------------------------------------------------------------------------------------


def test_export_detects_a_reranker_and_records_its_checks(reranker_m3_artifact: Path,
                                                          reranker_base_artifact: Path) -> None:
    for art, max_length in ((reranker_m3_artifact, 8192), (reranker_base_artifact, 512)):
        m = read_manifest(art)
        assert (m.kind, m.heads, m.max_length) == ("reranker", ("score",), max_length)
        g = m.graph("fp32")
        assert g.accuracy["score_max_abs_diff"] <= PARITY_TOLERANCE  # the export's own check vs PyTorch
        i8 = m.graph("int8")
        assert i8.accuracy["score_pearson"] >= 0.9 and "pair_order_agreement" in i8.accuracy
        assert i8.quantization["method"] == "bge-edge per-token int8 (MatMulIntegerToFloat)"
        assert i8.quantization["batch_dependence_max_abs"]["score_max_abs_diff"] <= 1e-5
        steps = i8.quantization["steps"]  # under the 0.999 target export also tries the V projections fp32
        assert [st["kept_fp32"] for st in steps] == ["none"] + (["V projections"] if steps[0]["quality"] < 0.999
                                                                 else []), steps
        best = max(steps, key=lambda st: st["quality"])  # and keeps the better graph, rewritten if it came first
        assert i8.quantization["chosen"] == best["kept_fp32"] and i8.accuracy["score_pearson"] == best["quality"]
    m3 = read_manifest(reranker_m3_artifact)
    assert m3.graph("fp32").linear_attention and m3.graph("int8").linear_attention  # v2-m3: long-input path
    assert not read_manifest(reranker_base_artifact).graph("fp32").linear_attention  # 512 tokens: not needed
    assert m3.graph("fp32", "openvino").accuracy["score_max_abs_diff"] <= PARITY_TOLERANCE


def test_export_refuses_a_classifier_with_several_labels(tiny_reranker_base_dir: Path, tmp_path: Path) -> None:
    from bge_edge.export import SourceError, export_model

    src = tmp_path / "two-labels"
    shutil.copytree(tiny_reranker_base_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["id2label"] = {"0": "NO", "1": "YES"}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="2 labels; a reranker has exactly one"):
        export_model(src, tmp_path / "out", ["fp32"], quiet=True)
    assert not (tmp_path / "out").exists()


# ---- parity with FlagReranker's math -------------------------------------------------------------


@pytest.mark.parametrize("max_length", [512, 16, 64, 1024, 8192])
@pytest.mark.parametrize("normalize", [False, True])
def test_v2_m3_layout_matches_flag_reranker(m3_fp32: Reranker, m3_reference, max_length: int,  # type: ignore[no-untyped-def]
                                            normalize: bool) -> None:
    got = m3_fp32.compute_score(PAIRS, max_length=max_length, normalize=normalize)
    want = m3_reference.compute_score(PAIRS, max_length=max_length, normalize=normalize)
    assert isinstance(got, list) and len(got) == len(PAIRS)
    assert _max_diff(got, want) <= PARITY_TOLERANCE
    if max_length == 8192:  # the passages over 512 and 2,048 tokens were read whole, alone, on the flash branch
        assert m3_fp32.last_stats.truncated == 0
        assert [s for s in m3_fp32.last_stats.batch_shapes if s[1] > 512][:1] == [(1, len(
            m3_reference.inputs(*PAIRS[-1], max_length)))] and m3_fp32.last_stats.batch_shapes[1][0] == 1


@pytest.mark.parametrize("max_length", [512, 16, 100])
@pytest.mark.parametrize("normalize", [False, True])
def test_base_layout_matches_flag_reranker(base_fp32: Reranker, base_reference, max_length: int,  # type: ignore[no-untyped-def]
                                           normalize: bool) -> None:
    got = base_fp32.compute_score(PAIRS, max_length=max_length, normalize=normalize)
    want = base_reference.compute_score(PAIRS, max_length=max_length, normalize=normalize)
    assert _max_diff(got, want) <= PARITY_TOLERANCE


def test_query_max_length_batch_size_and_openvino_fp32_match_too(reranker_m3_artifact: Path, m3_fp32: Reranker,
                                                                 m3_reference) -> None:  # type: ignore[no-untyped-def]
    want = m3_reference.compute_score(PAIRS, max_length=256, query_max_length=5)
    assert _max_diff(m3_fp32.compute_score(PAIRS, max_length=256, query_max_length=5, batch_size=3), want) \
        <= PARITY_TOLERANCE
    ov = Reranker(reranker_m3_artifact, precision="fp32", backend="openvino", hash_cache=False)
    assert ov.backend == "openvino"
    want = m3_reference.compute_score(PAIRS, max_length=1024)
    assert _max_diff(ov.compute_score(PAIRS, max_length=1024), want) <= PARITY_TOLERANCE


def test_pair_truncation_follows_transformers(m3_fp32: Reranker, m3_reference) -> None:  # type: ignore[no-untyped-def]
    from bge_edge.runtime.reranker import pair_ids

    tok = m3_reference.tok
    for q, p in PAIRS:
        for max_length in (6, 10, 16, 64, 512):
            qi, pi = (tok.encode(t, add_special_tokens=False).ids for t in (q, p))
            ids, _ = pair_ids(qi, pi, m3_reference.cls, m3_reference.sep, max_length, max_length * 3 // 4)
            assert ids == m3_reference.inputs(q, p, max_length)


def test_defaults_are_flag_rerankers(m3_fp32: Reranker, m3_reference) -> None:  # type: ignore[no-untyped-def]
    got = m3_fp32.compute_score(PAIRS)  # max_length 512, query 384, raw logits
    assert _max_diff(got, m3_reference.compute_score(PAIRS, max_length=512)) <= PARITY_TOLERANCE
    assert m3_fp32.last_stats.truncated == 2  # the two long passages


# ---- runtime behaviour ---------------------------------------------------------------------------


def test_one_pair_gives_a_float_and_normalize_is_the_sigmoid(m3_fp32: Reranker) -> None:
    raw = m3_fp32.compute_score(("what is panda?", "hi"))
    assert isinstance(raw, float)
    assert m3_fp32.compute_score(["what is panda?", "hi"]) == raw  # FlagEmbedding also takes a 2-list
    assert m3_fp32.compute_score(("what is panda?", "hi"), normalize=True) == pytest.approx(1 / (1 + math.exp(-raw)))
    assert m3_fp32.compute_score([("what is panda?", "hi")]) == [raw]
    assert m3_fp32.compute_score([]) == []


def test_rerank_sorts_and_cuts(m3_fp32: Reranker) -> None:
    passages = [p for _, p in PAIRS[:12]]
    scores = m3_fp32.compute_score([("the model", p) for p in passages])
    ranked = m3_fp32.rerank("the model", passages)
    assert [i for i, _ in ranked] == sorted(range(len(passages)), key=lambda i: (-scores[i], i))
    assert [s for _, s in ranked] == sorted(scores, reverse=True)
    assert m3_fp32.rerank("the model", passages, top_k=3) == ranked[:3]
    assert m3_fp32.rerank("the model", []) == []
    same = m3_fp32.compute_score(("q", "same"))
    assert m3_fp32.rerank("q", ["same", "same"]) == [(0, same), (1, same)]  # ties: input order


def test_results_do_not_depend_on_batching_or_order(m3_fp32: Reranker) -> None:
    a = m3_fp32.compute_score(PAIRS, batch_size=1)
    b = m3_fp32.compute_score(list(reversed(PAIRS)), batch_size=64, max_batch_tokens=256)
    assert _max_diff(a, list(reversed(b))) <= PARITY_TOLERANCE


def test_int8_ranks_like_fp32(reranker_m3_artifact: Path, m3_fp32: Reranker) -> None:
    i8 = Reranker(reranker_m3_artifact, backend="onnxruntime", hash_cache=False)
    assert i8.precision == "int8"  # the CPU default
    pairs = PAIRS[:14]
    a, b = np.array(m3_fp32.compute_score(pairs)), np.array(i8.compute_score(pairs))
    assert np.corrcoef(a, b)[0, 1] > 0.9


def test_bad_inputs_are_refused_clearly(m3_fp32: Reranker) -> None:
    with pytest.raises(InputError, match=r"sentence_pairs\[1\] must be a \(query, passage\) pair"):
        m3_fp32.compute_score([("a", "b"), ("a",)])
    with pytest.raises(InputError, match=r"sentence_pairs\[0\] must be"):
        m3_fp32.compute_score([("a", 3)])
    with pytest.raises(InputError, match="sentence_pairs must be"):
        m3_fp32.compute_score("just a string")
    with pytest.raises(InputError, match="max_length must be an integer >= 6"):
        m3_fp32.compute_score([("a", "b")], max_length=4)
    with pytest.raises(InputError, match="query_max_length"):
        m3_fp32.compute_score([("a", "b")], query_max_length=0)
    with pytest.raises(InputError, match="batch_size"):
        m3_fp32.compute_score([("a", "b")], batch_size=0)
    with pytest.raises(InputError, match="top_k"):
        m3_fp32.rerank("q", ["a"], top_k=0)
    with pytest.raises(InputError, match=r"passages\[1\] is int"):
        m3_fp32.rerank("q", ["a", 1])  # type: ignore[list-item]
    with pytest.raises(InputError, match="lone surrogate"):
        m3_fp32.compute_score([("ok", "a\ud800b")])


def test_max_length_is_capped_at_the_models_limit(base_fp32: Reranker, base_reference) -> None:  # type: ignore[no-untyped-def]
    got = base_fp32.compute_score(PAIRS, max_length=100_000)  # base reads 512 tokens at most
    assert _max_diff(got, base_reference.compute_score(PAIRS, max_length=512)) <= PARITY_TOLERANCE


def test_wrong_kind_of_artifact_is_refused_both_ways(reranker_base_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="is a reranker.*use bge_edge.runtime.Reranker"):
        Embedder(reranker_base_artifact, hash_cache=False)
    fake = tmp_path / "embedder"
    fake.mkdir()
    d = json.loads((reranker_base_artifact / "manifest.json").read_text())
    d.update(kind="dense", heads=["dense"])
    (fake / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="not a reranker: load it with bge_edge.runtime.Embedder"):
        Reranker(fake)


def test_a_tampered_graph_is_refused_before_loading(reranker_base_artifact: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(reranker_base_artifact, art)
    with open(art / "model.fp32.onnx", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(IntegrityError, match="model.fp32.onnx"):
        Reranker(art, precision="fp32", hash_cache=False)


PEERS_PYTHON = Path(__file__).resolve().parents[1] / ".venv-bench" / "bin" / "python"
_FLAG_CODE = """
import json, sys
from FlagEmbedding import FlagReranker
src, pairs, lengths = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
r = FlagReranker(src, use_fp16=False, devices="cpu")
out = {str(n): [r.compute_score(pairs, max_length=n, normalize=norm) for norm in (False, True)] for n in lengths}
out["single"] = r.compute_score(pairs[0])
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not PEERS_PYTHON.exists(),
                    reason="FlagEmbedding lives in the peers' venv: bash bench/setup_peers.sh")
@pytest.mark.parametrize("layout", ["m3", "base"])
def test_matches_flagembedding_flagreranker_itself(layout: str, m3_fp32: Reranker, base_fp32: Reranker,
                                                   tiny_reranker_m3_dir: Path, tiny_reranker_base_dir: Path) -> None:
    """The real FlagEmbedding FlagReranker (1.4, transformers 4.x, in .venv-bench), not only its math."""
    model, src = (m3_fp32, tiny_reranker_m3_dir) if layout == "m3" else (base_fp32, tiny_reranker_base_dir)
    lengths = [512, 64, 16] + ([4096] if layout == "m3" else [])
    r = subprocess.run([str(PEERS_PYTHON), "-c", _FLAG_CODE, str(src), json.dumps(PAIRS), json.dumps(lengths)],
                       capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    flag = json.loads(r.stdout.strip().splitlines()[-1])
    for n in lengths:
        for norm, want in zip((False, True), flag[str(n)]):
            assert _max_diff(model.compute_score(PAIRS, max_length=n, normalize=norm), want) <= PARITY_TOLERANCE


def test_fp16_export_for_gpus_agrees_with_fp32(tiny_reranker_base_dir: Path, base_fp32: Reranker,
                                               tmp_path: Path) -> None:
    from bge_edge.export import export_model

    m = export_model(tiny_reranker_base_dir, tmp_path / "fp16", ["fp16"], quiet=True)
    g = m.graph("fp16")
    assert g.accuracy["score_pearson"] >= 0.999 and g.cpu_target == "gpu"
    r = Reranker(tmp_path / "fp16", precision="fp16", backend="onnxruntime", hash_cache=False)  # runs on CPU too
    pairs = PAIRS[:14]
    assert _max_diff(r.compute_score(pairs), base_fp32.compute_score(pairs)) < 0.05


def test_a_reranker_graph_reading_unlisted_external_data_is_refused(reranker_base_artifact: Path,
                                                                     tmp_path: Path) -> None:
    """The Reranker loads through the same checks as the Embedder (runtime/loading.py), unlisted external data too."""
    import onnx
    from bge_edge.runtime.errors import IntegrityError
    from bge_edge.runtime.integrity import sha256_file

    art = tmp_path / "art"
    shutil.copytree(reranker_base_artifact, art)
    graph = art / "model.fp32.onnx"
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["model.fp32.onnx"] = {"size": graph.stat().st_size, "sha256": sha256_file(graph)}
    (art / "manifest.json").write_text(json.dumps(m))
    assert (art / "weights.bin").is_file()
    with pytest.raises(IntegrityError, match="refers to the external-data file 'weights.bin', which its manifest"):
        Reranker(art, precision="fp32", backend="onnxruntime", hash_cache=False)
