"""The one place that decides batch shapes: bucket lengths and token-budget batches.

Texts are sorted by token length (longest first, so a memory problem shows on the first batch),
cut into batches bounded by a text count, a padded-token budget and an attention-score budget,
and each batch is padded up to a bucket length. Few distinct shapes keep GPU and OpenVINO plans
cached; on CPU the buckets cost at most ~12 % padding over the batch's own maximum.

Memory arithmetic (fp32, per batch of ``b`` texts padded to ``L`` tokens, hidden ``H``, ``h`` heads):
  activations  ~ b * L * H * 4 bytes * ~10 live tensors   (QKV, FFN 4H, residuals)
  attention    =  b * h * L * L * 4 bytes                  (scores, one layer at a time)
  ColBERT out  =  b * L * H * 4 bytes
``MAX_BATCH_TOKENS`` bounds the first and third, ``MAX_ATTENTION_BYTES`` the second; a text whose
attention alone exceeds the budget runs alone (batch of one): length never multiplies with count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["MAX_BATCH_TOKENS", "MAX_ATTENTION_BYTES", "DEFAULT_BATCH_SIZE", "Batch", "bucket_length",
           "plan_batches"]

# 8,192 padded tokens: ~330 MB of fp32 activations for H=1024 (BGE-M3), ~125 MB for H=384.
MAX_BATCH_TOKENS = 8192
# 256 MiB of attention scores per layer: e.g. 16 heads x 1024 x 1024 x 4 B = 64 MiB per 1k-token text -> 4 of them.
MAX_ATTENTION_BYTES = 256 * 1024 * 1024
DEFAULT_BATCH_SIZE = 256


def bucket_length(n: int, max_length: int) -> int:
    """Padded length for a batch whose longest text has ``n`` tokens (never above ``max_length``).

    Multiples of 8 up to 128, of 32 up to 512, of 128 up to 2,048, of 512 beyond: waste <= ~12 %.
    """
    if n <= 0:
        raise ValueError(f"token count must be positive, got {n}")
    step = 8 if n <= 128 else 32 if n <= 512 else 128 if n <= 2048 else 512
    return min(-(-n // step) * step, max(max_length, n))


@dataclass(frozen=True)
class Batch:
    """Indices into the input list (longest first) and the padded length to run them at."""

    indices: np.ndarray
    length: int


def plan_batches(lengths: Sequence[int] | np.ndarray, max_length: int, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_batch_tokens: int = MAX_BATCH_TOKENS, attention_heads: int = 12,
                 max_attention_bytes: int = MAX_ATTENTION_BYTES, sort: bool = True) -> list[Batch]:
    """Cut texts of the given token lengths into batches (see module docstring); every index appears once.

    ``sort=False`` keeps input order (the naive baseline the benchmark compares against).
    """
    if batch_size < 1 or max_batch_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_batch_tokens ({max_batch_tokens}) must be >= 1")
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lens, kind="stable") if sort else np.arange(len(lens))
    batches: list[Batch] = []
    i, n = 0, len(order)
    while i < n:
        j, longest = i + 1, int(lens[order[i]])
        while j < n and j - i < batch_size:
            m = max(longest, int(lens[order[j]]))
            L = bucket_length(m, max_length)
            count = j - i + 1
            if count * L > max_batch_tokens or count * attention_heads * L * L * 4 > max_attention_bytes:
                break
            longest, j = m, j + 1
        batches.append(Batch(indices=order[i:j], length=bucket_length(longest, max_length)))
        i = j
    return batches
