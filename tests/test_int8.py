"""INT8 (export/int8.py): a text's output does not depend on its batch or its padding, the int8 weights can never
saturate AVX2's int16 pair sums, the graph rewrites are exact in fp32, and real MiniLM stays close to FP32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bge_edge.runtime import Embedder, read_manifest

from bench.retrieval import load_task
from export import check

BATCH = 32  # texts in one batch


@pytest.mark.parametrize("which", ["minilm_artifact", "m3_artifact", "reranker_m3_artifact"])
def test_int8_output_is_the_same_alone_in_a_batch_and_padded_longer(which: str, scifact_dir: Path,
                                                                     request: pytest.FixtureRequest) -> None:
    """Each text alone and unpadded vs in a batch of 32 vs in that batch padded 64 tokens further (bench.int8's
    measurement): every output (dense, M3 sparse and ColBERT rows, reranker score) within 1e-5."""
    import onnxruntime as ort

    from bench.int8 import batch_dependence, ort_runner

    art: Path = request.getfixturevalue(which)
    m = read_manifest(art)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    rows = check.tokenize(art / "tokenizer.json", load_task(scifact_dir).docs[:BATCH], 128)
    worst = batch_dependence(ort_runner(art / m.graph("int8").file, so), rows, int(m.special_tokens.get("pad") or 0))
    assert max(worst.values()) <= 1e-5, worst


def test_pair_safe_weights_bound_every_adjacent_pair_at_little_cost() -> None:
    from export.int8 import PAIR_LIMIT, pair_safe_int8

    rng = np.random.default_rng(0)
    w = rng.standard_normal((385, 96)).astype(np.float32)  # odd K: the last row pairs with nothing
    w[10:12] *= 30  # two adjacent outlier rows, same sign in about half the columns: the worst case
    w[384] *= 30
    q, scale = pair_safe_int8(w)
    q32 = q.astype(np.int32)
    assert q.dtype == np.int8 and np.abs(q32).max() <= 127
    assert np.abs(q32[0:384:2] + q32[1:384:2]).max() <= PAIR_LIMIT
    plain = np.abs(w).max(axis=0) / 127
    err = np.abs(q32 * scale - w).max(axis=0) / plain  # in units of a plain per-column step
    assert err.max() <= 1.0, "at most one plain quantisation step per weight"


def test_matmul_with_pair_safe_weights_is_exact_at_the_worst_activations() -> None:
    """Every activation code 255 (zero point 128): each int16 pair sum is at its largest. With pair-safe weights
    ONNX Runtime's result equals exact integer math; plain weights of 127 + 127 overflow int16 on AVX2 hosts."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.int8 import pair_safe_int8

    K, N = 64, 16
    w = np.full((K, N), 1.0, np.float32)
    q, _ = pair_safe_int8(w)
    a = np.full((4, K), 255, np.uint8)

    def run(b: np.ndarray) -> np.ndarray:
        g = helper.make_graph(
            [helper.make_node("MatMulIntegerToFloat", ["a", "b", "one", "one", "zp"], ["y"], domain="com.microsoft")],
            "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, K])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp")])
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        sess = ort.InferenceSession(helper.make_model(g, opset_imports=opsets).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        return sess.run(None, {"a": a})[0]

    exact = lambda b: ((a.astype(np.int64) - 128) @ b.astype(np.int64)).astype(np.float32)  # noqa: E731
    np.testing.assert_array_equal(run(q), exact(q))
    plain = np.full((K, N), 127, np.int8)
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx2" in cpu and "vnni" not in cpu:  # the kernel this guards against: vpmaddubsw's saturating pair sums
        assert not np.array_equal(run(plain), exact(plain)), "expected int16 saturation with plain weights here"


def _model(nodes: list[Any], inputs: list[Any], outputs: list[str], inits: dict[str, np.ndarray]) -> Any:
    """A one-graph ONNX model (opset 17 + com.microsoft) of ``nodes``, every output float."""
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                               for o in outputs],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _run(model: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_row_quantised_matmul_matches_integer_math_when_a_row_peaks_negative() -> None:
    """Each token row on its own scale max|x| / 127, also where a row's largest magnitude is a negative value (the
    graph takes max(max x, -min x)): ONNX Runtime equals per-row integer math to within one rounding flip."""
    from onnx import TensorProto, helper

    from export.int8 import pair_safe_int8, quantize_rows

    rng = np.random.default_rng(1)
    B, S, K, N = 2, 5, 48, 24
    x = rng.standard_normal((B, S, K)).astype(np.float32)
    x[0, :, 7] = -12.0  # these rows peak negative: a scale from max x alone would clip them
    x[1, 2, 30] = 9.0
    w = rng.standard_normal((K, N)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, K])], ["y"], {"w": w})
    assert quantize_rows(model, set(), 17) == 1
    got = _run(model, {"x": x})[0]

    rows = x.reshape(-1, K)
    s = np.abs(rows).max(axis=1, keepdims=True) / 127
    u = np.clip(np.round(rows / s) + 128, 0, 255)
    q, ws = pair_safe_int8(w)
    want = ((u - 128) @ q.astype(np.float64)) * ws * s
    one_code = s * (np.abs(q).max(axis=0) * ws)  # what one flipped rounding can move an output by
    assert np.all(np.abs(got.reshape(-1, N) - want) <= 1.01 * one_code + 1e-6)


def test_gelu_shift_correction_goes_into_a_private_copy_of_a_shared_bias() -> None:
    """The GELU output's +0.17 shift is undone in the next SkipLayerNormalization's bias, not by an Add; where that
    bias is shared (random-weight models tie all-zero ones), the other reader keeps the original."""
    from onnx import TensorProto, helper

    from export.int8 import quantize_rows

    rng = np.random.default_rng(2)
    T, H, F = 6, 32, 64
    inits = {"w": rng.standard_normal((F, H)).astype(np.float32) * 0.2,
             "g": np.ones(H, np.float32), "b0": np.zeros(H, np.float32), "bias": np.zeros(H, np.float32)}
    ms = "com.microsoft"
    nodes = [helper.make_node("Gelu", ["z"], ["act"], domain=ms),
             helper.make_node("MatMul", ["act", "w"], ["down"], name="down"),
             helper.make_node("SkipLayerNormalization", ["down", "r", "g", "b0", "bias"], ["out"], domain=ms),
             helper.make_node("SkipLayerNormalization", ["r", "r", "g", "b0", "bias"], ["other"], domain=ms)]
    ins = [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, T, F]),
           helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, T, H])]
    feed = {"z": rng.standard_normal((1, T, F)).astype(np.float32),
            "r": rng.standard_normal((1, T, H)).astype(np.float32)}
    before = _run(_model(nodes, ins, ["out", "other"], inits), feed)
    model = _model(nodes, ins, ["out", "other"], inits)
    quantize_rows(model, set(), 17)
    after = _run(model, feed)
    adds = [n.name for n in model.graph.node if n.op_type == "Add"]
    assert len(adds) == 1, f"only the shift itself is an Add, its correction is in a bias: {adds}"
    np.testing.assert_array_equal(after[1], before[1])
    cos = np.sum(after[0] * before[0], -1) / np.linalg.norm(after[0], axis=-1) / np.linalg.norm(before[0], axis=-1)
    assert cos.min() >= 0.999, cos


def test_multihead_rewrite_and_smoothing_keep_the_fp32_math(minilm_artifact: Path, tmp_path: Path) -> None:
    import onnx

    from export.int8 import _quantizable, calibrate, smooth, to_multihead

    fp32 = minilm_artifact / "model.fp32.onnx"
    ids = check.tokenize(minilm_artifact / "tokenizer.json", check.CALIBRATION_TEXTS, 256)
    model = onnx.load(str(fp32))
    assert to_multihead(model) == 6
    names = sorted({n.input[0] for n in _quantizable(model, set())})
    smooth(model, calibrate(fp32, names, ids), 0.5, set())
    attention_out = {o for n in model.graph.node if n.op_type == "MultiHeadAttention" for o in n.output}
    assert not [n.name for n in model.graph.node if n.op_type == "Mul" and n.input[0] in attention_out], \
        "an attention output's smoothing belongs in the V projection, not in a Mul"
    onnx.save_model(model, str(tmp_path / "smoothed.onnx"))
    par = check.parity(check.run_graph(fp32, ids, 0), check.run_graph(tmp_path / "smoothed.onnx", ids, 0))
    assert par["dense_max_abs_diff"] <= 1e-5, par


@pytest.mark.slow
def test_int8_on_real_minilm_is_close_to_fp32_over_400_scifact_documents(minilm_artifact: Path,
                                                                         scifact_dir: Path) -> None:
    """Issue 18's quality goal: mean cosine >= 0.999, min >= 0.997 (export keeps what the target needs fp32)."""
    import onnx

    docs = load_task(scifact_dir).docs[:400]
    got = {p: Embedder(minilm_artifact, precision=p, backend="onnxruntime").encode(docs)["dense_vecs"]
           for p in ("fp32", "int8")}
    cos = np.sum(got["fp32"] * got["int8"], axis=1)  # both L2-normalised
    g = read_manifest(minilm_artifact).graph("int8")
    steps = g.quantization["steps"]
    print(f"int8 vs fp32 dense cosine over 400 SciFact documents: mean {cos.mean():.5f}, min {cos.min():.5f}; "
          f"export's steps {steps}")
    # measured on an AVX2 host: 0.99924 / 0.99882 with the V projections fp32 (all-INT8: 0.99888 / 0.99827)
    assert cos.mean() >= 0.999 and cos.min() >= 0.997
    # all-INT8 is under the 0.999 target on the calibration texts (0.99885): the 6 V projections stay fp32
    assert g.quantization["chosen"] == "V projections" and steps[0]["quality"] < 0.999 <= steps[1]["quality"]
    floats = [n.name for n in onnx.load(str(minilm_artifact / g.file)).graph.node if n.op_type == "MatMul"]
    assert len(floats) == 6 and sorted(floats) == sorted(g.quantization["kept_fp32"])


def test_openvino_int8_output_is_the_same_alone_and_in_a_padded_batch(m3_ov_artifact: Path, scifact_dir: Path) -> None:
    """NNCF's INT8 has static activation scales: batch-invariant by construction; measured here so it stays so."""
    pytest.importorskip("openvino")
    from bench.int8 import batch_dependence, ov_runner

    m = read_manifest(m3_ov_artifact)
    rows = check.tokenize(m3_ov_artifact / "tokenizer.json", load_task(scifact_dir).docs[:8], 128)
    worst = batch_dependence(ov_runner(m3_ov_artifact / m.graph("int8", "openvino").file, 2), rows,
                             int(m.special_tokens.get("pad") or 0))
    assert max(worst.values()) <= 1e-5, worst
