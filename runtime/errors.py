"""The exception hierarchy: every error a user can cause is one of these, with a message that says
what was wrong, what is allowed and what to do. A server maps the classes to status codes."""

from __future__ import annotations

__all__ = ["BgeEdgeError", "ArtifactError", "IntegrityError", "InputError", "MissingExtraError",
           "BackendError"]


class BgeEdgeError(Exception):
    """Base class of every error bge-edge raises on purpose."""


class ArtifactError(BgeEdgeError):
    """The artifact folder is missing, malformed, or lacks what was asked for (a precision, a head)."""


class IntegrityError(ArtifactError):
    """A file does not match the size or SHA-256 the manifest records, or a path leaves the folder."""


class InputError(BgeEdgeError, ValueError):
    """Bad arguments to encode / compute_score (wrong types, invalid values)."""


class MissingExtraError(BgeEdgeError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` to run."""


class BackendError(BgeEdgeError):
    """The inference backend failed or is unavailable (e.g. CUDA asked for but not usable)."""
