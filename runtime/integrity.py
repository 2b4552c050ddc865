"""Verify artifact files against the manifest (size + SHA-256) before anything reads them.

Hashing a large graph costs start-up time, so a verdict may be cached on disk, keyed by the file's
absolute path, size, inode, mtime and ctime (ctime cannot be set back by a user): any change to the
file invalidates it, and a cached verdict is only ever a shortcut for a positive result.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from .errors import IntegrityError
from .manifest import Manifest, safe_member_path

__all__ = ["sha256_file", "verify_files", "default_cache_dir"]

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


def verify_files(root: Path, manifest: Manifest, names: Iterable[str], cache_dir: Path | None = None) -> list[Path]:
    """Check each listed file's size and SHA-256; return their resolved paths.

    Raises IntegrityError naming the file, the expected and the actual value. ``cache_dir=None``
    hashes every time; otherwise verdicts are cached under it (see module docstring).
    """
    cache: dict[str, dict[str, object]] = {}
    cpath = _cache_file(cache_dir, root) if cache_dir is not None else None
    if cpath is not None and cpath.is_file():
        try:
            loaded = json.loads(cpath.read_text())
            cache = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            cache = {}
    changed = False
    paths = []
    for name in names:
        entry = manifest.files.get(name)
        if entry is None:
            raise IntegrityError(f"{name!r} is not listed in the manifest; the runtime reads only listed files.")
        path = safe_member_path(root, name)
        if not path.is_file():
            raise IntegrityError(f"{name!r} is listed in the manifest but missing from {root}; copy the whole "
                                 f"artifact folder again or re-export it.")
        st = path.stat()
        if st.st_size != entry.size:
            raise IntegrityError(f"{name!r} is {st.st_size} bytes, the manifest says {entry.size}: the file is "
                                 f"truncated or altered. Copy the artifact again or re-export it.")
        c = cache.get(name)
        if not (isinstance(c, dict) and c.get("stamp") == _stamp(st) and c.get("sha256") == entry.sha256):
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise IntegrityError(f"{name!r} has SHA-256 {actual}, the manifest says {entry.sha256}: the file "
                                     f"is corrupt or altered. Copy the artifact again or re-export it.")
            cache[name] = {"stamp": _stamp(path.stat()), "sha256": actual}
            changed = True
        paths.append(path)
    if cpath is not None and changed:
        try:
            cpath.parent.mkdir(parents=True, exist_ok=True)
            tmp = cpath.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cpath)
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return paths
