"""The batch planner: every text once, budgets respected, and sorted batches stop dragging short texts up to
long ones once they are big enough."""

from __future__ import annotations

import numpy as np
from bge_edge.runtime.batching import FULL_BATCH_TOKENS, bucket_length, plan_batches


def test_sorted_batches_close_at_a_bucket_boundary_once_full() -> None:
    lengths = [100] * 20 + [30] * 100  # 20 x 104 padded = 2,080 tokens >= FULL_BATCH_TOKENS: the 30s go elsewhere
    batches = plan_batches(lengths, 512, batch_size=256, max_batch_tokens=8192, hidden_size=384, attention_heads=12)
    first = batches[0]
    assert first.length == bucket_length(100, 512) and len(first.indices) == 20
    assert all(b.length == bucket_length(30, 512) for b in batches[1:])
    padded = sum(len(b.indices) * b.length for b in batches)
    assert padded <= 1.1 * sum(lengths)


def test_small_batches_still_take_shorter_texts() -> None:
    lengths = [100] * 3 + [30] * 5  # 8 x 104 < FULL_BATCH_TOKENS: keep filling
    assert 8 * bucket_length(100, 512) < FULL_BATCH_TOKENS
    batches = plan_batches(lengths, 512, batch_size=256, max_batch_tokens=8192, hidden_size=384, attention_heads=12)
    assert len(batches) == 1


def test_every_text_appears_once_and_order_is_recoverable() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 512, 1000)
    for sort in (True, False):
        batches = plan_batches(lengths, 512, sort=sort, hidden_size=384, attention_heads=12)
        seen = np.concatenate([b.indices for b in batches])
        assert sorted(seen.tolist()) == list(range(1000))
        assert all(b.length >= lengths[b.indices].max() and len(b.indices) * b.length <= 8192 for b in batches)
