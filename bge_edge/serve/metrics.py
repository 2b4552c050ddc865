"""A minimal Prometheus registry (text exposition format 0.0.4), thread-safe, no dependencies.

Counters, gauges and histograms with fixed label names; ``render()`` writes ``# HELP``/``# TYPE`` lines,
cumulative ``_bucket{le=...}`` series with ``+Inf``, ``_sum`` and ``_count``, and escapes label values.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from typing import Callable, Iterable, TypeVar

__all__ = ["Registry", "LATENCY_BUCKETS", "SIZE_BUCKETS"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    if isinstance(x, int) or float(x).is_integer():
        return str(int(x))
    return repr(float(x))


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def lines(self) -> list[str]:
        raise NotImplementedError

    def __init__(self, reg: Registry, name: str, help: str, labels: tuple[str, ...]) -> None:
        self.name, self.help, self.labelnames, self._lock = name, help, labels, reg._lock

    def _key(self, labels: Iterable[str]) -> tuple[str, ...]:
        key = tuple(str(x) for x in labels)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {key}")
        return key

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a: object, **k: object) -> None:
        super().__init__(*a, **k)  # type: ignore[arg-type]
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + by

    def get(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        out = self.header()
        for key, v in sorted(self._values.items()):
            out.append(f"{self.name}{_labels(self.labelnames, key)} {_num(v)}")
        if not self._values and not self.labelnames:
            out.append(f"{self.name} 0")
        return out


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, *a: object, fn: Callable[[], float] | None = None, **k: object) -> None:
        super().__init__(*a, **k)  # type: ignore[arg-type]
        self._values: dict[tuple[str, ...], float] = {}
        self._fn = fn

    def set(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = value

    def lines(self) -> list[str]:
        out = self.header()
        if self._fn is not None:
            out.append(f"{self.name} {_num(self._fn())}")
        for key, v in sorted(self._values.items()):
            out.append(f"{self.name}{_labels(self.labelnames, key)} {_num(v)}")
        return out


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, *a: object, buckets: tuple[float, ...] = LATENCY_BUCKETS, **k: object) -> None:
        super().__init__(*a, **k)  # type: ignore[arg-type]
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list[float]] = {}  # per-bucket counts..., sum, count

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            s = self._series.get(key)
            if s is None:
                s = self._series[key] = [0.0] * (len(self.buckets) + 2)
            if i < len(self.buckets):
                s[i] += 1
            s[-2] += value
            s[-1] += 1

    def count(self, *labels: str) -> float:
        with self._lock:
            s = self._series.get(self._key(labels))
            return s[-1] if s else 0.0

    def lines(self) -> list[str]:
        out = self.header()
        for key, s in sorted(self._series.items()):
            cum = 0.0
            for b, c in zip(self.buckets, s):
                cum += c
                le = 'le="' + _num(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {_num(cum)}")
            le = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {_num(s[-1])}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {_num(s[-1])}")
        return out


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


_M = TypeVar("_M", bound=_Metric)


class Registry:
    """The server's metrics; ``render()`` is the /metrics body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: list[_Metric] = []
        self._start = time.time()

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._add(Counter(self, name, help, labels))

    def gauge(self, name: str, help: str, labels: tuple[str, ...] = (),
              fn: Callable[[], float] | None = None) -> Gauge:
        return self._add(Gauge(self, name, help, labels, fn=fn))

    def histogram(self, name: str, help: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(self, name, help, labels, buckets=buckets))

    def _add(self, m: _M) -> _M:
        self._metrics.append(m)
        return m

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            if isinstance(m, Gauge) and m._fn is not None:
                lines.extend(m.lines())  # callbacks run outside the lock (they may take other locks)
                continue
            with self._lock:
                lines.extend(m.lines())
        t = os.times()
        lines += ["# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.",
                  "# TYPE process_cpu_seconds_total counter",
                  f"process_cpu_seconds_total {_num(round(t.user + t.system, 3))}",
                  "# HELP process_resident_memory_bytes Resident memory size in bytes.",
                  "# TYPE process_resident_memory_bytes gauge",
                  f"process_resident_memory_bytes {_num(_rss_bytes())}",
                  "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.",
                  "# TYPE process_start_time_seconds gauge",
                  f"process_start_time_seconds {_num(round(self._start, 3))}"]
        return "\n".join(lines) + "\n"

