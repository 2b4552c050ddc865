"""Micro-batching: merge concurrent requests into one ``Engine.encode`` call, off the event loop.

Requests become ``Job``s in a FIFO. One collector task takes jobs from the front: encode jobs are
merged (up to ``max_merge_inputs`` texts and ``max_merge_tokens`` real tokens; the runtime then cuts the
merged list into its padded-token batches), a score job runs alone. When the model is idle, the first
job waits at most ``batch_wait_ms`` for company; jobs that queued while the model was busy go at once.
The wait only happens while other accepted requests are still being read and tokenised (``arriving``):
a lone client never pays it. Inference runs on one dedicated thread; results are split back per job.
A merged call that fails is retried job by job, so one bad request cannot fail the requests it was batched with.

The queue is bounded by waiting texts (``max_queue_inputs``): ``submit`` raises ``QueueFull`` with a
Retry-After estimate from the measured throughput. Nothing polls: an idle batcher awaits an Event.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .engine import Engine

__all__ = ["Job", "MicroBatcher", "QueueFull", "Stopped"]


class QueueFull(Exception):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Stopped(Exception):
    """The batcher was stopped before the job ran."""


@dataclass
class Job:
    kind: str                                   # "encode" | "score" | "rerank" (pairs through a reranker)
    texts: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    tokens: int = 0                             # real tokens (after truncation), for batch limits
    dense: bool = True
    sparse: bool = False
    colbert: bool = False
    weights: Sequence[float] | None = None
    future: asyncio.Future[Any] | None = None
    enqueued: float = 0.0

    @property
    def size(self) -> int:
        """Queue and merge accounting: texts, or pairs (so any request within max_inputs fits the queue)."""
        return len(self.texts) if self.kind == "encode" else len(self.pairs)


class MicroBatcher:
    def __init__(self, engine: Engine, max_length: int, executor: ThreadPoolExecutor, *, wait_ms: float = 2.0,
                 max_merge_inputs: int = 256, max_merge_tokens: int = 16_384, max_queue_inputs: int = 4096,
                 observe: Callable[[str, float], None] | None = None,
                 arriving: Callable[[], int] = lambda: 1) -> None:
        self.engine = engine
        self.max_length = max_length
        self.executor = executor
        self.wait = wait_ms / 1000.0
        self.max_merge_inputs = max_merge_inputs
        self.max_merge_tokens = max_merge_tokens
        self.max_queue_inputs = max_queue_inputs
        self._observe = observe or (lambda name, value: None)
        self._arriving = arriving
        self._pending: deque[Job] = deque()
        self.pending_inputs = 0
        self.running_jobs = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._rate = 0.0  # texts per second, exponentially averaged over batches

    # ---- the event-loop side ------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="bge-edge-batcher")

    @property
    def queued_jobs(self) -> int:
        return len(self._pending)

    def poke(self) -> None:
        """Re-check the wait condition (a request that was arriving has gone elsewhere)."""
        self._wake.set()

    def retry_after(self) -> int:
        rate = self._rate or 50.0
        return int(min(60, max(1, math.ceil(self.pending_inputs / rate))))

    def submit(self, job: Job) -> asyncio.Future[Any]:
        """Queue ``job``; its future resolves to the per-job result. QueueFull when over the bound."""
        if self._task is None or self._task.done():
            raise Stopped("the batcher is not running")
        if self.pending_inputs + job.size > self.max_queue_inputs:
            raise QueueFull(f"the queue holds {self.pending_inputs} texts and this request adds {job.size}: over "
                            f"max_queue_inputs {self.max_queue_inputs}; retry after {self.retry_after()} s",
                            self.retry_after())
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        job.enqueued = loop.time()
        self._pending.append(job)
        self.pending_inputs += job.size
        self._wake.set()
        return job.future

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._pending:
            job = self._pending.popleft()
            if job.future is not None and not job.future.done():
                job.future.set_exception(Stopped("the server stopped before this request ran"))
        self.pending_inputs = 0

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            first = self._pending[0]
            deadline = first.enqueued + self.wait
            while first.kind == "encode" and not self._full() and self._arriving() > 0 and \
                    (now := loop.time()) < deadline:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - now)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            self.running_jobs = len(batch)
            try:
                await self._run(loop, batch)
            except Exception as e:  # a fault of this batch (a bug, not the model's): fail its requests, keep serving
                for j in batch:
                    if j.future is not None and not j.future.done():
                        j.future.set_exception(e)
            except BaseException as e:  # cancelled (the server stops): fail this batch, then stop
                for j in batch:
                    if j.future is not None and not j.future.done():
                        j.future.set_exception(Stopped(f"the server stopped while this request ran ({e!r})"))
                raise
            finally:
                self.running_jobs = 0

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        now = loop.time()
        for j in batch:
            self._observe("queue_wait", now - j.enqueued)
        results = await loop.run_in_executor(self.executor, self._process, batch)
        dt = time.perf_counter() - t0
        n = sum(j.size for j in batch)
        inst = n / dt if dt > 0 else 0.0
        self._rate = inst if not self._rate else 0.8 * self._rate + 0.2 * inst
        for j, r in zip(batch, results):
            if j.future is None or j.future.done():
                continue
            if isinstance(r, BaseException):
                j.future.set_exception(r)
            else:
                j.future.set_result(r)
        self._observe("inference_seconds", dt)
        self._observe("batch_inputs", n)
        self._observe("batch_requests", len(batch))

    def _full(self) -> bool:
        n = t = 0
        for j in self._pending:
            if j.kind != "encode":
                return True
            n += j.size
            t += j.tokens
            if n >= self.max_merge_inputs or t >= self.max_merge_tokens:
                return True
        return False

    def _take(self) -> list[Job]:
        batch: list[Job] = []
        n = t = 0
        while self._pending:
            j = self._pending[0]
            if j.future is not None and j.future.done():  # cancelled by its request: drop it
                self._pending.popleft()
                self.pending_inputs -= j.size
                continue
            if j.kind != "encode":
                if not batch:
                    batch.append(self._pending.popleft())
                    self.pending_inputs -= j.size
                break
            if batch and (n + j.size > self.max_merge_inputs or t + j.tokens > self.max_merge_tokens):
                break
            batch.append(self._pending.popleft())
            self.pending_inputs -= j.size
            n += j.size
            t += j.tokens
        return batch

    # ---- the inference thread -----------------------------------------------------------------

    def _process(self, batch: list[Job]) -> list[Any]:
        if batch[0].kind == "score":
            return [self._run_one(batch[0])]
        if len(batch) == 1:
            return [self._run_one(batch[0])]
        texts = [t for j in batch for t in j.texts]
        want = (any(j.dense for j in batch), any(j.sparse for j in batch), any(j.colbert for j in batch))
        try:
            out = self.engine.encode(texts, self.max_length, *want)
        except Exception:
            return [self._run_one(j) for j in batch]  # isolate the failing request
        results: list[Any] = []
        start = 0
        for j in batch:
            end = start + len(j.texts)
            results.append({
                "dense_vecs": out["dense_vecs"][start:end] if j.dense else None,
                "lexical_weights": out["lexical_weights"][start:end] if j.sparse else None,
                "colbert_vecs": out["colbert_vecs"][start:end] if j.colbert else None,
            })
            start = end
        return results

    def _run_one(self, j: Job) -> Any:
        try:
            if j.kind == "score":
                return self.engine.score(j.pairs, self.max_length, j.weights)
            if j.kind == "rerank":  # a RerankerEngine: raw scores, pairs truncated at the batcher's max length
                return self.engine.rerank(j.pairs, self.max_length)
            return self.engine.encode(j.texts, self.max_length, j.dense, j.sparse, j.colbert)
        except Exception as e:
            return e
