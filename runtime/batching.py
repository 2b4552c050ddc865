"""The one place that decides batch shapes: bucket lengths, token-budget batches and the memory model.

Texts are sorted by token length (longest first, so a memory problem shows on the first batch),
cut into batches bounded by a text count, a padded-token budget and a working-memory budget (and at
bucket boundaries once a batch is big enough), and each batch is padded up to a bucket length. Few
distinct shapes keep GPU and OpenVINO plans cached; on CPU the buckets cost at most ~12 % padding over
the batch's own maximum.

Long texts on a graph with linear attention (``GraphEntry.linear_attention``, BGE-M3 exports) run
alone and unpadded: a batch without padding takes the graph's flash-attention branch, whose memory
grows linearly with length (export/longattn.py). Everything else takes the fused Attention, which
holds the full score matrix.

Memory model: working memory of one forward pass, weights excluded, for ``b`` texts padded to ``L``
tokens, hidden size ``H``, ``h`` heads (float32, one layer live at a time; fitted on full-shape BGE-M3):
  activations  = b * L * H * 4 B * ACTIVATION_TENSORS   (hidden states, QKV, FFN 4H, heads' outputs)
  attention    = b * h * L * L * 4 B                     (score matrix; 0 on the linear-attention path)
e.g. BGE-M3 (H 1024, 16 heads), one 8,192-token text: 0.6 GiB of activations (measured 0.55 GiB at fp32
on the flash path), + 4 GiB of scores on the plain path (measured 4.6 GiB in all); 8 texts of 512 tokens:
0.3 GiB + 0.125 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["MAX_BATCH_TOKENS", "DEFAULT_MEMORY_MB", "DEFAULT_BATCH_SIZE", "LINEAR_ATTENTION_FROM",
           "ACTIVATION_TENSORS", "Batch", "bucket_length", "working_bytes", "plan_batches"]

# 8,192 padded tokens: ~0.6 GiB of fp32 activations for H=1024 (BGE-M3), ~0.2 GiB for H=384.
MAX_BATCH_TOKENS = 8192
# Working-memory budget per batch when the caller sets none (weights come on top).
DEFAULT_MEMORY_MB = 2048
DEFAULT_BATCH_SIZE = 256
# Sorted batches close at a bucket boundary once they hold this many padded tokens: on CPU a larger batch
# gains almost nothing, while dragging shorter texts up to the longest one wastes work (MiniLM, 1,000 texts of
# 8-256 tokens: padding 10.8 % -> 3.9 %, INT8 +6.4 % tokens/s, `python -m bench.runtime_ab`).
FULL_BATCH_TOKENS = 1024
# Texts longer than this run alone and unpadded on a linear-attention graph (flash branch).
LINEAR_ATTENTION_FROM = 512
# Live float32 tensors of size L x H in a forward pass: full-shape BGE-M3 fp32 on the flash path grows by
# 138 MiB at 2,048 tokens and 559 MiB at 8,192 (bench/longdoc.py), i.e. 17.3 and 17.5 of them.
ACTIVATION_TENSORS = 18


def bucket_length(n: int, max_length: int) -> int:
    """Padded length for a batch whose longest text has ``n`` tokens (never above ``max_length``).

    Multiples of 8 up to 128, of 32 up to 512, of 128 up to 2,048, of 512 beyond: waste <= ~12 %.
    """
    if n <= 0:
        raise ValueError(f"token count must be positive, got {n}")
    step = 8 if n <= 128 else 32 if n <= 512 else 128 if n <= 2048 else 512
    return min(-(-n // step) * step, max(max_length, n))


def working_bytes(count: int, length: int, hidden_size: int, attention_heads: int, linear: bool = False) -> int:
    """Estimated working memory in bytes of one batch (module docstring); ``linear``: the flash branch."""
    activations = count * length * hidden_size * 4 * ACTIVATION_TENSORS
    scores = 0 if linear else count * attention_heads * length * length * 4
    return activations + scores


@dataclass(frozen=True)
class Batch:
    """Indices into the input list (longest first), the length to run them at (padded, or exact), and the
    batch's estimated working memory (``working_bytes``, flash branch included when it takes it)."""

    indices: np.ndarray
    length: int
    working_bytes: int


def plan_batches(lengths: Sequence[int] | np.ndarray, max_length: int, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_batch_tokens: int = MAX_BATCH_TOKENS, hidden_size: int = 1024, attention_heads: int = 16,
                 max_memory_bytes: int = DEFAULT_MEMORY_MB * 2**20, linear_attention: bool = False,
                 sort: bool = True) -> list[Batch]:
    """Cut texts of the given token lengths into batches (see module docstring); every index appears once.

    A text that alone exceeds a budget still gets a batch of its own (the caller decides whether to
    refuse it: ``Batch.working_bytes`` says what it needs). ``sort=False`` keeps input order (the naive
    baseline the benchmark compares against).
    """
    if batch_size < 1 or max_batch_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_batch_tokens ({max_batch_tokens}) must be >= 1")
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lens, kind="stable") if sort else np.arange(len(lens))
    batches: list[Batch] = []
    i, n = 0, len(order)
    while i < n:
        longest = int(lens[order[i]])
        if linear_attention and longest > LINEAR_ATTENTION_FROM:
            batches.append(Batch(indices=order[i:i + 1], length=longest,  # alone, unpadded: flash branch
                                 working_bytes=working_bytes(1, longest, hidden_size, attention_heads, linear=True)))
            i += 1
            continue
        j = i + 1
        while j < n and j - i < batch_size:
            m = max(longest, int(lens[order[j]]))
            if linear_attention and m > LINEAR_ATTENTION_FROM:
                break  # a long text never joins a padded batch (input order only: sorted, it comes first)
            L = bucket_length(m, max_length)
            count = j - i + 1
            if count * L > max_batch_tokens or \
                    working_bytes(count, L, hidden_size, attention_heads) > max_memory_bytes:
                break
            if sort and (count - 1) * L >= FULL_BATCH_TOKENS and \
                    bucket_length(int(lens[order[j]]), max_length) < L:
                break  # big enough already: the next text pads less in a batch of its own bucket
            longest, j = m, j + 1
        L = bucket_length(longest, max_length)
        batches.append(Batch(indices=order[i:j], length=L,
                             working_bytes=working_bytes(j - i, L, hidden_size, attention_heads)))
        i = j
    return batches
