"""Opening an artifact's graph: the one place that picks the backend and precision, verifies every file it is about
to read, and builds the tokenizer and the inference session. ``Embedder`` and ``Reranker`` both load through it, so
an integrity rule added here (e.g. refusing unlisted ONNX external data) holds for every model kind."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError, InputError
from .integrity import check_external_data, default_cache_dir, verify_files
from .manifest import GraphEntry, Manifest
from .ov_session import SHAPES, OpenVINOSession
from .session import choose_backend, create_session, parse_device, physical_cores

__all__ = ["LoadedGraph", "open_graph"]


@dataclass(frozen=True)
class LoadedGraph:
    """What ``open_graph`` chose and built."""

    backend: str
    backend_reason: str
    graph: GraphEntry
    precision: str
    tokenizer: Any  # tokenizers.Tokenizer, truncation and padding off (the runtime sets both itself)
    session: Any  # onnxruntime session (or BoundSession) / OpenVINOSession
    providers: list[str]


def open_graph(root: Path, manifest: Manifest, *, precision: str | None, backend: str, device: str,
               threads: int | None, hash_cache: bool | str | os.PathLike[str], spin: bool = False,
               streams: int = 1, shapes: str = "dynamic") -> LoadedGraph:
    """Choose the backend (``session.choose_backend``) and the precision (None: int8 on the CPU, fp16 on CUDA, else
    what exists), check the tokenizer and graph files against the manifest, then build tokenizer and session."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InputError(f"threads must be a positive integer or None (physical cores), got {threads!r}.")
    if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
        raise InputError(f"streams must be a positive integer (batches computing at once, OpenVINO), got "
                         f"{streams!r}.")
    kind, _ = parse_device(device)
    chosen, reason = choose_backend(manifest, backend, device, precision)
    if streams > 1 and chosen != "openvino":
        raise InputError(f"streams={streams} applies to the OpenVINO backend only; this model runs on {chosen} "
                         f"({reason}).")
    if shapes not in SHAPES:
        raise InputError(f"shapes must be one of {list(SHAPES)}, got {shapes!r}.")
    if shapes != "dynamic" and chosen != "openvino":
        raise InputError(f"shapes={shapes!r} applies to the OpenVINO backend only; this model runs on {chosen} "
                         f"({reason}).")
    fmt = "openvino" if chosen == "openvino" else "onnx"
    if precision is None:
        prefs = ("fp16", "fp32", "int8") if kind == "cuda" else ("int8", "fp32", "fp16")
        have = {g.precision for g in manifest.graphs if g.format == fmt}
        precision = next((p for p in prefs if p in have), None)
        if precision is None:
            raise ArtifactError(f"{root} has no {fmt} graph; re-export it with --format {fmt}.")
    graph = manifest.graph(precision, fmt)
    cache = default_cache_dir() if hash_cache is True else (Path(hash_cache) if hash_cache else None)
    tok_path, graph_path, *data = verify_files(root, manifest, [manifest.tokenizer, graph.file, *graph.external_data],
                                               cache)
    if graph.format == "onnx":
        check_external_data(root, graph.file, graph.external_data)
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as e:
        raise ArtifactError(f"cannot read {tok_path}: {e}") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    if chosen == "openvino":
        session: Any = OpenVINOSession(graph_path, data[0], precision, threads or physical_cores(), streams, shapes)
    else:
        session = create_session(graph_path, device=device, threads=threads, spin=spin)
    return LoadedGraph(chosen, reason, graph, precision, tokenizer, session, list(session.get_providers()))
