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

    @property
    def batch_invariant(self) -> bool:
        """Whether a text's outputs are the same alone and in any batch: what the quantisation record says; older
        artifacts without the key: all but ONNX INT8, which was ONNX Runtime's per-batch dynamic recipe then."""
        return bool(self.quantization.get("batch_invariant", not (self.precision == "int8" and self.format == "onnx")))


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


# Bounds of the numbers a manifest may hold: wide enough for every BERT/XLM-R model, narrow enough that no
# later arithmetic (array shapes, memory estimates) sees an absurd value.
MAX_HIDDEN_SIZE = 65_536
MAX_ATTENTION_HEADS = 1_024
MAX_LENGTH_LIMIT = 1 << 20      # tokens per text
MAX_TOKEN_ID = (1 << 31) - 1    # ids are int64 in the graph, vocabularies are far smaller
MAX_OPSET = 1_000
MAX_FILE_SIZE = 1 << 50         # 1 PiB
MAX_MANIFEST_BYTES = 16 << 20   # a manifest is a few KB; refuse to parse a huge one
_SHOWN_PROBLEMS = 6


def _what(v: Any) -> str:
    """A value's JSON type and a short rendering, for error messages."""
    kind = "null" if v is None else {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
                                     float: "number"}.get(type(v), type(v).__name__)
    text = repr(v) if isinstance(v, (str, int, float, bool)) and not (isinstance(v, int) and abs(v) > 10**12) \
        else ("a huge integer" if isinstance(v, int) else "")
    return f"{kind} {text[:60]}".rstrip()


def _plain_relative(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and "\\" not in rel and ":" not in rel and "\x00" not in rel \
        and not any(part in ("..", "", ".") for part in rel.split("/"))


class _Checker:
    """Collects every problem of a decoded manifest, each with the path of its field."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, path: str, msg: str) -> None:
        self.problems.append(f"{path} {msg}")

    def obj(self, d: Any, path: str) -> Mapping[str, Any] | None:
        if not isinstance(d, Mapping):
            self.bad(path, f"must be an object, got {_what(d)}")
            return None
        return d

    def field(self, d: Mapping[str, Any], key: str, path: str, default: Any = ...) -> Any:
        if key not in d:
            if default is ...:
                self.bad(f"{path}{key}", "is missing")
            return default
        return d[key]

    def int_(self, d: Mapping[str, Any], key: str, path: str, lo: int, hi: int, default: Any = ...,
             nullable: bool = False) -> int | None:
        v = self.field(d, key, path, default)
        if v is ... or (v is None and (nullable or default is None)):
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            self.bad(f"{path}{key}", f"must be an integer from {lo:,} to {hi:,}{' or null' if nullable else ''}, "
                                     f"got {_what(v)}")
            return None
        return v

    def str_(self, d: Mapping[str, Any], key: str, path: str, default: Any = ...,
             allowed: tuple[str, ...] | None = None, nullable: bool = False) -> str | None:
        v = self.field(d, key, path, default)
        if v is ... or (v is None and nullable):
            return None
        if not isinstance(v, str) or (allowed is not None and v not in allowed):
            want = f"one of {list(allowed)}" if allowed is not None else "a string"
            self.bad(f"{path}{key}", f"must be {want}{' or null' if nullable else ''}, got {_what(v)}")
            return None
        return v

    def bool_(self, d: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        v = d.get(key, default)
        if not isinstance(v, bool):
            self.bad(f"{path}{key}", f"must be true or false, got {_what(v)}")
            return default
        return v

    def mapping(self, d: Mapping[str, Any], key: str, path: str, default: Any = ...) -> dict[str, Any]:
        v = self.field(d, key, path, default)
        if v is ...:
            return {}
        return dict(self.obj(v, f"{path}{key}") or {})

    def path_(self, rel: Any, path: str) -> str | None:
        if not isinstance(rel, str):
            self.bad(path, f"must be a file path (string), got {_what(rel)}")
            return None
        if not _plain_relative(rel):
            self.bad(path, f"{rel[:80]!r} is not a plain relative path inside the artifact folder")
            return None
        return rel


def parse_manifest(d: Any) -> Manifest:
    """Validate a decoded manifest fully against the schema; ArtifactError lists every problem with its field.

    Unknown schema versions are refused (upgrade bge-edge or re-export). Fields this version does not know
    are ignored; every field it reads is checked for type and range, so nothing later sees a bad value.
    """
    if not isinstance(d, Mapping):
        raise ArtifactError(f"manifest.json must be a JSON object, got {_what(d)}; re-export the artifact.")
    version = d.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"manifest.json schema_version must be an integer, got "
                            f"{_what(version) if 'schema_version' in d else 'nothing'}; re-export the artifact.")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"manifest schema_version {version if abs(version) < 10**12 else 'huge'} is not "
                            f"supported (this bge-edge reads {SCHEMA_VERSION}); upgrade bge-edge or re-export the "
                            f"artifact with this version.")
    c = _Checker()
    kind = c.str_(d, "kind", "", allowed=KINDS)
    heads_raw = c.field(d, "heads", "")
    heads: list[str] = []
    if heads_raw is not ...:
        if not isinstance(heads_raw, list):
            c.bad("heads", f"must be an array of head names, got {_what(heads_raw)}")
        else:
            for i, h in enumerate(heads_raw):
                if not isinstance(h, str) or h not in HEADS:
                    c.bad(f"heads[{i}]", f"must be one of {list(HEADS)}, got {_what(h)}")
                elif h in heads:
                    c.bad(f"heads[{i}]", f"repeats {h!r}")
                else:
                    heads.append(h)
            if len(heads) == len(heads_raw):
                if kind == "reranker" and heads != ["score"]:
                    c.bad("heads", f"a reranker lists exactly the 'score' head, not {heads}")
                elif kind != "reranker" and "dense" not in heads:
                    c.bad("heads", "lists no 'dense' head")
    pooling = c.str_(d, "pooling", "", allowed=POOLINGS)
    hidden = c.int_(d, "hidden_size", "", 1, MAX_HIDDEN_SIZE)
    n_heads = c.int_(d, "attention_heads", "", 1, MAX_ATTENTION_HEADS)
    if hidden and n_heads and hidden % n_heads:
        c.bad("attention_heads", f"{n_heads} does not divide hidden_size {hidden}")
    max_length = c.int_(d, "max_length", "", 2, MAX_LENGTH_LIMIT)
    specials: dict[str, int | None] = {}
    for k, v in c.mapping(d, "special_tokens", "").items():
        specials[k] = c.int_({k: v}, k, "special_tokens.", 0, MAX_TOKEN_ID, nullable=True)
    source = c.mapping(d, "source", "")
    for k in ("model_id", "revision"):
        c.str_(source, k, "source.", default=None, nullable=True)
    query_instruction = c.str_(d, "query_instruction", "", default="") or ""
    tokenizer = c.path_(d.get("tokenizer", "tokenizer.json"), "tokenizer")
    exporter = c.mapping(d, "exporter", "", default={})
    created = c.str_(d, "created", "", default="") or ""
    files: dict[str, FileEntry] = {}
    for name, e in c.mapping(d, "files", "").items():
        where = f"files[{name[:80]!r}]"
        if c.path_(name, where) is None or c.obj(e, where) is None:
            continue
        size = c.int_(e, "size", where + ".", 0, MAX_FILE_SIZE)
        digest = e.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and all(ch in "0123456789abcdef" for ch in digest)):
            c.bad(f"{where}.sha256", f"must be 64 lowercase hex digits, got {_what(digest)}")
        elif size is not None:
            files[name] = FileEntry(size=size, sha256=digest)
    graphs: list[GraphEntry] = []
    graphs_raw = c.field(d, "graphs", "")
    if graphs_raw is not ... and not isinstance(graphs_raw, list):
        c.bad("graphs", f"must be an array of graph entries, got {_what(graphs_raw)}")
    elif isinstance(graphs_raw, list) and not graphs_raw:
        c.bad("graphs", "is empty: the artifact has no graph to run")
    for i, g in enumerate(graphs_raw if isinstance(graphs_raw, list) else []):
        where = f"graphs[{i}]"
        if c.obj(g, where) is None:
            continue
        n = len(c.problems)
        file_raw = c.field(g, "file", where + ".")
        file = c.path_(file_raw, where + ".file") if file_raw is not ... else None
        fmt = c.str_(g, "format", where + ".", allowed=FORMATS)
        precision = c.str_(g, "precision", where + ".", allowed=PRECISIONS)
        opset = c.int_(g, "opset", where + ".", 1, MAX_OPSET, default=None, nullable=True)
        cpu_target = c.str_(g, "cpu_target", where + ".", default="any") or "any"
        extra_raw = g.get("external_data", [])
        extra: list[str] = []
        if not isinstance(extra_raw, list):
            c.bad(f"{where}.external_data", f"must be an array of file paths, got {_what(extra_raw)}")
        else:
            extra = [x for k, x in enumerate(extra_raw) if c.path_(x, f"{where}.external_data[{k}]") is not None]
        fused = c.bool_(g, "fused", where + ".", False)
        linear = c.bool_(g, "linear_attention", where + ".", False)
        quant = c.mapping(g, "quantization", where + ".", default={})
        acc = c.mapping(g, "accuracy", where + ".", default={})
        if len(c.problems) > n or file is None or fmt is None or precision is None:
            continue
        for j, rel in enumerate((file, *extra)):
            if rel not in files and not any(x.startswith(f"files[{rel[:80]!r}]") for x in c.problems):
                c.bad(f"{where}.{'file' if j == 0 else f'external_data[{j - 1}]'}", f"{rel!r} is not listed in files")
        if any(x.format == fmt and x.precision == precision for x in graphs):
            c.bad(where, f"repeats the {fmt}/{precision} graph")
        graphs.append(GraphEntry(file=file, format=fmt, precision=precision, opset=opset, cpu_target=cpu_target,
                                 external_data=tuple(extra), fused=fused, linear_attention=linear,
                                 quantization=quant, accuracy=acc))
    if tokenizer is not None and tokenizer not in files and "files" in d and isinstance(d["files"], Mapping):
        c.bad("tokenizer", f"{tokenizer!r} is not listed in files")
    if c.problems:
        shown = "; ".join(c.problems[:_SHOWN_PROBLEMS])
        more = f" (and {len(c.problems) - _SHOWN_PROBLEMS} more)" if len(c.problems) > _SHOWN_PROBLEMS else ""
        raise ArtifactError(f"manifest.json is malformed: {shown}{more}. Re-export the artifact with "
                            f"`bge-edge export MODEL --out DIR`.")
    assert kind is not None and pooling is not None and hidden is not None and n_heads is not None
    assert max_length is not None and tokenizer is not None
    return Manifest(
        schema_version=version, source=source, kind=kind, heads=tuple(heads), pooling=pooling, hidden_size=hidden,
        attention_heads=n_heads, max_length=max_length, special_tokens=specials, query_instruction=query_instruction,
        tokenizer=tokenizer, graphs=tuple(graphs), files=files, exporter=exporter, created=created)


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
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}; check its permissions.") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is over {MAX_MANIFEST_BYTES >> 20} MiB: not a bge-edge manifest (they are a "
                            f"few KB). Re-export the artifact.")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # bad JSON, too many digits, nested too deep
        why = "it is nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise ArtifactError(f"{path} is not valid JSON ({why}); re-export the artifact.") from None
    return parse_manifest(data)
