"""ONNX Runtime sessions: the provider list is built here and only here, with CPU tuning.

CPU defaults: intra-op threads = physical cores, no idle spinning (a sidecar must not burn CPU while
idle), all graph optimisations, the memory arena on and memory patterns off (shapes vary per batch).
CUDA is used only when asked for (or ``device="auto"`` finds it working), and a session that ONNX
Runtime silently put on CPU is refused: a user who asked for CUDA never runs on CPU unawares.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import BackendError, MissingExtraError
from .manifest import Manifest
from .ov_session import INSTALL as OPENVINO_INSTALL
from .ov_session import openvino_installed

__all__ = ["physical_cores", "parse_device", "choose_backend", "build_providers", "create_session"]

BACKENDS = ("onnxruntime", "openvino", "auto")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once); falls back to logical CPUs."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores: set[tuple[str, str]] = set()
    try:
        cpu = phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key, val = key.strip(), val.strip()
                if key == "processor":
                    cpu = int(val)
                elif key == "physical id":
                    phys = val
                elif key == "core id":
                    core = val
                elif not key and cpu is not None:
                    if cpu in allowed:
                        cores.add((phys or "0", core if core is not None else str(cpu)))
                    cpu = phys = core = None
            if cpu is not None and cpu in allowed:
                cores.add((phys or "0", core if core is not None else str(cpu)))
    except OSError:
        pass
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def parse_device(device: str) -> tuple[str, int]:
    """``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` -> (kind, device id)."""
    d = device.strip().lower()
    if d in ("cpu", "auto", "cuda"):
        return d, 0
    if d.startswith("cuda:") and d[5:].isdigit():
        return "cuda", int(d[5:])
    raise BackendError(f"device {device!r} is not understood; use 'cpu', 'cuda', 'cuda:N' or 'auto'.")


def choose_backend(manifest: Manifest, backend: str, device: str, precision: str | None) -> tuple[str, str]:
    """(``onnxruntime`` | ``openvino``, why): ``auto`` takes OpenVINO when it is installed and the artifact has
    an OpenVINO graph (of ``precision`` when given) and the device is the CPU; ONNX Runtime otherwise."""
    if backend not in BACKENDS:
        raise BackendError(f"backend {backend!r} is not known; use one of {list(BACKENDS)}.")
    kind, _ = parse_device(device)
    ov_graphs = {g.precision for g in manifest.graphs if g.format == "openvino"}
    if backend == "onnxruntime":
        return backend, "asked for"
    if backend == "openvino":
        if kind != "cpu":
            raise BackendError(f"backend='openvino' runs on the CPU here; device={device!r} needs "
                               f"backend='onnxruntime' (CUDA provider).")
        if not openvino_installed():
            raise MissingExtraError(f"backend='openvino' needs the openvino package, not installed: run "
                                    f"{OPENVINO_INSTALL}  (or use backend='onnxruntime').")
        return backend, "asked for"
    if kind != "cpu":
        return "onnxruntime", f"device={device!r}: GPUs run on ONNX Runtime's CUDA provider"
    if not ov_graphs or (precision is not None and precision not in ov_graphs):
        what = "no OpenVINO graph" if not ov_graphs else f"no OpenVINO {precision} graph"
        return "onnxruntime", f"the artifact has {what} (export with --format onnx openvino)"
    if not openvino_installed():
        return "onnxruntime", f"openvino is not installed ({OPENVINO_INSTALL} to use the artifact's OpenVINO graphs)"
    return "openvino", "openvino is installed and the artifact has OpenVINO graphs"


def build_providers(device: str, available: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The execution-provider list for ``device``, given ONNX Runtime's available providers.

    ``auto`` -> CUDA first when present; ``cuda`` without the CUDA provider is an error naming the fix.
    """
    kind, dev_id = parse_device(device)
    cuda = (CUDA, {"device_id": dev_id, "arena_extend_strategy": "kSameAsRequested",
                   "cudnn_conv_algo_search": "HEURISTIC"})
    if kind == "cpu":
        return [(CPU, {})]
    if kind == "cuda" and CUDA not in available:
        raise MissingExtraError(
            f"device={device!r} needs ONNX Runtime's CUDA provider, but this onnxruntime offers only {available}. "
            f"Run: pip uninstall -y onnxruntime && pip install 'bge-edge[gpu]'  (or use device='cpu').")
    if kind == "auto" and CUDA not in available:
        return [(CPU, {})]
    return [cuda, (CPU, {})]


def create_session(path: Path, device: str = "cpu", threads: int | None = None, spin: bool = False) -> Any:
    """An InferenceSession for the graph at ``path`` (already verified by the caller)."""
    import onnxruntime as ort

    providers = build_providers(device, ort.get_available_providers())
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads if threads else physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_mem_pattern = False  # shapes change from batch to batch; patterns would only be recomputed
    so.enable_cpu_mem_arena = True
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind exception types
        raise BackendError(f"ONNX Runtime could not load {path.name} on {device}: {str(e).strip()[:500]}. "
                           f"Check that the artifact matches this onnxruntime version (bge-edge verify).") from None
    if providers[0][0] == CUDA and sess.get_providers()[0] != CUDA and parse_device(device)[0] == "cuda":
        raise BackendError(f"device={device!r} was asked for, but ONNX Runtime could not start CUDA (driver, "
                           f"CUDA/cuDNN libraries or the device are missing) and fell back to "
                           f"{sess.get_providers()}. Fix the CUDA install, or use device='cpu' or 'auto'.")
    return sess
