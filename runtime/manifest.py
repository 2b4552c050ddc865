"""The artifact manifest: one frozen schema, written by export and read strictly by the runtime.

``manifest.json`` describes everything in an artifact folder: the source model, the kind and heads,
pooling, special token ids, the graphs (one per format and precision, with measured accuracy), and
the size and SHA-256 of every file. Loading goes only through it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from .errors import ArtifactError, IntegrityError

__all__ = ["SCHEMA_VERSION", "MANIFEST_NAME", "FileEntry", "GraphEntry", "Manifest", "read_manifest",
           "safe_member_path"]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

KINDS = ("m3", "dense", "reranker")
POOLINGS = ("cls", "mean")
HEADS = ("dense", "sparse", "colbert", "score")  # "score": a cross-encoder's raw logit
FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class FileEntry:
    """Size in bytes and lowercase hex SHA-256 of one file of the folder."""

    size: int
    sha256: str


@dataclass(frozen=True)
class GraphEntry:
    """One inference graph: its file (relative path), format, precision and the evidence for it."""

    file: str
    format: str
    precision: str
    opset: int | None = None
    cpu_target: str = "any"
    external_data: tuple[str, ...] = ()  # further files the graph reads (ONNX external data, OpenVINO .bin)
    fused: bool = False
    # True: a batch without padding runs flash attention (memory linear in length); see export/longattn.py
    linear_attention: bool = False
    quantization: Mapping[str, Any] = field(default_factory=dict)  # how it was quantised (method, ops kept)
    accuracy: Mapping[str, Any] = field(default_factory=dict)  # measured vs the fp32 graph / reference


@dataclass(frozen=True)
class Manifest:
    """What an artifact folder holds; see DESIGN.md "Artifact folder"."""

    schema_version: int
    source: Mapping[str, Any]  # {"model_id": ..., "revision": ...}
    kind: str  # "m3" | "dense" | "reranker"
    heads: tuple[str, ...]  # reranker: ("score",)
    pooling: str  # "cls" | "mean"
    hidden_size: int
    attention_heads: int
    max_length: int
    special_tokens: Mapping[str, int | None]  # cls, eos, pad, unk, mask ids
    query_instruction: str
    tokenizer: str
    graphs: tuple[GraphEntry, ...]
    files: Mapping[str, FileEntry]
    exporter: Mapping[str, Any]
    created: str = ""

    def graph(self, precision: str, fmt: str = "onnx") -> GraphEntry:
        """The graph of ``precision`` in ``fmt``; ArtifactError listing what exists otherwise."""
        for g in self.graphs:
            if g.precision == precision and g.format == fmt:
                return g
        have = ", ".join(f"{g.format}/{g.precision}" for g in self.graphs) or "none"
        raise ArtifactError(
            f"this artifact has no {fmt} graph at precision {precision!r}; it has: {have}. "
            f"Pick one of those, or re-export with `bge-edge export MODEL --precision {precision}`.")

    def to_json(self) -> str:
        d = asdict(self)
        d["heads"] = list(self.heads)
        return json.dumps(d, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def safe_member_path(root: Path, rel: str) -> Path:
    """Resolve ``rel`` inside ``root``, refusing absolute paths, ``..`` and links that leave the folder."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or "\\" in rel or any(part in ("..", "") for part in p.parts) or ":" in rel:
        raise IntegrityError(f"manifest lists the path {rel!r}, which is not a plain relative path inside the "
                             f"artifact folder; refusing to read it. Re-export the artifact.")
    full = (root / p).resolve()
    if os.path.commonpath([str(full), str(root.resolve())]) != str(root.resolve()):
        raise IntegrityError(f"{rel!r} resolves to {full}, outside the artifact folder {root}; refusing to read it.")
    return full


def _req(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ArtifactError(f"{where} lacks the field {key!r}; the manifest is malformed: re-export the artifact.")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ArtifactError(f"{where} field {key!r} has the wrong type ({type(v).__name__}); re-export the artifact.")
    return v


def _one_of(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ArtifactError(f"manifest {what} {value!r} is not one of {list(allowed)}; this bge-edge cannot read it.")
    return value


def parse_manifest(d: Mapping[str, Any]) -> Manifest:
    """Validate a decoded manifest strictly; unknown schema versions are refused."""
    if not isinstance(d, Mapping):
        raise ArtifactError("manifest.json is not a JSON object; re-export the artifact.")
    version = _req(d, "schema_version", int, "manifest")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"manifest schema_version {version} is not supported (this bge-edge reads "
                            f"{SCHEMA_VERSION}); upgrade bge-edge or re-export the artifact with this version.")
    kind = _one_of(_req(d, "kind", str, "manifest"), KINDS, "kind")
    heads = tuple(_one_of(h, HEADS, "head") for h in _req(d, "heads", list, "manifest"))
    if kind == "reranker" and heads != ("score",):
        raise ArtifactError(f"a reranker manifest must list exactly the 'score' head, not {list(heads)}; re-export "
                            f"the artifact.")
    if kind != "reranker" and "dense" not in heads:
        raise ArtifactError("manifest lists no 'dense' head; re-export the artifact.")
    graphs = []
    for i, g in enumerate(_req(d, "graphs", list, "manifest")):
        where = f"manifest graphs[{i}]"
        graphs.append(GraphEntry(
            file=_req(g, "file", str, where),
            format=_one_of(_req(g, "format", str, where), FORMATS, "graph format"),
            precision=_one_of(_req(g, "precision", str, where), PRECISIONS, "graph precision"),
            opset=g.get("opset"), cpu_target=str(g.get("cpu_target", "any")),
            external_data=tuple(g.get("external_data", ())), fused=bool(g.get("fused", False)),
            linear_attention=bool(g.get("linear_attention", False)),
            quantization=dict(g.get("quantization", {})), accuracy=dict(g.get("accuracy", {}))))
    files = {}
    for name, e in _req(d, "files", dict, "manifest").items():
        size, digest = _req(e, "size", int, f"files[{name!r}]"), _req(e, "sha256", str, f"files[{name!r}]")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ArtifactError(f"files[{name!r}] sha256 is not 64 lowercase hex digits; re-export the artifact.")
        files[name] = FileEntry(size=size, sha256=digest)
    tokenizer = str(d.get("tokenizer", "tokenizer.json"))
    for g in graphs:
        for f in (g.file, *g.external_data):
            if f not in files:
                raise ArtifactError(f"graph file {f!r} is not listed in the manifest's files; re-export the artifact.")
    if tokenizer not in files:
        raise ArtifactError(f"tokenizer file {tokenizer!r} is not listed in the manifest's files.")
    specials = _req(d, "special_tokens", dict, "manifest")
    return Manifest(
        schema_version=version, source=dict(_req(d, "source", dict, "manifest")), kind=kind, heads=heads,
        pooling=_one_of(_req(d, "pooling", str, "manifest"), POOLINGS, "pooling"),
        hidden_size=_req(d, "hidden_size", int, "manifest"),
        attention_heads=_req(d, "attention_heads", int, "manifest"), max_length=_req(d, "max_length", int, "manifest"),
        special_tokens={k: (None if v is None else int(v)) for k, v in specials.items()},
        query_instruction=str(d.get("query_instruction", "")), tokenizer=tokenizer, graphs=tuple(graphs),
        files=files, exporter=dict(d.get("exporter", {})), created=str(d.get("created", "")))


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``folder/manifest.json``; ArtifactError says what is wrong and what to do."""
    root = Path(folder)
    if not root.is_dir():
        raise ArtifactError(f"artifact folder {str(root)!r} does not exist or is not a folder; "
                            f"create one with `bge-edge export MODEL --out {root}`.")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{str(root)!r} has no {MANIFEST_NAME}: it is not a bge-edge artifact folder; "
                            f"create one with `bge-edge export MODEL --out DIR`.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the artifact.") from None
    return parse_manifest(data)
