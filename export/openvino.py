"""OpenVINO IR graphs: converted from the plain traced ONNX graph (never the fused one, whose com.microsoft
ops only ONNX Runtime understands), saved as ``openvino/model.<precision>.xml`` + ``.bin``.

  fp32  weights and compute in fp32 (the runtime pins OpenVINO's execution precision to f32)
  fp16  weights compressed to fp16; compute in the CPU plugin's default precision (bf16 on CPUs with
        AVX512-BF16/AMX, else f32): the speed graph for such CPUs
  int8  NNCF, two candidates measured on the calibration texts, the faster one kept when it is accurate:
        static post-training quantisation (int8 weights and activations, SmoothQuant off) or, when its
        dense cosine to fp32 is under the bar, weight-only int8 (activations stay float).
Measured on all-MiniLM-L6-v2 (Xeon with AMX, 2 threads, f32 execution): static 19.6k tok/s, mean cosine
0.9942 with SmoothQuant off (0.9918 on); weight-only 9.7k tok/s, cosine 0.9994; fp32 graph on bf16 19.1k.
Static int8 executed with bf16 for the float parts loses badly on some texts (min cosine 0.58), so int8
graphs run with f32 for their float parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from bge_edge.runtime.ov_session import EXECUTION_PRECISION

__all__ = ["FOLDER", "convert", "save", "quantize_static", "compress_weights", "run_ir",
           "versions"]

FOLDER = "openvino"


def convert(onnx_path: Path) -> Any:
    """The plain traced ONNX graph as an OpenVINO model (dynamic batch and sequence axes kept)."""
    import openvino as ov

    return ov.convert_model(str(onnx_path))


def save(model: Any, xml: Path, compress_to_fp16: bool) -> list[str]:
    """Write ``xml`` and its ``.bin``; returns the .bin's name relative to the artifact folder."""
    import openvino as ov

    xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml), compress_to_fp16=compress_to_fp16)
    return [f"{FOLDER}/{xml.with_suffix('.bin').name}"]


def _dataset(ids: list[list[int]]) -> Any:
    import nncf

    items = [{"input_ids": np.array([x], dtype=np.int64), "attention_mask": np.ones((1, len(x)), dtype=np.int64)}
             for x in ids]
    return nncf.Dataset(items)


def _quiet_nncf() -> None:
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)


def quantize_static(model: Any, ids: list[list[int]]) -> Any:
    """Static INT8 (weights per channel, activations per tensor from calibration statistics), SmoothQuant off."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    _quiet_nncf()
    no_sq = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    return nncf.quantize(model, _dataset(ids), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(ids),
                         advanced_parameters=no_sq)


def compress_weights(model: Any) -> Any:
    """Weight-only INT8 (asymmetric, per output channel); activations stay float."""
    import nncf

    _quiet_nncf()
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


def run_ir(xml: Path, precision: str, ids: list[list[int]]) -> tuple[list[list[np.ndarray]], str]:
    """Each text alone through the IR at ``xml`` as the runtime compiles it; (outputs per text, execution precision)."""
    import openvino as ov

    core = ov.Core()
    cfg = {}
    if EXECUTION_PRECISION[precision]:
        cfg["INFERENCE_PRECISION_HINT"] = EXECUTION_PRECISION[precision]
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", cfg)
    req = compiled.create_infer_request()
    names = [o.get_any_name() for o in compiled.outputs]
    out: list[list[np.ndarray]] = []
    for x in ids:
        a = np.array([x], dtype=np.int64)
        res = req.infer({"input_ids": a, "attention_mask": np.ones_like(a)})
        row = {n: res[n][0].copy() for n in names}
        out.append([row[n] for n in ("dense", "sparse", "colbert", "score") if n in row])
    return out, compiled.get_property("INFERENCE_PRECISION_HINT").to_string()


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("openvino", "nncf"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out

