"""Air-gapped bundles: one folder (or one .tar.gz) that installs bge-edge and a model on a machine without
network, with every file verified first.

``build_bundle`` runs on a connected machine (``bge-edge bundle``); ``verify_bundle`` checks a bundle folder
or archive against its ``bundle.json`` without installing (``bge-edge verify BUNDLE``). The install scripts
inside a bundle run ``bge_edge/bundle/installer.py`` (standard library only) with the target's Python.
This package never imports torch, transformers or onnx.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bge_edge.runtime.errors import BgeEdgeError

from .installer import BUNDLE_MANIFEST, BundleInstallError

__all__ = ["BUNDLE_MANIFEST", "BundleError", "build_bundle", "is_bundle", "verify_bundle"]


class BundleError(BgeEdgeError):
    """A bundle cannot be built or does not verify; the message names the file, package or platform."""


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """A bundle folder (has ``bundle.json``) or a bundle archive (``*.tar.gz`` / ``*.tgz`` file)."""
    p = Path(path)
    return (p / BUNDLE_MANIFEST).is_file() or (p.is_file() and p.name.endswith((".tar.gz", ".tgz")))


def verify_bundle(path: str | os.PathLike[str], expect_sha256: str | None = None) -> str:
    """Check a bundle folder or archive without installing; return a one-line summary, raise BundleError.

    Every file is checked against ``bundle.json`` (size + SHA-256, nothing unlisted, no links), the lock file
    against the wheelhouse, and the artifact's own manifest (read by the runtime's strict reader) against
    the files the bundle holds. An archive is validated member by member and extracted into a temporary
    folder first.
    """
    from . import installer

    p = Path(path)
    try:
        if p.is_file():
            with tempfile.TemporaryDirectory(prefix="bge-edge-verify-") as td:
                root = installer.extract_archive(p, Path(td) / "bundle")
                return _verify_folder(root, expect_sha256) + f" (archive {p.name}, safe to extract)"
        return _verify_folder(p, expect_sha256)
    except BundleInstallError as e:
        raise BundleError(str(e)) from None


def _verify_folder(root: Path, expect_sha256: str | None) -> str:
    from bge_edge.runtime.manifest import MANIFEST_NAME, read_manifest, safe_member_path

    from . import installer

    data = installer.verify_bundle(root, expect_sha256)
    art_rel = data.get("artifact", {}).get("path", installer.ARTIFACT_DIR)
    art = root / art_rel
    m = read_manifest(art)  # the runtime's strict reader: schema, graphs, files
    files = data["files"]
    for name, entry in m.files.items():
        safe_member_path(art, name)
        got = files.get(f"{art_rel}/{name}")
        if got is None or got["sha256"] != entry.sha256 or got["size"] != entry.size:
            raise BundleError(f"{art_rel}/{name} is listed in the artifact's {MANIFEST_NAME} but the bundle holds "
                              f"{'no such file' if got is None else 'a different file'}; rebuild the bundle.")
    return f"ok: bundle {root}: {installer.bundle_summary(data)} match {BUNDLE_MANIFEST}; the artifact manifest " \
           f"matches the files held"


def build_bundle(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See :func:`bge_edge.bundle.build.build_bundle`."""
    from .build import build_bundle as _build

    return _build(*args, **kwargs)
