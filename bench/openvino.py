"""The OpenVINO backend's settings, measured on real all-MiniLM-L6-v2 in one process, interleaved over rounds:

  1. hints and streams: LATENCY with 1 stream (the default) vs THROUGHPUT with 2 streams, per graph precision:
     corpus tokens/s, batch-1 query latency, and the CPU the process burns while idle afterwards;
  2. shapes: the IR compiled once with dynamic shapes (the default) vs the runtime's ``shapes="bucket"`` (one
     compile per bucket length, sequence axis static: [-1, L]) vs fully static per batch shape ([B, L]);
  3. profile of one corpus pass: tokenisation, inference, the rest (padding, copies, heads) and the padding
     share; and OpenVINO's per-op timings (PERF_COUNT) on a typical batch;
  4. the same batches through our INT8 IR and sentence-transformers' INT8 IR (is the graph the difference?).

    .venv-bench/bin/python -m bench.openvino [--rounds 3] [--texts 1000] [--queries 300] [--sections shapes ...]

Uses the bench's artifacts (bench/.cache/artifacts/minilm-openvino, made by ``python -m bench.prepare
edge-minilm-ov`` when missing). Corpus: bench/workload.py's mixed-length SciFact texts (8-256 tokens).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any, Iterable, Iterator

import numpy as np

from bench import prepare as prep
from bench.systems import rss_mb
from bench.workload import MAX_LENGTH, cpu_info, load_corpus


def _cpu_s() -> float:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ensure_artifacts() -> None:
    for step, folder in (("edge-minilm-ov", prep.MINILM_EDGE_OV), ("edge-minilm", prep.MINILM_EDGE)):
        if not (folder / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "bench.prepare", step], check=True)


def _corpus_tps(emb: Any, texts: list[str]) -> float:
    t = time.perf_counter()
    emb.encode(texts, max_length=MAX_LENGTH)
    return emb.last_stats.tokens / (time.perf_counter() - t)


def _query_ms(emb: Any, queries: list[str]) -> list[float]:
    out = []
    for q in queries:
        t = time.perf_counter()
        emb.encode([q], max_length=MAX_LENGTH)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _idle_cpu_pct(seconds: float) -> float:
    c = _cpu_s()
    time.sleep(seconds)
    return 100 * (_cpu_s() - c) / seconds


def hints(texts: list[str], queries: list[str], rounds: int) -> None:
    from bge_edge.runtime import Embedder

    print("## 1. Hints and streams (batches from the runtime's planner; batch-1 queries one at a time)\n")
    configs: list[tuple[str, dict[str, Any]]] = [("ORT INT8 (reference)", {"artifact_dir": prep.MINILM_EDGE,
                                                                            "precision": "int8",
                                                                            "backend": "onnxruntime"})]
    for prec in ("int8", "fp16", "fp32"):
        for streams in (1, 2):
            name = f"OV {prec.upper()}, " + ("LATENCY, 1 stream" if streams == 1 else "THROUGHPUT, 2 streams")
            configs.append((name, {"artifact_dir": prep.MINILM_EDGE_OV, "precision": prec, "backend": "openvino",
                                   "streams": streams}))
    embs = {name: Embedder(**kw) for name, kw in configs}
    for e in embs.values():
        e.encode(texts[:64], max_length=MAX_LENGTH)
    tps: dict[str, list[float]] = defaultdict(list)
    lat: dict[str, list[float]] = defaultdict(list)
    idle: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for name, e in embs.items():
            tps[name].append(_corpus_tps(e, texts))
            lat[name] += _query_ms(e, queries)
            idle[name].append(_idle_cpu_pct(1.0))
    print("| configuration | providers | corpus tokens/s | query p50 ms | query p95 ms | idle CPU % after |")
    print("|---|---|---|---|---|---|")
    for name, e in embs.items():
        q = np.percentile(lat[name], [50, 95])
        print(f"| {name} | {e.providers[0]} | {statistics.median(tps[name]):,.0f} | {q[0]:.2f} | {q[1]:.2f} | "
              f"{statistics.median(idle[name]):.1f} |")
    print()


class _PerShape:
    """An OpenVINOSession stand-in compiling the IR once per batch shape ([B, L]), to compare with the runtime's
    ``shapes="bucket"`` (one plan per bucket length, [-1, L])."""

    def __init__(self, base: Any, xml: str, weights: str, precision: str, full: bool = True) -> None:
        import openvino as ov
        from bge_edge.runtime.ov_session import EXECUTION_PRECISION

        self._core, self._xml, self._weights, self._full = ov.Core(), xml, weights, full
        self._cfg: dict[str, Any] = {"INFERENCE_NUM_THREADS": base.threads, "PERFORMANCE_HINT": "LATENCY"}
        if EXECUTION_PRECISION[precision]:
            self._cfg["INFERENCE_PRECISION_HINT"] = EXECUTION_PRECISION[precision]
        self._reqs: dict[tuple[int, int], Any] = {}
        self.compile_s = 0.0

    def _req(self, b: int, n: int) -> Any:
        key = (b if self._full else -1, n)
        if key not in self._reqs:
            t = time.perf_counter()
            model = self._core.read_model(self._xml, self._weights)
            model.reshape({"input_ids": list(key), "attention_mask": list(key)})
            self._reqs[key] = self._core.compile_model(model, "CPU", self._cfg).create_infer_request()
            self.compile_s += time.perf_counter() - t
        return self._reqs[key]

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        r = self._req(*feeds["input_ids"].shape)
        r.infer(feeds)
        return [r.get_tensor(name).data.copy() for name in outputs]


def shapes(texts: list[str], rounds: int) -> None:
    from bge_edge.runtime import Embedder

    print("## 2. Dynamic shapes vs one compile per bucket length / batch shape (INT8, 1 stream)\n")
    xml = str(prep.MINILM_EDGE_OV / "openvino" / "model.int8.xml")
    embs: dict[str, Any] = {}
    for name, shapes in (("dynamic [-1, -1] (default)", "dynamic"),
                         ('per bucket length [-1, L] (shapes="bucket")', "bucket"),
                         ("per batch shape [B, L] (not in the runtime)", None)):
        e = Embedder(prep.MINILM_EDGE_OV, precision="int8", backend="openvino", shapes=shapes or "dynamic")
        if shapes is None:
            e._session = _PerShape(e._session, xml, xml[:-4] + ".bin", "int8")  # noqa: SLF001
        embs[name] = e
    first: dict[str, float] = {}
    rss_growth: dict[str, float] = {}
    for name, e in embs.items():  # first pass: includes the per-shape compiles (and the memory the plans take)
        r, t = rss_mb(), time.perf_counter()
        e.encode(texts, max_length=MAX_LENGTH)
        first[name] = time.perf_counter() - t
        rss_growth[name] = rss_mb() - r
    tps: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for name, e in embs.items():
            tps[name].append(_corpus_tps(e, texts))
    shapes_seen = sorted(set(embs["dynamic [-1, -1] (default)"].last_stats.batch_shapes))
    print(f"{len(shapes_seen)} batch shapes, {len({n for _, n in shapes_seen})} bucket lengths in one pass\n")
    print("| shapes | corpus tokens/s (warm) | vs dynamic | first pass s (compiles included) | compile s | "
          "RSS growth MB |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(tps["dynamic [-1, -1] (default)"])
    for name, e in embs.items():
        comp = getattr(e._session, "compile_s", 0.0)  # noqa: SLF001
        tp = statistics.median(tps[name])
        print(f"| {name} | {tp:,.0f} | {tp / base:.2f}x | {first[name]:.2f} | {comp:.2f} | {rss_growth[name]:,.0f} |")
    print()


def profile(texts: list[str]) -> None:
    import openvino as ov
    from bge_edge.runtime import Embedder

    print("## 3. Where the time goes (INT8, 1 stream, one warm corpus pass)\n")
    e = Embedder(prep.MINILM_EDGE_OV, precision="int8", backend="openvino")
    e.encode(texts, max_length=MAX_LENGTH)
    sess = e._session  # noqa: SLF001
    spent = {"infer": 0.0, "tokenise": 0.0}
    run_many, tokenize = sess.run_many, e._tokenize  # noqa: SLF001

    def timed_run_many(outputs: list[str], feeds: Iterable[dict[str, np.ndarray]]) -> Iterator[list[np.ndarray]]:
        feeds = list(feeds)  # padding built outside the timed part
        t = time.perf_counter()
        out = list(run_many(outputs, feeds))
        spent["infer"] += time.perf_counter() - t
        return iter(out)

    def timed_tokenize(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        r = tokenize(*a, **k)
        spent["tokenise"] += time.perf_counter() - t
        return r

    sess.run_many, e._tokenize = timed_run_many, timed_tokenize  # noqa: SLF001
    t = time.perf_counter()
    e.encode(texts, max_length=MAX_LENGTH)
    total = time.perf_counter() - t
    s = e.last_stats
    rest = total - spent["infer"] - spent["tokenise"]
    print("| part | seconds | share |\n|---|---|---|")
    for k, v in (("tokenisation (tokenizers, batch)", spent["tokenise"]), ("inference (OpenVINO)", spent["infer"]),
                 ("the rest: padding, copies, pooling, order", rest), ("total", total)):
        print(f"| {k} | {v:.3f} | {100 * v / total:.0f}% |")
    print(f"\n{s.tokens:,} real tokens, {s.padded_tokens:,} computed ({100 * (1 - s.tokens / s.padded_tokens):.1f}% "
          f"padding), {s.batches} batches\n")

    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": sess.threads, "PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = core.compile_model(str(prep.MINILM_EDGE_OV / "openvino" / "model.int8.xml"), "CPU", cfg)
    req = compiled.create_infer_request()
    b, n = 16, 64
    ids = np.random.default_rng(0).integers(1000, 20000, (b, n))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for _ in range(5):
        req.infer(feed)
    by: dict[str, float] = defaultdict(float)
    for _ in range(20):
        req.infer(feed)
        for p in req.profiling_info:
            by[f"{p.node_type} ({p.exec_type})"] += p.real_time.total_seconds() / 20
    tot = sum(by.values())
    print(f"OpenVINO per-op time on a {b}x{n} batch (PERF_COUNT, mean of 20 runs, {1e3 * tot:.2f} ms in all):\n")
    print("| op (kernel) | ms | share |\n|---|---|---|")
    for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:10]:
        print(f"| {k} | {1e3 * v:.3f} | {100 * v / tot:.0f}% |")
    print()


def peer_graph(rounds: int) -> None:
    """Our INT8 IR vs sentence-transformers' INT8 IR on identical batches: is the graph itself faster or slower?"""
    import openvino as ov

    st_xml = prep.ST_MINILM / prep.ST_OV_INT8
    print("## 4. Same batch, two INT8 graphs: bge-edge's IR vs sentence-transformers' IR (bench.prepare "
          "st-openvino-int8)\n")
    if not st_xml.is_file():
        subprocess.run([sys.executable, "-m", "bench.prepare", "st-openvino"], check=True)
        subprocess.run([sys.executable, "-m", "bench.prepare", "st-openvino-int8"], check=True)
    core = ov.Core()
    base = {"INFERENCE_NUM_THREADS": os.cpu_count() or 1, "PERFORMANCE_HINT": "LATENCY"}
    graphs = {"bge-edge INT8, f32 float parts (ours)": (prep.MINILM_EDGE_OV / "openvino" / "model.int8.xml",
                                                       {"INFERENCE_PRECISION_HINT": "f32"}),
              "ST INT8, f32 float parts": (st_xml, {"INFERENCE_PRECISION_HINT": "f32"}),
              "ST INT8, plugin default (what ST runs)": (st_xml, {})}
    reqs = {k: core.compile_model(str(x), "CPU", {**base, **cfg}).create_infer_request()
            for k, (x, cfg) in graphs.items()}
    rng = np.random.default_rng(0)
    print("| batch x tokens | " + " | ".join(f"{k} ms" for k in reqs) + " | ours / ST (f32) |")
    print("|---|" + "---|" * (len(reqs) + 1))
    for b, n in ((32, 256), (32, 128), (16, 64), (64, 16), (1, 16)):
        ids = rng.integers(1000, 20000, (b, n))
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feeds = {k: {**feed, **({"token_type_ids": np.zeros_like(ids)} if "ST" in k else {})} for k in reqs}
        for k, r in reqs.items():
            r.infer(feeds[k])
        times: dict[str, list[float]] = defaultdict(list)
        for _ in range(rounds * (2 if n > 100 else 8)):  # interleaved
            for k, r in reqs.items():
                t = time.perf_counter()
                r.infer(feeds[k])
                times[k].append(time.perf_counter() - t)
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        keys = list(reqs)
        print(f"| {b} x {n} | " + " | ".join(f"{med[k]:.2f}" for k in keys) + f" | {med[keys[0]] / med[keys[1]]:.2f} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--sections", nargs="+", default=["hints", "shapes", "profile", "peer"],
                    choices=["hints", "shapes", "profile", "peer"])
    a = ap.parse_args()
    _ensure_artifacts()
    import onnxruntime
    import openvino

    texts, queries = load_corpus(a.texts, a.queries)
    cpu = cpu_info()
    print(f"# OpenVINO backend settings: all-MiniLM-L6-v2, {len(texts)} texts, {len(queries)} queries, {a.rounds} "
          f"interleaved rounds\n\n{cpu['cpu']} ({cpu['logical_cpus']} CPUs; {' '.join(cpu['isa'])}); Python "
          f"{platform.python_version()}, openvino {openvino.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, load average {os.getloadavg()[0]:.2f}\n")
    if "hints" in a.sections:
        hints(texts, queries, a.rounds)
    if "shapes" in a.sections:
        shapes(texts, a.rounds)
    if "profile" in a.sections:
        profile(texts)
    if "peer" in a.sections:
        peer_graph(a.rounds)


if __name__ == "__main__":
    main()
