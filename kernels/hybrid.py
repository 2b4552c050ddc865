"""Hybrid scores: FlagEmbedding's ``BGEM3FlagModel.compute_score`` combination of the three modes.

With weights [w_dense, w_sparse, w_colbert] (FlagEmbedding's ``weights_for_different_modes`` order):
    sparse+dense         = (w_sparse * sparse + w_dense * dense) / (w_sparse + w_dense)
    colbert+sparse+dense = (w_colbert * colbert + w_sparse * sparse + w_dense * dense)
                           / (w_dense + w_sparse + w_colbert)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._errors import KernelInputError, describe

__all__ = ["MODES", "combine_scores", "check_weights"]

MODES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")


def check_weights(weights: Any) -> tuple[float, float, float]:
    """Validate [w_dense, w_sparse, w_colbert]: three finite numbers >= 0, not all zero."""
    try:
        if isinstance(weights, (str, bytes)):
            raise TypeError
        w = tuple(float(x) for x in weights)
    except (TypeError, ValueError):
        raise KernelInputError(f"weights must be three numbers [w_dense, w_sparse, w_colbert], got "
                               f"{weights!r}.") from None
    if len(w) != 3 or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise KernelInputError(f"weights must be three finite numbers >= 0, not all zero, in the order "
                               f"[w_dense, w_sparse, w_colbert], got {list(weights)!r}; FlagEmbedding's "
                               f"default is [1, 1, 1], its documented example [0.4, 0.2, 0.4].")
    return w[0], w[1], w[2]


def combine_scores(dense: Any, sparse: Any, colbert: Any,
                   weights: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, np.ndarray]:
    """The five ``compute_score`` entries from per-mode scores of the same shape, as float32 arrays.

    weights = [w_dense, w_sparse, w_colbert]; w_dense + w_sparse must be > 0 (it divides sparse+dense).
    """
    w_dense, w_sparse, w_colbert = check_weights(weights)
    if w_dense + w_sparse <= 0:
        raise KernelInputError(f"w_dense + w_sparse must be > 0 because it divides 'sparse+dense', got "
                               f"weights {list(weights)!r}.")
    arrays = {}
    for name, x in (("dense", dense), ("sparse", sparse), ("colbert", colbert)):
        a = np.asarray(x)
        if a.dtype.kind not in "fiu":
            raise KernelInputError(f"{name} scores must be real numbers, got {describe(a)}.")
        if not np.isfinite(a).all():
            raise KernelInputError(f"{name} scores hold NaN/inf; check the vectors that produced them.")
        arrays[name] = a.astype(np.float64)
    shapes = {k: v.shape for k, v in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise KernelInputError(f"dense, sparse and colbert scores must have the same shape (one score per "
                               f"pair), got {shapes}.")
    d, s, c = arrays["dense"], arrays["sparse"], arrays["colbert"]
    both = (w_sparse * s + w_dense * d) / (w_sparse + w_dense)
    three = (w_colbert * c + w_sparse * s + w_dense * d) / (w_dense + w_sparse + w_colbert)
    return {"dense": d.astype(np.float32), "sparse": s.astype(np.float32), "colbert": c.astype(np.float32),
            "sparse+dense": both.astype(np.float32), "colbert+sparse+dense": three.astype(np.float32)}
