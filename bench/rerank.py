"""Rerankers: re-rank the top 100 SciFact passages per query with a random reranker of a real shape.

    python -m bench.rerank                       # bge-reranker-v2-m3 shape (24 x 1024, vocab 250,002)
    python -m bench.rerank --shape base          # bge-reranker-base shape (12 x 768, vocab 250,002)
    python -m bench.rerank --shape tiny          # a 2-layer model: checks the script in a minute

For each query, its 100 candidates are the top 100 SciFact documents by TF-IDF, so the pairs have the lengths a
real re-ranking step sees (the random model's tokenizer is trained on SciFact, 8,000 pieces). Every system scores
the same pairs with FlagReranker's truncation at 512 tokens, one query (100 pairs) per call. Each system runs in a
fresh process with the same thread count: load, a warm-up (16 pairs of another query), then the timed queries;
pairs/s over all of them and per-query latency p50/p99.
Systems (those whose packages are missing are listed as not run):
  edge-int8 / edge-fp32          bge-edge Reranker, ONNX Runtime
  edge-ov-int8 / edge-ov-fp32    bge-edge Reranker, OpenVINO (same artifact, or --openvino-artifact)
  flag-fp32                      FlagEmbedding's FlagReranker (torch fp32), from the peers' venv (.venv-bench)
  torch-fp32                     FlagReranker's math in transformers/torch fp32 (tests/reference_reranker.py's
                                 truncation, length-sorted batches): stands in when FlagEmbedding is missing
  st-torch / st-onnx / st-openvino   sentence-transformers CrossEncoder backends, from the peers' venv
Rank agreement: INT8 vs FP32 of the same backend per query, top-10 overlap and Spearman over the 100 passages
(random weights: scores of a random model are nearly flat, so this is an upper bound of the disagreement a trained
model would show only if its score gaps were as small; it is reported, not a quality claim).
The export (fp32 + int8, ONNX + OpenVINO) runs in a child process with an RSS watchdog (--max-export-gb): past it
the export is stopped and the record says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench.workload import CACHE, REPO, RESULTS, SCIFACT, machine

MAX_LENGTH = 512  # FlagReranker's default max_length
PEERS_PYTHON = REPO / ".venv-bench" / "bin" / "python"
EDGE = ("edge-int8", "edge-fp32", "edge-ov-int8", "edge-ov-fp32")
PEERS = ("flag-fp32", "st-torch", "st-onnx", "st-openvino")


# ---- the workload ---------------------------------------------------------------------------------


def _terms(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def candidates(n_queries: int, top: int = 100) -> list[tuple[str, list[str]]]:
    """(query, its top ``top`` SciFact documents by TF-IDF), for the first ``n_queries`` SciFact test queries."""
    from bench.retrieval import load_task

    task = load_task(SCIFACT)
    docs = [Counter(_terms(d)) for d in task.docs]
    df: Counter[str] = Counter()
    for d in docs:
        df.update(d.keys())
    idf = {t: math.log(len(docs) / n) for t, n in df.items()}
    out = []
    for q in task.queries[:n_queries]:
        qt = set(_terms(q))
        scores = np.array([sum((1 + math.log(d[t])) * idf[t] for t in qt if t in d) for d in docs])
        best = np.argsort(-scores, kind="stable")[:top]
        out.append((q, [task.docs[i] for i in best]))
    return out


# ---- one system in its own process ----------------------------------------------------------------


def _scorer(system: str, spec: dict[str, Any]) -> Any:
    """A function (query, passages) -> list of raw scores for ``system``."""
    threads = int(spec["threads"])
    if system.startswith("edge"):
        from bge_edge.runtime import Reranker

        precision = "int8" if system.endswith("int8") else "fp32"
        backend = "openvino" if "-ov-" in system else "onnxruntime"
        art = spec.get("ov_artifact", spec["artifact"]) if backend == "openvino" else spec["artifact"]
        r = Reranker(art, precision=precision, backend=backend, threads=threads)
        return lambda q, ps: r.compute_score([(q, p) for p in ps], max_length=MAX_LENGTH)
    import torch

    torch.set_num_threads(threads)
    if system == "flag-fp32":
        from FlagEmbedding import FlagReranker

        fr = FlagReranker(spec["source"], use_fp16=False, devices="cpu", batch_size=128)
        return lambda q, ps: list(fr.compute_score([(q, p) for p in ps], max_length=MAX_LENGTH))
    if system == "torch-fp32":
        return _torch_reranker(Path(spec["source"]))
    from sentence_transformers import CrossEncoder

    backend = system.split("-", 1)[1]
    kw: dict[str, Any] = {}
    if backend == "onnx":
        kw = {"model_kwargs": {"provider": "CPUExecutionProvider"}}
    ce = CrossEncoder(spec["source"], backend=backend, max_length=MAX_LENGTH, device="cpu", **kw)
    return lambda q, ps: [float(x) for x in ce.predict([(q, p) for p in ps], batch_size=128,
                                                       activation_fn=torch.nn.Identity())]


def _torch_reranker(source: Path) -> Any:
    """FlagReranker's math in torch fp32: its truncation, length-sorted batches of 128, padded per batch."""
    import torch
    import transformers

    sys.path.insert(0, str(REPO / "tests"))
    from reference_reranker import RerankerReference

    ref = RerankerReference(source)
    model = transformers.XLMRobertaForSequenceClassification.from_pretrained(str(source)).eval()
    pad = ref.tok.token_to_id("<pad>")

    def score(q: str, ps: list[str]) -> list[float]:
        ids = [ref.inputs(q, p, MAX_LENGTH) for p in ps]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.zeros(len(ids))
        with torch.no_grad():
            for s in range(0, len(ids), 128):
                idx = order[s:s + 128]
                L = max(len(ids[i]) for i in idx)
                t = torch.full((len(idx), L), pad, dtype=torch.long)
                m = torch.zeros_like(t)
                for r, i in enumerate(idx):
                    t[r, : len(ids[i])] = torch.tensor(ids[i])
                    m[r, : len(ids[i])] = 1
                out[idx] = model(input_ids=t, attention_mask=m).logits.view(-1).float().numpy()
        return [float(x) for x in out]

    return score


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def worker(system: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    work = [(q, ps) for q, ps in spec["work"]]
    t = time.perf_counter()
    score = _scorer(system, spec)
    load_s = time.perf_counter() - t
    score(work[-1][0], work[-1][1][:16])  # warm-up: 16 pairs of a query not in the timed set
    lat, scores = [], []
    for q, ps in work[:-1]:
        t = time.perf_counter()
        scores.append(score(q, ps))
        lat.append(time.perf_counter() - t)
    print(json.dumps({"system": system, "load_s": load_s, "latency_s": lat, "scores": scores, "peak_rss_mb": _rss_mb(),
                      "pairs": sum(len(ps) for _, ps in work[:-1])}))


# ---- orchestration --------------------------------------------------------------------------------


SHAPES = {"v2-m3": "FULL_RERANKER_M3", "base": "FULL_RERANKER_BASE", "tiny": "TINY_RERANKER_M3"}


def build_source(shape: str) -> tuple[Path, float]:
    src = CACHE / f"src-reranker-{shape}"
    if (src / "config.json").is_file():
        return src, 0.0
    import bge_edge.export.synthetic as syn

    from bench.retrieval import load_task

    t = time.perf_counter()
    tmp = src.with_name(src.name + ".tmp")
    task = load_task(SCIFACT)  # a tokenizer trained on SciFact: pair lengths near the real XLM-R tokenizer's
    syn.build_random_model(tmp, getattr(syn, SHAPES[shape]), seed=0, tokenizer_corpus=task.docs + task.queries)
    os.replace(tmp, src)
    return src, time.perf_counter() - t


def export(src: Path, out: Path, max_gb: float, formats: tuple[str, ...] = ("onnx", "openvino")) -> dict[str, Any]:
    """Export fp32 + int8 (``formats``) in a child process; stop it if its RSS passes ``max_gb``."""
    if (out / "manifest.json").is_file():
        return {"reused": True, **_sizes(out)}
    code = ("import sys; from bge_edge.export import export_model; "
            f"export_model({str(src)!r}, {str(out)!r}, ['fp32', 'int8'], formats={tuple(formats)!r}, force=True, "
            "min_int8_cosine=0.0)")
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    peak, since, steps = 0.0, [0.0], []  # since[0]: the peak since the previous log line (that step's own peak)
    import threading

    def read() -> None:
        assert p.stderr is not None
        for line in p.stderr:
            steps.append((round(time.perf_counter() - t, 1), round(peak / 1024, 2), round(since[0] / 1024, 2),
                          line.rstrip()))
            since[0] = 0.0
            print(line, end="", file=sys.stderr)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stopped = None
    while p.poll() is None:
        rss = _tree_rss_mb(p.pid)
        peak, since[0] = max(peak, rss), max(since[0], rss)
        if peak > max_gb * 1024:
            p.kill()
            stopped = f"stopped: RSS passed {max_gb} GB"
            break
        time.sleep(0.5)
    p.wait()
    reader.join(timeout=5)
    rec: dict[str, Any] = {"seconds": round(time.perf_counter() - t, 1), "peak_rss_gb": round(peak / 1024, 2),
                           "steps": steps[-80:]}  # (s since start, peak GB so far, peak GB of the step, line)
    if stopped or p.returncode != 0:
        rec["failed"] = stopped or f"exit code {p.returncode}"
        return rec
    return {**rec, **_sizes(out)}


def _tree_rss_mb(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return 0.0


def _sizes(out: Path) -> dict[str, Any]:
    m = json.loads((out / "manifest.json").read_text())
    def mb(g: dict[str, Any]) -> float:
        return round(sum(m["files"][f]["size"] for f in [g["file"], *g.get("external_data", [])]) / 1e6, 1)

    return {"graphs": {f"{g['format']}/{g['precision']}": mb(g) for g in m["graphs"]}}


def run_system(system: str, spec: dict[str, Any], spec_path: Path) -> dict[str, Any]:
    py = sys.executable if system.startswith("edge") or system == "torch-fp32" else str(PEERS_PYTHON)
    if not Path(py).exists():
        return {"system": system, "skipped": f"{py} missing: run bash bench/setup_peers.sh"}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(spec["threads"]),
           "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([py, "-m", "bench.rerank", "--worker", system, "--spec", str(spec_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=spec["timeout"])
    if r.returncode != 0:
        return {"system": system, "skipped": "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _overlap_spearman(a: list[float], b: list[float], k: int = 10) -> tuple[float, float]:
    a_, b_ = np.asarray(a), np.asarray(b)
    top_a, top_b = set(np.argsort(-a_, kind="stable")[:k]), set(np.argsort(-b_, kind="stable")[:k])
    ra, rb = np.argsort(np.argsort(a_)), np.argsort(np.argsort(b_))
    return len(top_a & top_b) / k, float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--shape", default="v2-m3", choices=list(SHAPES))
    p.add_argument("--queries", type=int, default=5, help="timed queries (each re-ranks --top passages)")
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--systems", nargs="+", default=[*EDGE, "flag-fp32", "torch-fp32", "st-torch", "st-onnx",
                                                    "st-openvino"])
    p.add_argument("--max-export-gb", type=float, default=10.0)
    p.add_argument("--formats", nargs="+", default=["onnx", "openvino"], choices=["onnx", "openvino"],
                   help="graph formats to export (edge-ov-* need openvino)")
    p.add_argument("--artifact", default=None,
                   help="artifact folder name under bench/.cache (default edge-reranker-SHAPE); a new name exports "
                        "afresh with the current export code, e.g. to bench a changed INT8 recipe beside an old one")
    p.add_argument("--openvino-artifact", default=None,
                   help="artifact folder name under bench/.cache that edge-ov-* read (default: --artifact's), e.g. "
                        "the first export's when a second one re-exports only --formats onnx")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per system")
    p.add_argument("--out", default=None, help="results file (default bench/results/rerank.md; tiny: not written)")
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.spec)
        return
    t0 = time.perf_counter()
    a.load_start = _loadavg()
    src, build_s = build_source(a.shape)
    art = CACHE / (a.artifact or f"edge-reranker-{a.shape}")
    exp = export(src, art, a.max_export_gb, tuple(a.formats))
    exp["source_build_s"] = round(build_s, 1)
    ov_art = CACHE / a.openvino_artifact if a.openvino_artifact else art
    spec = {"artifact": str(art), "ov_artifact": str(ov_art), "source": str(src), "queries": a.queries, "top": a.top,
            "threads": a.threads,
            "timeout": a.timeout, "work": candidates(a.queries + 1, a.top)}  # the last query is the warm-up
    spec_path = CACHE / f"rerank-spec-{a.shape}.json"
    spec_path.write_text(json.dumps(spec))
    out = Path(a.out) if a.out else (None if a.shape == "tiny" else RESULTS / "rerank.md")
    results: list[dict[str, Any]] = []

    def write() -> str:  # after every system, so a run cut short keeps what it measured
        text = report(a, exp, results, time.perf_counter() - t0)
        if out is not None:
            out.write_text(text)
            out.with_suffix(".json").write_text(json.dumps({"export": exp, "results": [
                {k: v for k, v in r.items() if k != "scores"} for r in results], "machine": machine()}, indent=1))
        return text

    for s in a.systems:
        if s.startswith("edge") and "failed" in exp:
            results.append({"system": s, "skipped": f"export {exp['failed']}"})
            continue
        if s == "torch-fp32" and "flag-fp32" in a.systems and PEERS_PYTHON.exists():
            results.append({"system": s, "skipped": "FlagReranker itself runs (flag-fp32)"})
            continue
        print(f"bench.rerank: {s} ...", file=sys.stderr, flush=True)
        try:
            results.append(run_system(s, spec, spec_path))
        except subprocess.TimeoutExpired:
            results.append({"system": s, "skipped": f"over --timeout {a.timeout} s"})
        write()
    print(write())


def _peer_versions() -> str:
    """The peers' package versions, from their own venv (it pins its own torch/transformers/sentence-transformers)."""
    if not PEERS_PYTHON.exists():
        return "(no .venv-bench)"
    code = ("import importlib.metadata as md\n"
            "for n in ['FlagEmbedding', 'sentence-transformers', 'transformers', 'torch', 'onnxruntime', 'optimum',\n"
            "          'optimum-onnx', 'optimum-intel', 'openvino']:\n"
            "    try: print(n, md.version(n))\n"
            "    except md.PackageNotFoundError: pass\n")
    r = subprocess.run([str(PEERS_PYTHON), "-c", code], capture_output=True, text=True, timeout=60)
    return ", ".join(r.stdout.split("\n")[:-1]) if r.returncode == 0 else "?"


def _loadavg() -> str:
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
    return f"{load} (1/5/15 min, {time.strftime('%H:%M UTC', time.gmtime())})"


def report(a: argparse.Namespace, exp: dict[str, Any], results: list[dict[str, Any]], seconds: float) -> str:
    m = machine()
    ran = {r["system"]: r for r in results if "skipped" not in r}
    base = next((ran[s] for s in ("flag-fp32", "torch-fp32") if s in ran), None)
    fastest_st = max((ran[s] for s in ("st-torch", "st-onnx", "st-openvino") if s in ran),
                     key=lambda r: r["pairs"] / sum(r["latency_s"]), default=None)
    lines = [f"# Rerankers: random {a.shape}-shape reranker, top {a.top} SciFact passages per query",
             "",
             f"- **Machine**: {m['cpu']}, {m['logical_cpus']} logical CPUs, ISA {' '.join(m['isa'])}"
             f"{'' if 'avx512_vnni' in m['isa'] else ' (no AVX512-VNNI: INT8 runs on AVX2)'}, {m['memory_gib']} GiB; "
             f"threads {a.threads}; git {m['git']}",
             "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v != "-"),
             f"- **Peers' versions** (.venv-bench): {_peer_versions()}",
             f"- **Workload**: {a.queries} timed queries (after a 16-pair warm-up) x {a.top} pairs, FlagReranker "
             f"truncation at {MAX_LENGTH} tokens, one query per call; each system in a fresh process. Run took "
             f"{seconds / 60:.1f} min: "
             f"`python -m bench.rerank {' '.join(sys.argv[1:])}`",
             f"- **Load average** at start {getattr(a, 'load_start', '?')}, at this write {_loadavg()}",
             f"- **Export** (fp32 + int8, {' + '.join(a.formats)}, one process): "
             + (f"stopped/failed ({exp['failed']}) after {exp.get('seconds')} s at peak RSS {exp.get('peak_rss_gb')} GB"
                if "failed" in exp else
                f"{exp.get('seconds', 'reused')} s, peak RSS {exp.get('peak_rss_gb', '?')} GB; graph sizes MB "
                f"{exp.get('graphs')}"),
             "",
             "| system | pairs/s | p50 ms/query | p99 ms/query | load s | peak RSS MB | vs FlagReranker | vs fastest "
             "CrossEncoder | top-10 overlap vs FP32 | Spearman vs FP32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['system']} | not run: {r['skipped']} | | | | | | | | |")
            continue
        lat = np.asarray(r["latency_s"])
        pps = r["pairs"] / lat.sum()
        vs_flag = f"{pps / (base['pairs'] / sum(base['latency_s'])):.2f}x" if base else "-"
        vs_st = f"{pps / (fastest_st['pairs'] / sum(fastest_st['latency_s'])):.2f}x" if fastest_st else "-"
        agree = ["", ""]
        fp32 = {"edge-int8": "edge-fp32", "edge-ov-int8": "edge-ov-fp32"}.get(r["system"])
        if fp32 in ran:
            pairs = [_overlap_spearman(x, y) for x, y in zip(ran[fp32]["scores"], r["scores"])]
            agree = [f"{np.mean([o for o, _ in pairs]):.3f}", f"{np.mean([s for _, s in pairs]):.3f}"]
        lines.append(f"| {r['system']} | {pps:.3g} | {np.percentile(lat, 50) * 1000:.0f} | "
                     f"{np.percentile(lat, 99) * 1000:.0f} | {r['load_s']:.1f} | {r['peak_rss_mb']:.0f} | {vs_flag} | "
                     f"{vs_st} | {agree[0]} | {agree[1]} |")
    lines += ["", "Rank agreement is INT8 against FP32 of the same backend; the weights are random (see the "
              "module docstring of bench/rerank.py), so it says the INT8 graph ranks like its FP32 graph, not how "
              "a trained reranker's INT8 ranks.", ""]
    return "\n".join(lines)


def demo_step(out: Path, query: str, passages: list[str], model: str | None = None,
              top_k: int = 3) -> list[tuple[int, float]]:
    """For bench/demo.py: export a reranker (``model``: hub id or folder, e.g. BAAI/bge-reranker-v2-m3; None: a
    tiny random one in the v2-m3 layout, offline) to ``out`` once, then rerank ``passages`` for ``query``;
    prints what it did and returns ``[(index, score), ...]`` best first (sigmoid scores)."""
    from bge_edge.export import TINY_RERANKER_M3, build_random_model, export_model
    from bge_edge.runtime import Reranker

    if not (out / "manifest.json").is_file():
        kw: dict[str, Any] = {}
        src: Any = model
        if src is None:
            src = build_random_model(out.parent / "src" / "tiny-bge-reranker-v2-m3", TINY_RERANKER_M3, seed=0)
            kw = {"min_int8_cosine": 0.0}
        t = time.perf_counter()
        export_model(src, out, ["fp32", "int8"], force=True, quiet=True, **kw)
        print(f"   exported reranker {src} -> {out} in {time.perf_counter() - t:.1f} s")
    r = Reranker(out)
    t = time.perf_counter()
    ranked = r.rerank(query, passages, top_k=top_k, normalize=True)
    print(f"   reranked {len(passages)} passages with {r.manifest.source['model_id']} ({r.precision}, {r.backend}) in "
          f"{(time.perf_counter() - t) * 1000:.0f} ms")
    for rank_, (i, s) in enumerate(ranked, 1):
        print(f"     {rank_}. [{s:.3f}] {passages[i][:100]}")
    return ranked


if __name__ == "__main__":
    main()
