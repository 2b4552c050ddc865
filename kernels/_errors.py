"""The one exception the kernels raise for bad input, and the cheap checks that raise it.

Every message says what was wrong, what is allowed and what to do. Checks are O(size of the input)
at most and never copy a document matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["KernelInputError"]


class KernelInputError(ValueError):
    """Bad input to a scoring kernel: wrong shape or dtype, offsets that do not match, NaN/inf, bad weights."""


def describe(x: Any) -> str:
    """Short description of an argument for error messages: shape and dtype, or the type."""
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def as_float_matrix(x: Any, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """`x` as a 2-D float32 array (a view when it already is one); rejects non-float dtypes and empties."""
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise KernelInputError(f"{name} must hold floating-point vectors, got {describe(a)}; "
                               f"pass embeddings (float16/32/64), not token ids.")
    if a.ndim != 2:
        raise KernelInputError(f"{name} must be 2-D (tokens, hidden), got {describe(a)}; "
                               f"reshape it or pass one matrix per text.")
    if a.shape[0] == 0 and not allow_empty:
        raise KernelInputError(f"{name} is empty ({describe(a)}); every text has at least one vector "
                               f"(BGE-M3 gives one row even for the empty string).")
    if a.shape[1] == 0:
        raise KernelInputError(f"{name} has hidden size 0 ({describe(a)}); vectors need at least one dimension.")
    return a.astype(np.float32, copy=False)


def check_finite(a: np.ndarray, name: str) -> None:
    """Raise when `a` holds NaN or inf (one cheap sum first; the exact scan only when the sum is not finite)."""
    if a.size == 0:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(a, axis=None, dtype=np.float32 if a.dtype == np.float16 else None)
    if np.isfinite(total):
        return
    bad = ~np.isfinite(a)
    if bad.any():
        where = np.argwhere(bad)[0]
        raise KernelInputError(f"{name} holds {int(bad.sum())} NaN/inf value(s), first at index "
                               f"{tuple(int(i) for i in where)}; scores would be meaningless. Remove or "
                               f"re-encode those vectors.")


def check_offsets(offsets: Any, total: int, name: str, *, allow_empty_segments: bool) -> np.ndarray:
    """`offsets` as int64 (n + 1,) segment starts: [0] == 0, [-1] == total, non-decreasing (strictly if not empty)."""
    o = np.asarray(offsets)
    if o.dtype.kind not in "iu" or o.ndim != 1 or o.shape[0] < 1:
        raise KernelInputError(f"{name} must be a 1-D integer array of n + 1 start positions (the last one "
                               f"= number of rows), got {describe(o)}.")
    o = o.astype(np.int64, copy=False)
    if o[0] != 0 or o[-1] != total:
        raise KernelInputError(f"{name} must start at 0 and end at the number of rows ({total}), got "
                               f"first {int(o[0])} and last {int(o[-1])}; build them with "
                               f"np.concatenate([[0], np.cumsum(lengths)]).")
    steps = np.diff(o)
    low = 0 if allow_empty_segments else 1
    if steps.size and steps.min() < low:
        i = int(np.argmax(steps < low))
        what = "non-decreasing" if allow_empty_segments else "strictly increasing (every document needs >= 1 vector)"
        raise KernelInputError(f"{name} must be {what}, but entry {i} is {int(o[i])} and entry {i + 1} is "
                               f"{int(o[i + 1])}.")
    return o
