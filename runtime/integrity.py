"""Verify artifact files against the manifest (size + SHA-256) before anything reads them.

Hashing a large graph costs start-up time, so a verdict may be cached on disk, keyed by the file's
absolute path, size, inode, mtime and ctime (ctime cannot be set back by a user): any change to the
file invalidates it, and a cached verdict is only ever a shortcut for a positive result.

The cache is per user: its folder (and the ``verified`` folder in it) must belong to the user running
bge-edge and be writable by nobody else, or it is not used (a warning says so): an entry is a claim
that a file was hashed, so only the user who would have hashed it may write one. A cache file holds the
SHA-256 of the manifest its verdicts were made for; any other manifest ignores them. Anything wrong with
the cache (unreadable, corrupt, read-only) only costs a re-hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Iterable

from .errors import ArtifactError, IntegrityError
from .manifest import Manifest, safe_member_path

__all__ = ["sha256_file", "verify_files", "default_cache_dir", "onnx_external_data", "check_external_data"]

_CHUNK = 1 << 20  # 1 MiB reads: hashing runs at memory speed, RSS stays flat


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$BGE_EDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/bge-edge``, else ``~/.cache/bge-edge``."""
    if os.environ.get("BGE_EDGE_CACHE_DIR"):
        return Path(os.environ["BGE_EDGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bge-edge"


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _cache_file(cache_dir: Path, root: Path) -> Path:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    return cache_dir / "verified" / f"{key}.json"


def _private(path: Path) -> str | None:
    """None if ``path`` belongs to this user and nobody else may write it; else what is wrong."""
    st = path.lstat()
    if os.name != "posix":  # Windows: folder ACLs, not mode bits, say who may write; a user profile is private
        return None
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if st.st_uid != os.geteuid():
        return f"belongs to user id {st.st_uid}, not to this user ({os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"can be written by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _usable_cache(cache_dir: Path) -> Path | None:
    """``cache_dir/verified``, created private if missing, or None (with a warning) if others could write it."""
    verified = cache_dir / "verified"
    try:
        if not cache_dir.exists():
            cache_dir.mkdir(parents=True, mode=0o700)
        if not verified.exists():
            verified.mkdir(mode=0o700)
        for folder in (cache_dir, verified):
            why = _private(folder)
            if why is not None:
                warnings.warn(f"bge-edge: not using the verification cache {folder}: it {why}. Every file is "
                              f"hashed instead (slower start-up). Make it private: chmod 700 {folder} (or set "
                              f"BGE_EDGE_CACHE_DIR to a folder of your own).", RuntimeWarning, stacklevel=3)
                return None
    except OSError:
        return None  # unreadable or read-only: hash every time
    return verified


def _manifest_digest(manifest: Manifest) -> str:
    return hashlib.sha256(manifest.to_json().encode("utf-8")).hexdigest()


def _read_cache(cpath: Path, manifest_digest: str) -> dict[str, Any]:
    """The verdicts of ``cpath`` made for this manifest; {} when there are none or they cannot be trusted."""
    try:
        if _private(cpath) is not None:
            return {}
        loaded = json.loads(cpath.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(loaded, dict) or loaded.get("manifest_sha256") != manifest_digest:
        return {}
    files = loaded.get("files")
    return files if isinstance(files, dict) else {}


def _write_cache(cpath: Path, manifest_digest: str, files: dict[str, Any]) -> None:
    tmp = cpath.with_suffix(f".{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"manifest_sha256": manifest_digest, "files": files}, f)
        os.replace(tmp, cpath)
    except OSError:  # a read-only or full disk only costs re-hashing next time
        try:
            tmp.unlink()
        except OSError:
            pass


def _unreadable(name: str, root: Path, e: OSError) -> ArtifactError:
    return ArtifactError(f"cannot read {name!r} in the artifact folder {root}: {e.strerror or e}. Check the file's "
                         f"permissions: the user running bge-edge must be able to read every file of the artifact.")


def verify_files(root: Path, manifest: Manifest, names: Iterable[str], cache_dir: Path | None = None) -> list[Path]:
    """Check each listed file's size and SHA-256; return their resolved paths.

    Raises IntegrityError naming the file, the expected and the actual value, and ArtifactError naming a
    file that cannot be read. ``cache_dir=None`` hashes every time; otherwise verdicts are cached under it
    (see module docstring).
    """
    digest = _manifest_digest(manifest)
    verified = _usable_cache(cache_dir) if cache_dir is not None else None
    cpath = _cache_file(cache_dir, root) if cache_dir is not None and verified is not None else None
    cache = _read_cache(cpath, digest) if cpath is not None else {}
    changed = False
    paths = []
    for name in names:
        entry = manifest.files.get(name)
        if entry is None:
            raise IntegrityError(f"{name!r} is not listed in the manifest; the runtime reads only listed files.")
        path = safe_member_path(root, name)
        try:
            if not path.is_file():
                raise IntegrityError(f"{name!r} is listed in the manifest but missing from {root}; copy the whole "
                                     f"artifact folder again or re-export it.")
            st = path.stat()
        except OSError as e:
            raise _unreadable(name, root, e) from None
        if st.st_size != entry.size:
            raise IntegrityError(f"{name!r} is {st.st_size} bytes, the manifest says {entry.size}: the file is "
                                 f"truncated or altered. Copy the artifact again or re-export it.")
        c = cache.get(name)
        if not (isinstance(c, dict) and c.get("stamp") == _stamp(st) and c.get("sha256") == entry.sha256):
            try:
                actual = sha256_file(path)
                after = path.stat()
            except OSError as e:
                raise _unreadable(name, root, e) from None
            if actual != entry.sha256:
                raise IntegrityError(f"{name!r} has SHA-256 {actual}, the manifest says {entry.sha256}: the file "
                                     f"is corrupt or altered. Copy the artifact again or re-export it.")
            cache[name] = {"stamp": _stamp(after), "sha256": actual}
            changed = True
        paths.append(path)
    if cpath is not None and changed:
        _write_cache(cpath, digest, cache)
    return paths


# ---- ONNX external-data references ------------------------------------------------------------------------
# An ONNX graph names its external-data files inside the protobuf (TensorProto.external_data "location"), and
# ONNX Runtime opens whatever they name, relative to the graph. The manifest lists the files a graph may read,
# so every reference is checked against that list before a session exists. The scan reads only field headers
# (tensor payloads are skipped by length, through mmap), so it costs milliseconds even for large graphs.
# Field numbers are onnx.proto's: message -> {field: sub-message} for the messages that can hold tensors.
_ONNX_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}
_MAX_NESTING = 64  # graphs inside attributes inside graphs...: real models nest 2-3 deep


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _scan(buf: memoryview, pos: int, end: int, kind: str, depth: int, out: list[str | None]) -> None:
    """Append the external-data location of every tensor in ``buf[pos:end]`` (a ``kind`` message) to ``out``."""
    if depth > _MAX_NESTING:
        raise _Malformed("nested too deeply")
    children = _ONNX_CHILDREN[kind]
    location: str | None = None
    external = False
    entry: dict[int, str] = {}
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            if kind == "tensor" and field == 14:
                external = value == 1  # DataLocation.EXTERNAL
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _Malformed("a field runs past the end of its message")
            child = children.get(field)
            if child == "entry":
                pair: list[str | None] = []
                _scan(buf, pos, pos + size, "entry", depth + 1, pair)
                if len(pair) == 2 and pair[0] == "location":
                    location = pair[1]
            elif child is not None:
                _scan(buf, pos, pos + size, child, depth + 1, out)
            elif kind == "entry" and field in (1, 2):
                try:
                    entry[field] = bytes(buf[pos:pos + size]).decode("utf-8")
                except UnicodeDecodeError:
                    raise _Malformed("an external-data entry is not UTF-8") from None
            pos += size
        else:
            raise _Malformed(f"unsupported wire type {wire}")
    if pos != end:
        raise _Malformed("a field runs past the end of its message")
    if kind == "entry":
        out.extend([entry.get(1), entry.get(2)])
    elif kind == "tensor" and (external or location is not None):
        out.append(location)


def onnx_external_data(path: Path) -> list[str | None]:
    """The external-data locations an ONNX graph file refers to (None: an external tensor without one)."""
    import mmap

    out: list[str | None] = []
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise IntegrityError(f"{path.name} is empty: not an ONNX graph. Re-export the artifact.")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                _scan(buf, 0, len(buf), "model", 0, out)
            except _Malformed as e:
                raise IntegrityError(f"{path.name} is not a well-formed ONNX graph ({e}); re-export the artifact.") \
                    from None
            finally:
                buf.release()
    return out


def check_external_data(root: Path, graph_file: str, allowed: Iterable[str]) -> None:
    """Refuse an ONNX graph that refers to an external-data file its manifest entry does not list."""
    from posixpath import dirname, join, normpath

    from .manifest import _plain_relative

    listed = set(allowed)
    for loc in dict.fromkeys(onnx_external_data(safe_member_path(root, graph_file))):
        if loc is None:
            raise IntegrityError(f"{graph_file!r} stores a tensor as external data without naming its file; "
                                 f"refusing to load it. Re-export the artifact.")
        rel = normpath(join(dirname(graph_file), loc)) if _plain_relative(loc) else None
        if rel is None or rel not in listed:
            raise IntegrityError(f"{graph_file!r} refers to the external-data file {loc[:120]!r}, which its "
                                 f"manifest entry does not list (external_data: {sorted(listed)}); the runtime "
                                 f"reads only files the manifest lists and verifies. Refusing to load it: "
                                 f"re-export the artifact.")
