"""The optional OpenVINO backend (``pip install 'bge-edge[openvino]'``): an IR graph compiled for the CPU.

Same calling convention as an ONNX Runtime session (``run(output_names, feeds)``), plus ``run_many``,
which keeps ``streams`` batches in flight. Choices, measured on all-MiniLM-L6-v2 (bench/openvino.py):
  - dynamic shapes: batches are already padded to the runtime's few bucket lengths, and the CPU plugin
    keeps what it compiled per shape;
  - one stream with every physical core by default (OpenVINO's LATENCY hint): a batch-1 query is as fast
    as ONNX Runtime's; ``streams=2`` runs two batches at once on one core each (THROUGHPUT): on 2 cores
    it gave no corpus gain (30.0k vs 31.2k tok/s) at 1.3x the query latency (bench/results/openvino.md);
  - execution precision per graph precision (EXECUTION_PRECISION): fp32 and int8 graphs compute their
    float parts in f32 (static INT8 with bf16 float parts dropped single texts to cosine 0.85); fp16
    graphs use the plugin's default, bf16 on CPUs with AVX512-BF16/AMX.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import BackendError, MissingExtraError

__all__ = ["EXECUTION_PRECISION", "openvino_installed", "OpenVINOSession"]

# graph precision -> INFERENCE_PRECISION_HINT for the float parts (None: the CPU plugin's default)
EXECUTION_PRECISION: dict[str, str | None] = {"fp32": "f32", "fp16": None, "int8": "f32"}
INSTALL = "pip install 'bge-edge[openvino]'"


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("openvino") is not None


class OpenVINOSession:
    """An OpenVINO CompiledModel on the CPU with a pool of infer requests; safe to use from many threads."""

    def __init__(self, xml: Path, weights: Path, precision: str, threads: int, streams: int = 1) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise MissingExtraError(f"backend='openvino' needs the openvino package, not installed: run {INSTALL}  "
                                    f"(or use backend='onnxruntime').") from None
        cfg: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": streams,
                               "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT"}
        if EXECUTION_PRECISION[precision]:
            cfg["INFERENCE_PRECISION_HINT"] = EXECUTION_PRECISION[precision]
        try:
            core = ov.Core()
            self._compiled = core.compile_model(core.read_model(str(xml), str(weights)), "CPU", cfg)
        except Exception as e:  # openvino raises RuntimeError with C++ text
            raise BackendError(f"OpenVINO could not load {xml.name}: {str(e).strip()[:500]}. Check that the artifact "
                               f"matches this openvino version (bge-edge verify), or use backend='onnxruntime'.") \
                from None
        self.streams = streams
        self.threads = int(self._compiled.get_property("INFERENCE_NUM_THREADS"))
        self.execution = self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self._free: list[Any] = []
        self._lock = threading.Lock()

    def get_providers(self) -> list[str]:
        """What runs the graph, in the shape of ONNX Runtime's provider list."""
        return [f"OpenVINO CPU ({self.execution}, {self.streams} stream(s), {self.threads} threads)"]

    def _take(self) -> Any:
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._compiled.create_infer_request()

    def _give(self, reqs: Iterable[Any]) -> None:
        with self._lock:
            self._free.extend(reqs)

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One batch, synchronously; output arrays are copies (the request's buffers are reused)."""
        return next(self.run_many(outputs, [feeds], streams=1))

    def run_many(self, outputs: list[str], feeds: Iterable[dict[str, np.ndarray]],
                 streams: int | None = None) -> Iterator[list[np.ndarray]]:
        """Outputs of each batch in order, with up to ``streams`` batches computing at once."""
        n = self.streams if streams is None else streams
        reqs = [self._take() for _ in range(n)]
        pending: list[Any] = [None] * n  # per request: is a batch in flight?
        try:
            k = 0
            for f in feeds:
                r = reqs[k % n]
                if pending[k % n] is not None:
                    yield self._collect(r, outputs)
                r.start_async(f)
                pending[k % n] = True
                k += 1
            for j in range(k, k + n):  # the batches still in flight, oldest first
                if pending[j % n] is not None:
                    yield self._collect(reqs[j % n], outputs)
                    pending[j % n] = None
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"OpenVINO inference failed: {str(e).strip()[:400]}. If this is out of memory, lower "
                               f"batch_size or max_batch_tokens.") from None
        finally:
            for r in reqs:
                r.wait()
            self._give(reqs)

    @staticmethod
    def _collect(r: Any, outputs: list[str]) -> list[np.ndarray]:
        r.wait()
        return [r.get_tensor(name).data.copy() for name in outputs]
