"""INT8 by ONNX Runtime's dynamic quantisation (QAttention, DynamicQuantizeMatMul): opt-in, ``--int8-recipe dynamic``.

The recipe export wrote before issue 18. Its activations get one scale per run, over the whole batch, so a text's
output depends on its batch neighbours and its padding (3e-2 max abs on real MiniLM), and it is further from fp32
(cosine 0.9967 vs the per-token recipe's 0.9992). It is kept for one reason: on AVX2 hosts without VNNI it is
faster than the per-token graph (1.08-1.23x corpus throughput, 1.19-1.34x one query alone; bench/results/int8.md),
which a throughput-first user may prefer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["write_dynamic_int8", "recipe"]


def recipe(embeddings: str, kept_fp32: list[str]) -> dict[str, Any]:
    """The manifest's description of a graph written by `write_dynamic_int8`."""
    return {"method": "onnxruntime dynamic int8 (QAttention; DynamicQuantizeLinear + MatMulInteger, fused to "
                      "DynamicQuantizeMatMul when the session loads)",
            "weights": "int8 per output channel, symmetric",
            "activations": "uint8 per tensor, one scale per run over the whole batch (depends on the batch)",
            "attention": "QAttention (Q/K/V projection int8, softmax fp32)",
            "embeddings": embeddings, "kept_fp32": kept_fp32, "batch_invariant": False}


def write_dynamic_int8(fp32: Path, out: Path, keep_fp32: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The dynamic int8 graph of the fused fp32 graph ``fp32`` (no flash-attention branch), written to ``out``;
    returns (extra files, manifest recipe). ``keep_fp32``: MatMul names left in float."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    big = Path(str(fp32) + ".data").exists() or fp32.stat().st_size > 1_800_000_000
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantiser logs every node it skips at INFO/WARNING
    try:
        quantize_dynamic(str(fp32), str(out), op_types_to_quantize=["MatMul", "Attention", "Gather"],
                         per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=list(keep_fp32),
                         use_external_data_format=big,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})
    finally:
        logging.getLogger().setLevel(level)
    extra = [p.name for p in [out.with_name(out.name + ".data")] if p.exists()]
    g = onnx.load(str(out), load_external_data=False).graph
    int8_tensors = {t.name for t in g.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    tables = any(n.op_type == "Gather" and n.input[0] in int8_tensors for n in g.node)
    fused = any(n.op_type == "EmbedLayerNormalization" for n in g.node)  # which the quantiser leaves alone
    embeddings = ("int8 per tensor (Gather)" if tables else
                  "fp32 (inside the fused EmbedLayerNormalization)" if fused else "fp32")
    return extra, recipe(embeddings, list(keep_fp32))
