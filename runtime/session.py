"""ONNX Runtime sessions: the provider list is built here and only here, with CPU tuning.

CPU defaults: intra-op threads = physical cores, no idle spinning (a sidecar must not burn CPU while
idle), all graph optimisations, the memory arena on and memory patterns off (shapes vary per batch).
CUDA is used only when asked for (or ``device="auto"`` finds it working), and a session that ONNX
Runtime silently put on CPU is refused: a user who asked for CUDA never runs on CPU unawares.

On CUDA the session is wrapped in ``BoundSession`` (I/O binding): each batch's two int64 arrays are
copied host -> device once, and each requested output is bound to host memory, so it comes back with one
device -> host copy made inside the run (one IOBinding per call: safe from many threads). On the CPU the
plain ``InferenceSession`` is used (binding would only add calls there). ``bind_io`` applies the wrapper to
any session, so tests prove on the CPU that it returns exactly what ``run`` does.

Shapes on CUDA: ``batching.bucket_length`` pads every batch to a multiple of 8 tokens up to 128, of 32 up
to 512, of 128 up to 2,048 and of 512 beyond (never past the max length), so a 256-token model sees at most
20 sequence lengths and an 8,192-token one 52, whatever the corpus. The row count is not bucketed: it
follows the batch-size and token budgets. The one exception is a long text (> 512 tokens) on a graph with
linear attention (the fp32/int8 BGE-M3 exports; the fp16 export has none), which runs alone at its exact
length. ONNX Runtime's CUDA provider compiles nothing per shape (no TensorRT here); what a new shape costs
is new blocks in its memory arena (extended by exactly the size requested, ``kSameAsRequested``; memory
patterns stay off), and with few shapes those blocks are reused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import BackendError, MissingExtraError
from .manifest import Manifest
from .ov_session import INSTALL as OPENVINO_INSTALL
from .ov_session import openvino_installed

__all__ = ["physical_cores", "parse_device", "choose_backend", "build_providers", "create_session", "bind_io",
           "BoundSession"]

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
    if not isinstance(device, str):
        raise BackendError(f"device must be one string ('cpu', 'cuda', 'cuda:N' or 'auto'), got {device!r}; for "
                           f"several GPUs (FlagEmbedding's devices=[...]) create one Embedder per device.")
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


class BoundSession:
    """An InferenceSession whose ``run`` goes through I/O binding (module docstring); same call as ``run``.

    Every call makes its own IOBinding, so one BoundSession serves many threads as an InferenceSession does.
    Other attributes (``get_inputs``, ``get_session_options``, ...) are the wrapped session's.
    """

    def __init__(self, sess: Any) -> None:
        self.sess = sess

    def get_providers(self) -> list[str]:
        return list(self.sess.get_providers())

    def __getattr__(self, name: str) -> Any:  # only called for names the wrapper lacks
        if name == "sess":
            raise AttributeError(name)
        return getattr(self.sess, name)

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray],
            run_options: Any = None) -> list[np.ndarray]:
        """Outputs ``output_names`` (all, in graph order, when None) for ``feeds``, as host numpy arrays."""
        try:
            names = list(output_names) if output_names else [o.name for o in self.sess.get_outputs()]
            binding = self.sess.io_binding()
            for name, arr in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(arr))  # one host -> device copy each
            for name in names:
                binding.bind_output(name, "cpu")  # ORT copies device -> host once, into host memory it allocates
            self.sess.run_with_iobinding(binding, run_options)
            outs = binding.copy_outputs_to_cpu()
        except Exception as e:  # onnxruntime raises its own pybind exception types
            shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
            raise BackendError(f"ONNX Runtime (I/O binding on {self.get_providers()[0]}) failed on inputs "
                               f"{shapes}: {str(e).strip()[:400]}") from None
        if len(outs) != len(names):
            raise BackendError(f"I/O binding returned {len(outs)} outputs for the {len(names)} asked for "
                               f"({names}); this is a bug in bge-edge or onnxruntime, please report it.")
        return list(outs)


def bind_io(sess: Any) -> BoundSession:
    """``sess`` with ``run`` going through I/O binding (what ``create_session`` does on CUDA)."""
    return sess if isinstance(sess, BoundSession) else BoundSession(sess)


def create_session(path: Path, device: str = "cpu", threads: int | None = None, spin: bool = False,
                   io_binding: bool | None = None) -> Any:
    """An InferenceSession for the graph at ``path`` (already verified by the caller).

    ``io_binding`` None binds I/O (``BoundSession``) exactly when the session runs on CUDA; True/False force it.
    """
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
    if io_binding is None:
        io_binding = sess.get_providers()[0] == CUDA
    return bind_io(sess) if io_binding else sess
