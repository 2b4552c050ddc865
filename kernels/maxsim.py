"""ColBERT late interaction (MaxSim): one pair, and one or many queries against packed documents.

Formula (FlagEmbedding ``BGEM3FlagModel.colbert_score``):
    score(q, p) = sum_i max_j <q_i, p_j> / len(q)
Packed documents are one (total_tokens, H) matrix plus int64 offsets (n_docs + 1,): document d is
rows offsets[d]:offsets[d + 1]. Scoring is one matrix product per chunk of documents, a segmented max
(``np.maximum.reduceat``) over each document's rows, and a mean over each query's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np

from ._errors import KernelInputError, as_float_matrix, check_offsets, describe
from ._errors import check_finite as _finite

__all__ = ["colbert_score", "maxsim", "topk", "quantize_int8"]

QueryLike = Union[np.ndarray, Sequence[np.ndarray]]

# Memory bound of one `maxsim` call, whatever the number of documents (R = all query rows stacked,
# H = hidden size; the (n_queries, n_docs) float32 output comes on top):
#   product   (T_chunk, R) float32, T_chunk = PRODUCT_BYTES // (4 * R)   -> <= PRODUCT_BYTES
#   maxima    (docs in chunk, R) float32 <= (T_chunk, R)                 -> <= PRODUCT_BYTES
#   staging   (T_block, H) float32, T_block = STAGING_BYTES // (4 * H)   -> <= STAGING_BYTES
#             (only for float16/int8 storage, candidate subsets, or check_finite=True)
#   row index (T_chunk,) int64 (candidate subsets only)                  -> <= 2 * PRODUCT_BYTES
# e.g. one 32-token query: 2 * 8 MiB + 1 MiB = 17 MiB; 16 such queries: the same 17 MiB.
PRODUCT_BYTES = 8 * 2**20
STAGING_BYTES = 2**20  # sized to stay in L2 between the cast/check and the product that reads it
MIN_CHUNK_TOKENS = 256  # floor so that a huge R still gets products big enough for BLAS
MIN_BLOCK_TOKENS = 64
QUANTIZE_ROWS = 65536  # rows per step of quantize_int8: 65536 * H * 4 B of temporaries (256 MiB at H=1024)
ROWS_LAYOUT_MAX_R = 64  # up to this many query rows the product is (T, R), beyond it (R, T)
STORAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int8))


def colbert_score(q: np.ndarray, p: np.ndarray) -> float:
    """ColBERT score of one (query, passage) pair, FlagEmbedding's formula; the reference for `maxsim`."""
    qm = as_float_matrix(q, "q")
    pm = as_float_matrix(p, "p")
    if qm.shape[1] != pm.shape[1]:
        raise KernelInputError(f"q and p must have the same hidden size, got q {qm.shape} and p {pm.shape}; "
                               f"score vectors from the same model and head.")
    _finite(qm, "q")
    _finite(pm, "p")
    s = qm @ pm.T  # (Lq, H) @ (H, Lp) -> (Lq, Lp)
    return float(s.max(axis=1).sum(dtype=np.float64) / qm.shape[0])


def quantize_int8(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-vector symmetric int8 quantisation: (int8 rows, float32 scales) with rows * scales ~= vectors.

    A quarter of float32's memory; each value moves by at most scale / 2 = max|row| / 254.
    """
    v = as_float_matrix(vectors, "vectors", allow_empty=True)
    _finite(v, "vectors")
    codes = np.empty(v.shape, np.int8)
    scales = (np.abs(v).max(axis=1) / np.float32(127.0)).astype(np.float32) if v.shape[0] else \
        np.empty(0, np.float32)  # (n,)
    for a in range(0, v.shape[0], QUANTIZE_ROWS):  # bounded temporaries whatever n is
        s = scales[a:a + QUANTIZE_ROWS, None]
        np.rint(v[a:a + QUANTIZE_ROWS] / np.where(s > 0, s, np.float32(1.0)), out=codes[a:a + QUANTIZE_ROWS],
                casting="unsafe")  # |v / scale| <= 127 by construction
    return codes, scales


def _stack_queries(query: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """All query rows as one (R, H) float32 matrix, each query's first row index, and whether `query` was 2-D."""
    if isinstance(query, np.ndarray) and query.ndim == 3:
        nq, lq, h = query.shape
        if nq == 0 or lq == 0:
            raise KernelInputError(f"query is empty ({describe(query)}); pass at least one query with at least "
                                   f"one token vector.")
        qm = as_float_matrix(np.ascontiguousarray(query).reshape(nq * lq, h), "query")
        return np.ascontiguousarray(qm), np.arange(nq, dtype=np.int64) * lq, False
    if isinstance(query, np.ndarray) or not isinstance(query, Sequence):
        qa = np.asarray(query)
        if qa.ndim != 2:
            raise KernelInputError(f"query must be (q_tokens, H), (n_queries, q_tokens, H) or a list of "
                                   f"(q_tokens_i, H) arrays, got {describe(qa)}.")
        qm = as_float_matrix(qa, "query")
        return np.ascontiguousarray(qm), np.zeros(1, np.int64), True
    if len(query) == 0:
        raise KernelInputError("query is an empty list; pass at least one (q_tokens, H) array.")
    parts = [as_float_matrix(x, f"query[{i}]") for i, x in enumerate(query)]
    widths = {p.shape[1] for p in parts}
    if len(widths) != 1:
        raise KernelInputError(f"all queries must have the same hidden size, got {sorted(widths)}.")
    lengths = np.array([p.shape[0] for p in parts], np.int64)
    starts = np.zeros(len(parts), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return np.concatenate(parts), starts, False


def _check_docs(doc_vectors: Any, doc_offsets: Any, doc_scales: Any) -> tuple[np.ndarray, np.ndarray,
                                                                               np.ndarray | None]:
    d = doc_vectors
    if not isinstance(d, np.ndarray) or d.ndim != 2 or d.dtype not in STORAGE_DTYPES:
        raise KernelInputError(f"doc_vectors must be a 2-D (total_tokens, H) array of float32, float16 or "
                               f"int8 (with doc_scales), got {describe(d)}; convert it once with "
                               f".astype(np.float32) (float64 would double the memory and time).")
    if d.shape[1] == 0:
        raise KernelInputError(f"doc_vectors has hidden size 0 ({describe(d)}).")
    offsets = check_offsets(doc_offsets, d.shape[0], "doc_offsets", allow_empty_segments=False)
    scales = None
    if d.dtype == np.int8:
        if doc_scales is None:
            raise KernelInputError("int8 doc_vectors need doc_scales (one float32 scale per row); make both "
                                   "with quantize_int8(vectors).")
        scales = np.asarray(doc_scales)
        if scales.shape != (d.shape[0],) or scales.dtype.kind != "f":
            raise KernelInputError(f"doc_scales must be float (total_tokens,) = ({d.shape[0]},), got "
                                   f"{describe(scales)}.")
        scales = scales.astype(np.float32, copy=False)
        _finite(scales, "doc_scales")
    elif doc_scales is not None:
        raise KernelInputError(f"doc_scales is only for int8 doc_vectors, got {d.dtype} vectors; drop it.")
    return d, offsets, scales


def maxsim(query: QueryLike, doc_vectors: np.ndarray, doc_offsets: np.ndarray, *,
           candidates: np.ndarray | None = None, doc_scales: np.ndarray | None = None,
           check_finite: bool = True, chunk_tokens: int | None = None) -> np.ndarray:
    """ColBERT scores of one or many queries against packed documents, one matrix product per chunk.

    query: (q_tokens, H) -> (n_docs,); (n_queries, q_tokens, H) or a list of (q_tokens_i, H) arrays
    -> (n_queries, n_docs). doc_vectors: (total_tokens, H) float32, float16, or int8 with doc_scales
    (total_tokens,). doc_offsets: int64 (n_docs + 1,) row starts, last = total_tokens, every document
    >= 1 row. candidates: indices of the documents to score (output columns follow their order).
    check_finite=False skips the NaN/inf scan of doc_vectors (the query is always checked); use it for
    data checked once already (as ``PackedIndex`` does). chunk_tokens overrides the chunk size (tests).
    """
    qm, qstarts, single = _stack_queries(query)
    d, offsets, scales = _check_docs(doc_vectors, doc_offsets, doc_scales)
    if qm.shape[1] != d.shape[1]:
        raise KernelInputError(f"query hidden size {qm.shape[1]} != doc_vectors hidden size {d.shape[1]}; "
                               f"query and documents must come from the same model and head.")
    _finite(qm, "query")
    n_docs = offsets.shape[0] - 1
    if candidates is None:
        starts, lengths, contiguous = offsets[:-1], np.diff(offsets), True
    else:
        cand = np.asarray(candidates)
        if cand.ndim != 1 or (cand.size and cand.dtype.kind not in "iu"):
            raise KernelInputError(f"candidates must be a 1-D integer array of document indices, got "
                                   f"{describe(cand)}.")
        cand = cand.astype(np.int64, copy=False)
        if cand.size and (cand.min() < 0 or cand.max() >= n_docs):
            raise KernelInputError(f"candidates must be document indices in [0, {n_docs}), got values from "
                                   f"{int(cand.min())} to {int(cand.max())}.")
        starts, lengths, contiguous = offsets[cand], offsets[cand + 1] - offsets[cand], False
    R, H = qm.shape
    if chunk_tokens is None:
        chunk_tokens = max(MIN_CHUNK_TOKENS, PRODUCT_BYTES // (4 * R))
    elif not (isinstance(chunk_tokens, (int, np.integer)) and not isinstance(chunk_tokens, bool)
              and chunk_tokens >= 1):
        raise KernelInputError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}.")
    block_tokens = max(MIN_BLOCK_TOKENS, STAGING_BYTES // (4 * H))
    kernel = _MaxSim(qm, qstarts, d, scales, check_finite, int(chunk_tokens), block_tokens)
    if check_finite:  # a NaN/inf raises KernelInputError below; numpy's warnings on the way add nothing
        with np.errstate(invalid="ignore", over="ignore"):
            out = kernel.run(starts, lengths, contiguous)
    else:
        out = kernel.run(starts, lengths, contiguous)
    return out[0] if single else out


# float16 -> float32 by moving bits: numpy's own float16 cast runs ~1.6 ns per value here (scalar code),
# longer than the product itself; three integer passes run ~0.2 ns. Sign-extend the 16 bits into 32,
# shift left by 13 (exponent and mantissa land in float32's fields), clear the three copies of the
# sign bit that now sit above the exponent: the float32 read back equals value * 2**-112 exactly
# (float16 subnormals included), and the 2**112 goes into the query instead of every stored value.
_F16_MASK = np.int32(-0x70000001)  # 0x8FFFFFFF
_F16_SCALE = np.float32(2.0**112)
_F16_LIMIT = 2.0**-96  # |staged value| >= this <=> the float16 was inf or NaN (exponent field 31)
_F16_QUERY_MAX = 2.0**14  # above this |query| * 2**112 could overflow: scale the staged block instead


class _MaxSim:
    """One maxsim call: query matrix, storage, buffers; documents laid out virtually end to end."""

    def __init__(self, qm: np.ndarray, qstarts: np.ndarray, docs: np.ndarray, scales: np.ndarray | None,
                 check: bool, chunk_tokens: int, block_tokens: int) -> None:
        self.docs, self.scales, self.check = docs, scales, check
        self.R, self.H = qm.shape
        self.qstarts = qstarts
        self.nq = qstarts.shape[0]
        self.qlen = np.diff(np.append(qstarts, self.R)).astype(np.float32)  # (nq,) rows per query
        self.f16 = docs.dtype == np.float16
        self.scale_block = self.f16 and float(np.abs(qm).max()) >= _F16_QUERY_MAX
        self.q = qm * _F16_SCALE if self.f16 and not self.scale_block else qm  # (R, H)
        self.chunk_tokens, self.block_tokens = chunk_tokens, block_tokens
        # Product layout: (T, R) suits few query rows, (R, T) many: np.maximum.reduceat is fast only
        # when each segment is contiguous in memory, and a (T, R) reduceat over axis 0 slows down with R.
        self.by_rows = self.R <= ROWS_LAYOUT_MAX_R

    def run(self, starts: np.ndarray, lengths: np.ndarray, contiguous: bool) -> np.ndarray:
        """(n_queries, n_selected) scores of documents stored at rows starts[i]:starts[i] + lengths[i]."""
        n = lengths.shape[0]
        R = self.R
        out = np.empty((self.nq, n), np.float32)
        if n == 0:
            return out
        vcum = np.zeros(n + 1, np.int64)  # virtual offsets of the selected documents laid end to end
        np.cumsum(lengths, out=vcum[1:])
        ctok = int(min(self.chunk_tokens, vcum[-1]))
        self.product = np.empty(ctok * R, np.float32)  # viewed as (T, R) or (R, T), T <= ctok, contiguous
        maxima = np.empty(min(ctok, n) * R, np.float32)
        self.staging = np.empty((min(self.block_tokens, ctok), self.H), np.float32)
        i = 0
        while i < n:
            v0 = int(vcum[i])
            j = int(np.searchsorted(vcum, v0 + ctok, side="right")) - 1
            if j <= i:  # document i alone is longer than a chunk: running max over pieces of it
                j = i + 1
                m = np.full(R, -np.inf, np.float32)
                s0, length = int(starts[i]), int(lengths[i])
                for a in range(0, length, ctok):
                    b = min(a + ctok, length)
                    piece = self._product(s0 + a, None, b - a)
                    np.maximum(m, piece.max(axis=0 if self.by_rows else 1), out=m)
                block = m[None, :] if self.by_rows else m[:, None]
            else:
                count = int(vcum[j]) - v0
                local = vcum[i:j] - v0  # (docs in chunk,) first row of each document inside the chunk
                if contiguous:
                    piece = self._product(int(starts[i]), None, count)
                else:
                    rows = np.repeat(starts[i:j] - local, lengths[i:j]) + np.arange(count)
                    piece = self._product(0, rows, count)
                if self.by_rows:
                    block = maxima[:(j - i) * R].reshape(j - i, R)
                    np.maximum.reduceat(piece, local, axis=0, out=block)  # (T, R) -> (docs, R) segment max
                else:
                    block = maxima[:(j - i) * R].reshape(R, j - i)
                    np.maximum.reduceat(piece, local, axis=1, out=block)  # (R, T) -> (R, docs) segment max
            if self.by_rows:
                if self.nq == 1:
                    out[0, i:j] = block.sum(axis=1) / self.qlen[0]  # (docs, R) -> (docs,)
                else:
                    out[:, i:j] = (np.add.reduceat(block, self.qstarts, axis=1) / self.qlen).T  # -> (nq, docs)
            elif self.nq == 1:
                out[0, i:j] = block.sum(axis=0) / self.qlen[0]  # (R, docs) -> (docs,)
            else:
                out[:, i:j] = np.add.reduceat(block, self.qstarts, axis=0) / self.qlen[:, None]  # -> (nq, docs)
            i = j
        return out

    def _product(self, src0: int, rows: np.ndarray | None, count: int) -> np.ndarray:
        """Stored rows (src0:src0+count, or the index array rows) times the query: (count, R) or (R, count)."""
        R = self.R
        dst = self.product[:count * R].reshape((count, R) if self.by_rows else (R, count))
        direct = rows is None and self.docs.dtype == np.float32  # multiply the stored rows in place
        step = count if direct else self.staging.shape[0]
        for a in range(0, count, step):
            b = min(a + step, count)
            x = self._stage(src0 + a, None if rows is None else rows[a:b], b - a)
            if self.by_rows:
                np.matmul(x, self.q.T, out=dst[a:b])  # (T_block, H) @ (H, R) -> (T_block, R)
            else:
                np.matmul(self.q, x.T, out=dst[:, a:b])  # (R, H) @ (H, T_block) -> (R, T_block)
            if self.scales is not None:
                sc = self.scales[src0 + a:src0 + b] if rows is None else self.scales[rows[a:b]]
                if self.by_rows:
                    dst[a:b] *= sc[:, None]
                else:
                    dst[:, a:b] *= sc
        if self.check and self.docs.dtype == np.float32:
            self._check_product(dst, src0, rows)
        return dst

    def _check_product(self, dst: np.ndarray, src0: int, rows: np.ndarray | None) -> None:
        """NaN/inf check of float32 documents through their product with the query: a stored row with a
        NaN or inf makes every entry of its product row NaN or +-inf (0 * inf is NaN), so one BLAS dot of
        the product with itself (R / H of the documents' size, still in cache) finds it; the exact
        scan runs only when that dot is not finite (also when finite values overflowed: no error then)."""
        flat = dst.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(flat, flat)):
                return
        per_row = dst if self.by_rows else dst.T
        for k in np.flatnonzero(~np.isfinite(per_row).all(axis=1)):
            row = src0 + int(k) if rows is None else int(rows[k])
            if not np.isfinite(self.docs[row]).all():
                _raise_bad_row(row)

    def _stage(self, s: int, rows: np.ndarray | None, count: int) -> np.ndarray:
        """The float32 (count, H) block to multiply: a view of float32 storage, else an upcast/gathered copy."""
        docs = self.docs
        if docs.dtype == np.float32 and rows is None:
            return docs[s:s + count]  # a view
        x = self.staging[:count]
        if rows is not None and docs.dtype == np.float32:
            # straight into staging; mode="clip" because "raise" buffers the output (a second copy) and the
            # rows were range-checked with the candidates
            return np.take(docs, rows, axis=0, out=x, mode="clip")
        src = docs[s:s + count] if rows is None else docs[rows]  # gathered rows: a (count, H) copy
        if self.f16:
            u = x.view(np.int32)
            np.copyto(u, src.view(np.int16))  # sign-extending widen
            np.left_shift(u, 13, out=u)
            np.bitwise_and(u, _F16_MASK, out=u)  # x = value * 2**-112 exactly
            if self.check and not (x.max() < _F16_LIMIT and x.min() > -_F16_LIMIT):
                k = int(np.argmax(~(np.abs(x) < _F16_LIMIT).all(axis=1)))
                _raise_bad_row(s + k if rows is None else int(rows[k]))
            if self.scale_block:
                x *= _F16_SCALE
        else:
            np.copyto(x, src)  # float32 gather, or int8 -> float32 (per-row scales go on the product)
        return x


def _raise_bad_row(row: int) -> None:
    raise KernelInputError(f"doc_vectors row {row} holds NaN/inf; its document's score would be meaningless. "
                           f"Re-encode or drop that document (pass check_finite=False only for data you "
                           f"have checked yourself).")


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best scores per row, best first, ties broken by lower index: (indices int64, scores).

    scores (n,) -> (min(k, n),) each; (n_queries, n) -> (n_queries, min(k, n)). O(n) selection with
    ``np.argpartition``, then a sort of the k winners only.
    """
    s = np.asarray(scores)
    if s.ndim not in (1, 2) or s.dtype.kind not in "fiu":
        raise KernelInputError(f"scores must be a 1-D (n,) or 2-D (n_queries, n) real array, got {describe(s)}.")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise KernelInputError(f"k must be a non-negative int, got {k!r}.")
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise KernelInputError("scores hold NaN; a ranking of NaN is undefined. Check the inputs that produced "
                               "them.")
    if s.ndim == 1:
        return _topk_row(s, int(k))
    kk = min(int(k), s.shape[1])
    idx = np.empty((s.shape[0], kk), np.int64)
    val = np.empty((s.shape[0], kk), s.dtype)
    for r in range(s.shape[0]):
        idx[r], val[r] = _topk_row(s[r], kk)
    return idx, val


def _topk_row(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = s.shape[0]
    k = min(k, n)
    if k == 0:
        return np.empty(0, np.int64), s[:0].copy()
    if k < n:
        kth = s[np.argpartition(s, n - k)[n - k]]  # the k-th largest value
        above = np.flatnonzero(s > kth)
        tied = np.flatnonzero(s == kth)[:k - above.shape[0]]  # lower indices win ties
        idx = np.concatenate([above, tied])
    else:
        idx = np.arange(n, dtype=np.int64)
    order = np.lexsort((idx, -s[idx].astype(np.float64)))  # score descending, then index ascending
    idx = idx[order].astype(np.int64, copy=False)
    return idx, s[idx]
