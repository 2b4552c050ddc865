"""The optional OpenVINO backend (``pip install 'bge-edge[openvino]'``): an IR graph compiled for the CPU.

Same calling convention as an ONNX Runtime session (``run(output_names, feeds)``), plus ``run_many``,
which keeps ``streams`` batches in flight. Choices, measured on all-MiniLM-L6-v2 (bench/openvino.py):
  - dynamic shapes by default: one compile, one set of weights; ``shapes="bucket"`` adds a plan per bucket
    length (1.09-1.10x once warm, ~0.5 s of compile and ~95 MB per length on MiniLM: long-running processes);
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
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .batching import LINEAR_ATTENTION_FROM
from .errors import BackendError, MissingExtraError

__all__ = ["EXECUTION_PRECISION", "SHAPES", "STATIC_UP_TO", "openvino_installed", "OpenVINOSession"]

# graph precision -> INFERENCE_PRECISION_HINT for the float parts (None: the CPU plugin's default)
EXECUTION_PRECISION: dict[str, str | None] = {"fp32": "f32", "fp16": None, "int8": "f32"}
INSTALL = "pip install 'bge-edge[openvino]'"
# shapes="bucket" fixes the length of batches padded up to this many tokens; longer texts run alone at their
# exact length on linear-attention graphs (batching.py), so they keep the dynamic plan
STATIC_UP_TO = LINEAR_ATTENTION_FROM


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("openvino") is not None


SHAPES = ("dynamic", "bucket")


class OpenVINOSession:
    """An OpenVINO CompiledModel on the CPU with a pool of infer requests; safe to use from many threads.

    ``shapes="bucket"`` also compiles, on first use, one plan per padded length up to ``STATIC_UP_TO`` tokens
    with that length fixed ([-1, L]; the runtime pads every batch to a few bucket lengths): 1.09x the corpus
    throughput once warm on MiniLM INT8 on AMD Zen 4, 1.10x on Intel Sapphire Rapids, at ~0.5 s of compile and
    ~95 MB of memory per new length (bench/results/openvino.md). For long-running processes; longer inputs (a
    BGE-M3 document's exact length) keep the dynamic plan. ``shapes`` is checked by the Embedder.
    """

    def __init__(self, xml: Path, weights: Path, precision: str, threads: int, streams: int = 1,
                 shapes: str = "dynamic") -> None:
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
            self._core = ov.Core()
            self._model = self._core.read_model(str(xml), str(weights))
            dynamic = self._core.compile_model(self._model, "CPU", cfg)
        except Exception as e:  # openvino raises RuntimeError with C++ text
            raise BackendError(f"OpenVINO could not load {xml.name}: {str(e).strip()[:500]}. Check that the artifact "
                               f"matches this openvino version (bge-edge verify), or use backend='onnxruntime'.") \
                from None
        self._cfg = cfg
        self.streams = streams
        self.shapes = shapes
        self.threads = int(dynamic.get_property("INFERENCE_NUM_THREADS"))
        self.execution = dynamic.get_property("INFERENCE_PRECISION_HINT").to_string()
        self._plans: dict[int, Any] = {0: dynamic}  # 0: the dynamic plan; L: the plan with the length fixed at L
        self._free: dict[int, list[Any]] = {}
        self._lock = threading.Lock()
        self._compiling = threading.Lock()  # one compile at a time; others wait, then find the plan made
        self.compile_s = 0.0  # seconds spent compiling fixed-length plans (shapes="bucket")
        if shapes == "dynamic":
            self._model = None  # not needed again: let its memory go

    def get_providers(self) -> list[str]:
        """What runs the graph, in the shape of ONNX Runtime's provider list."""
        what = "" if self.shapes == "dynamic" else f", a plan per bucket length <= {STATIC_UP_TO}"
        return [f"OpenVINO CPU ({self.execution}, {self.streams} stream(s), {self.threads} threads{what})"]

    def _plan(self, length: int) -> int:
        """Which plan runs a batch padded to ``length`` (compiling it first if needed)."""
        if self.shapes == "dynamic" or length > STATIC_UP_TO:
            return 0
        if length not in self._plans:
            with self._compiling:
                if length not in self._plans:
                    t = time.perf_counter()
                    model = self._model.clone()
                    model.reshape({p.any_name: [-1, length] for p in model.inputs})
                    self._plans[length] = self._core.compile_model(model, "CPU", self._cfg)
                    self.compile_s += time.perf_counter() - t
        return length

    def _take(self, plan: int) -> Any:
        with self._lock:
            free = self._free.get(plan)
            if free:
                return free.pop()
        return self._plans[plan].create_infer_request()

    def _give(self, plan: int, req: Any) -> None:
        with self._lock:
            self._free.setdefault(plan, []).append(req)

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One batch, synchronously; output arrays are copies (the request's buffers are reused)."""
        return next(self.run_many(outputs, [feeds], streams=1))

    def run_many(self, outputs: list[str], feeds: Iterable[dict[str, np.ndarray]],
                 streams: int | None = None) -> Iterator[list[np.ndarray]]:
        """Outputs of each batch in order, with up to ``streams`` batches computing at once."""
        n = self.streams if streams is None else streams
        flight: deque[tuple[int, Any]] = deque()  # (plan, request) of the batches started, oldest first
        try:
            for f in feeds:
                if len(flight) == n:
                    yield self._collect(flight, outputs)
                plan = self._plan(int(f["input_ids"].shape[1]))
                r = self._take(plan)
                flight.append((plan, r))
                r.start_async(f)
            while flight:
                yield self._collect(flight, outputs)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"OpenVINO inference failed: {str(e).strip()[:400]}. If this is out of memory, lower "
                               f"batch_size or max_batch_tokens.") from None
        finally:
            for plan, r in flight:  # a consumer that stopped early: let the requests finish, keep them
                r.wait()
                self._give(plan, r)

    def _collect(self, flight: deque[tuple[int, Any]], outputs: list[str]) -> list[np.ndarray]:
        plan, r = flight[0]
        r.wait()
        out = [r.get_tensor(name).data.copy() for name in outputs]
        flight.popleft()
        self._give(plan, r)
        return out
