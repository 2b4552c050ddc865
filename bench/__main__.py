"""bge-edge against the runtimes users would pick instead: one command, one table, one chart.

    bash bench/setup_peers.sh                         # once: .venv-bench with the peers (the [bench] extra)
    .venv-bench/bin/python -m bench --quick           # development check, < 3 minutes
    .venv-bench/bin/python -m bench                   # full: 3 interleaved rounds, with full-shape BGE-M3
    .venv-bench/bin/python -m bench --accuracy        # also SciFact nDCG@10 per system (slow; cached in bench/.cache)

Every system runs in its own fresh process (``bench/systems.py``), interleaved A B C ... A B C over the rounds;
the tables give medians over rounds and ratios computed round by round (same round, neighbouring runs) within
this one run. Models are made offline by ``bench/prepare.py`` (exports, quantisations) the first time.
Writes bench/results/<UTC time>-<host>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import prepare as prep
from bench import report
from bench.workload import CACHE, MAX_LENGTH, MTEB_SCIFACT_MINILM, REPO, RESULTS, SCIFACT, load_corpus, machine

WORKER_TIMEOUT_S = 1800  # one worker: a full SciFact encode with torch FP32 takes minutes on 2 cores


@dataclass(frozen=True)
class System:
    name: str  # unique; group + "/" + key
    label: str
    group: str  # "minilm" (real all-MiniLM-L6-v2) or "bge-small-random" (full shape, random weights)
    kind: str  # a loader in bench/systems.py
    params: dict[str, Any]
    precision: str
    needs: tuple[str, ...] = ()  # prepare steps
    fp32_ref: str | None = None  # the same system's FP32 (cosine reference)
    accuracy: bool = True  # run SciFact for it under --accuracy (twins with identical outputs are skipped)
    long: bool = False  # also time one long document per --long-lengths (BGE-M3 group)
    notes: list[str] = field(default_factory=list)


def systems() -> list[System]:
    m_edge, b_edge = str(prep.MINILM_EDGE), str(prep.BGE_SMALL_EDGE)
    st = str(prep.ST_MINILM)
    L = MAX_LENGTH
    out = []
    for prec in ("int8", "fp32"):
        for sort in (True, False):
            key = f"edge-{prec}" + ("" if sort else "-unsorted")
            out.append(System(
                f"minilm/{key}", f"bge-edge ORT {prec.upper()}" + ("" if sort else " (input order)"), "minilm",
                "edge", {"artifact": m_edge, "precision": prec, "sort": sort, "max_length": L}, prec,
                ("edge-minilm",), None if prec == "fp32" else "minilm/edge-fp32", accuracy=sort))
    m_ov = str(prep.MINILM_EDGE_OV)
    for prec, streams, shapes in (("int8", 1, "dynamic"), ("int8", 2, "dynamic"), ("int8", 1, "bucket"),
                                  ("fp16", 1, "dynamic"), ("fp32", 1, "dynamic")):
        key = f"edge-ov-{prec}" + ("" if streams == 1 else f"-{streams}streams") + \
            ("" if shapes == "dynamic" else f"-{shapes}")
        what = {"int8": "INT8", "fp16": "FP16 (OV default precision)", "fp32": "FP32 (f32 execution)"}[prec]
        what += "" if streams == 1 else f", {streams} streams"
        what += "" if shapes == "dynamic" else ', shapes="bucket", warm (after one untimed corpus pass)'
        params = {"artifact": m_ov, "precision": prec, "backend": "openvino", "streams": streams, "max_length": L}
        if shapes != "dynamic":
            params.update(shapes=shapes, warm_corpus=True)
        out.append(System(
            f"minilm/{key}", f"bge-edge OpenVINO {what}", "minilm", "edge", params,
            prec, ("edge-minilm", "edge-minilm-ov"), None if prec == "fp32" else "minilm/edge-fp32",
            accuracy=streams == 1 and shapes == "dynamic"))
    out += [
        System("minilm/ort-naive-int8", "plain onnxruntime, same INT8 graph (input order, batch 32)", "minilm",
               "naive", {"graph": m_edge + "/model.int8.onnx", "tokenizer": m_edge + "/tokenizer.json",
                         "max_length": L, "batch_size": 32}, "int8", ("edge-minilm",), "minilm/edge-fp32",
               accuracy=False),
        System("minilm/st-torch-fp32", "sentence-transformers torch FP32", "minilm", "st",
               {"model": str(prep.minilm_source()), "backend": "torch", "max_length": L}, "fp32"),
        System("minilm/st-onnx-fp32", "sentence-transformers onnx FP32", "minilm", "st",
               {"model": st, "backend": "onnx", "max_length": L}, "fp32", ("st-onnx",), "minilm/st-torch-fp32"),
        System("minilm/st-onnx-int8", "sentence-transformers onnx INT8 (its dynamic qint8 avx512_vnni)", "minilm",
               "st", {"model": st, "backend": "onnx", "max_length": L,
                      "model_kwargs": {"file_name": prep.ST_ONNX_INT8}},
               "int8", ("st-onnx", "st-onnx-int8"), "minilm/st-onnx-fp32"),
        System("minilm/st-openvino", "sentence-transformers openvino (FP32 IR, OV default precision)", "minilm", "st",
               {"model": st, "backend": "openvino", "max_length": L}, "fp32 IR", ("st-openvino",),
               "minilm/st-torch-fp32"),
        System("minilm/st-openvino-int8", "sentence-transformers openvino INT8 (static, NNCF)", "minilm", "st",
               {"model": st, "backend": "openvino", "max_length": L, "model_kwargs": {"file_name": prep.ST_OV_INT8}},
               "int8", ("st-openvino", "st-openvino-int8"), "minilm/st-openvino"),
        System("minilm/fastembed-fp32", "fastembed (local folder, ST's ONNX FP32 graph)", "minilm", "fastembed",
               {"folder": str(prep.FASTEMBED_MINILM), "model_name": "local/all-MiniLM-L6-v2", "dim": 384,
                "model_file": "onnx/model.onnx", "cache_dir": str(CACHE / "fastembed-cache")}, "fp32",
               ("st-onnx", "fastembed"), "minilm/st-torch-fp32"),
    ]
    for prec in ("int8", "fp32"):
        out.append(System(f"bge-small-random/edge-{prec}", f"bge-edge ORT {prec.upper()}", "bge-small-random", "edge",
                          {"artifact": b_edge, "precision": prec, "sort": True, "max_length": L}, prec,
                          ("src-bge-small", "edge-bge-small"),
                          None if prec == "fp32" else "bge-small-random/edge-fp32", accuracy=False))
    out.append(System("bge-small-random/st-torch-fp32", "sentence-transformers torch FP32", "bge-small-random", "st",
                      {"model": str(prep.BGE_SMALL_SRC), "backend": "torch", "max_length": L}, "fp32",
                      ("src-bge-small",), None, accuracy=False))
    m3, m3_src = str(prep.M3_EDGE), str(prep.M3_SRC)
    m3_needs = ("src-m3", "edge-m3")
    for prec in ("int8", "fp32"):
        for heads in ("dense", "all"):
            what = "dense" if heads == "dense" else "dense + sparse + ColBERT"
            out.append(System(f"{M3}/edge-{prec}" + ("" if heads == "dense" else "-all"),
                              f"bge-edge ORT {prec.upper()}, {what}", M3, "edge",
                              {"artifact": m3, "precision": prec, "sort": True, "max_length": L, "heads": heads},
                              prec, m3_needs, None if prec == "fp32" else f"{M3}/edge-fp32", accuracy=False,
                              long=heads == "all"))
    out += [System(f"{M3}/flag-fp32" + ("" if heads == "dense" else "-all"),
                   "FlagEmbedding BGEM3FlagModel FP32, " + ("dense" if heads == "dense" else
                                                            "dense + sparse + ColBERT"),
                   M3, "flag", {"model": m3_src, "max_length": L, "heads": heads}, "fp32", ("src-m3",),
                   None, accuracy=False, long=heads == "all") for heads in ("dense", "all")]
    out.append(System(f"{M3}/st-torch-fp32", "sentence-transformers torch FP32 (dense)", M3, "st",
                      {"model": m3_src, "backend": "torch", "max_length": L}, "fp32", ("src-m3",), None,
                      accuracy=False))
    return out


M3 = "bge-m3-random"
GROUP_TOKENIZER = {"minilm": prep.MINILM_EDGE / "tokenizer.json",
                   "bge-small-random": prep.BGE_SMALL_EDGE / "tokenizer.json", M3: prep.M3_EDGE / "tokenizer.json"}
# Groups on slower models run on the first 1/k of the corpus and of the latency queries (at least 10 of each):
# full-shape BGE-M3 costs ~30x MiniLM per token (INT8), FlagEmbedding ~80x.
GROUP_SHARE = {M3: 10}
LONG_LENGTHS = (512, 2048, 8192)


def group_limit(group: str, n_texts: int, n_queries: int) -> tuple[int, int]:
    k = GROUP_SHARE.get(group, 1)
    return (n_texts, n_queries) if k == 1 else (max(10, n_texts // k), max(10, n_queries // k))


def long_document(n_tokens: int) -> str:
    """SciFact abstracts joined until the BGE-M3 tokenizer counts over ``n_tokens`` (each system cuts it there)."""
    from tokenizers import Tokenizer

    from bench.retrieval import load_task

    tok = Tokenizer.from_file(str(GROUP_TOKENIZER[M3]))
    docs, parts, have = load_task(SCIFACT).docs, [], 0
    for d in docs:
        parts.append(d)
        have += len(tok.encode(d, add_special_tokens=False).ids)
        if have > n_tokens + 64:
            break
    return "\n\n".join(parts)


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="true",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_worker(spec: dict[str, Any], spec_path: Path, timeout: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    spec = dict(spec, t_spawn=time.time())
    spec_path.write_text(json.dumps(spec))
    try:
        r = subprocess.run([sys.executable, "-m", "bench.systems", str(spec_path)], cwd=REPO, env=worker_env(),
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT "):])
    tail = [x for x in (r.stderr or r.stdout).strip().splitlines() if x.strip()][-3:]
    return {"error": f"exit {r.returncode}: " + " | ".join(t.strip()[:200] for t in tail)}


def run_prepare(steps: list[str], log: list[str]) -> dict[str, Any]:
    status = prep.read_status()
    for step in steps:
        if status.get(step, {}).get("ok"):
            continue
        print(f"  prepare {step} ...", flush=True)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "bench.prepare", step], cwd=REPO, env=worker_env(),
                           capture_output=True, text=True)
        status = prep.read_status()
        ok = status.get(step, {}).get("ok", False)
        msg = f"prepare {step}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t:.0f} s"
        if not ok:
            msg += " - " + status.get(step, {}).get("why", (r.stderr or "").strip()[-300:])
        print("  " + msg, flush=True)
        log.append(msg)
    return status


def fingerprint(s: System) -> str:
    """Changes when the system's files, its spec or the packages change (the SciFact cache key)."""
    parts = [json.dumps(s.params, sort_keys=True), json.dumps(machine()["versions"], sort_keys=True)]
    for v in s.params.values():
        p = Path(str(v))
        for f in ([p] if p.is_file() else [p / "manifest.json", p / "modules.json"] if p.is_dir() else []):
            if f.is_file():
                st = f.stat()
                parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def scifact(s: System, work: Path) -> dict[str, Any]:
    """SciFact nDCG@10 of one system (encodings cached under bench/.cache/scifact)."""
    import numpy as np

    from bench.retrieval import load_task, ndcg_at_k, rank

    out = CACHE / "scifact" / f"{s.name.replace('/', '-')}-{fingerprint(s)}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {"cached": out.is_file()}
    if not out.is_file():
        r = run_worker({"task": "scifact", "kind": s.kind, "params": s.params, "scifact": str(SCIFACT),
                        "out": str(out)}, work / "scifact-spec.json")
        if "error" in r:
            return r
        rec["encode_s"] = r["encode_s"]
    z = np.load(out)
    task = load_task(SCIFACT)
    rec["ndcg10"] = ndcg_at_k(task, rank(z["queries"], z["docs"], 10), 10)
    return rec


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="development run (< 3 min): 100 texts, 30 queries, 2 rounds")
    ap.add_argument("--accuracy", action="store_true", help="also SciFact nDCG@10 per system (slow, cached)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 2)")
    ap.add_argument("--texts", type=int, help="corpus size (default 1000, quick 100)")
    ap.add_argument("--queries", type=int, help="batch-1 latency queries (default 300, quick 30)")
    ap.add_argument("--idle", type=float, help="seconds of idle-CPU measurement (default 3, quick 0.5)")
    ap.add_argument("--systems", nargs="*", default=["*"], help="glob(s) over system names, e.g. 'minilm/*'")
    ap.add_argument("--m3", action=argparse.BooleanOptionalAction, default=None,
                    help=f"the full-shape random BGE-M3 group ({M3}/*; default: on in the full mode, off with "
                         "--quick); the first run builds and exports it (~10 min, ~16 GB RAM)")
    ap.add_argument("--long-lengths", type=int, nargs="*", default=None, metavar="TOKENS",
                    help=f"BGE-M3 long-document lengths (default {' '.join(map(str, LONG_LENGTHS))}; none with "
                         "--quick)")
    ap.add_argument("--list", action="store_true", help="list the systems and exit")
    ap.add_argument("--report", type=Path, metavar="JSON", help="re-write the .md and .png of a saved record and exit")
    a = ap.parse_args(argv)
    if a.report:
        record = json.loads(a.report.read_text())
        md = report.markdown(record, report.chart(record, a.report.with_suffix(".png")))
        a.report.with_suffix(".md").write_text(md)
        print(md)
        return 0
    rounds = a.rounds or (2 if a.quick else 3)
    n_texts = a.texts or (100 if a.quick else 1000)
    n_queries = a.queries or (30 if a.quick else 300)
    idle_s = a.idle if a.idle is not None else (0.5 if a.quick else 3.0)
    if a.long_lengths and min(a.long_lengths) < 2:
        ap.error(f"--long-lengths must be token counts >= 2, got {a.long_lengths}")
    with_m3 = (not a.quick) if a.m3 is None else a.m3
    long_lengths = list(a.long_lengths if a.long_lengths is not None else ([] if a.quick else LONG_LENGTHS))
    chosen = [s for s in systems() if any(fnmatch.fnmatch(s.name, g) for g in a.systems)
              and (with_m3 or s.group != M3)]
    if a.list:
        for s in chosen:
            print(f"{s.name:34s} {s.label}")
        return 0

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    host = platform.node() or "host"
    work = CACHE / "run"
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    t_run = time.perf_counter()
    print(f"bench: {len(chosen)} systems x {rounds} rounds, {n_texts} texts, {n_queries} queries; "
          f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)

    log: list[str] = []
    steps = list(dict.fromkeys(st for s in chosen for st in s.needs))
    status = run_prepare(steps, log)
    skipped: dict[str, str] = {}
    runnable = []
    for s in chosen:
        bad = [st for st in s.needs if not status.get(st, {}).get("ok")]
        if bad:
            skipped[s.name] = "; ".join(f"{st}: {status.get(st, {}).get('why', 'not prepared')}" for st in bad)
        else:
            runnable.append(s)

    corpus, queries = load_corpus(n_texts, n_queries)
    (work / "corpus.json").write_text(json.dumps(corpus))
    (work / "queries.json").write_text(json.dumps(queries))
    from bench.workload import token_counts

    limits = {g: group_limit(g, n_texts, n_queries) for g in GROUP_TOKENIZER}
    tokens = {g: token_counts(p, corpus[: limits[g][0]]) for g, p in GROUP_TOKENIZER.items()
              if p.is_file() and any(s.group == g for s in runnable)}

    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in runnable}
    for r in range(rounds):
        for s in runnable:
            if runs[s.name] and "error" in runs[s.name][0]:
                continue  # failed in round 1: do not retry
            emb = work / f"emb-{s.name.replace('/', '-')}.npy"
            spec = {"task": "speed", "kind": s.kind, "params": s.params, "corpus": str(work / "corpus.json"),
                    "queries": str(work / "queries.json"), "idle_s": idle_s,
                    "save_embeddings": str(emb) if r == 0 else None,
                    "limit": limits[s.group] if limits[s.group] != (n_texts, n_queries) else None}
            rec = run_worker(spec, work / "spec.json")
            rec["round"] = r
            runs[s.name].append(rec)
            if "error" in rec:
                print(f"  round {r + 1} {s.name:32s} FAILED {rec['error'][:300]}", flush=True)
            else:
                ntok = sum(tokens[s.group])
                print(f"  round {r + 1} {s.name:32s} {ntok / rec['corpus_s']:9,.0f} tok/s  "
                      f"p50 {median(rec['latency_ms']):6.2f} ms  start {rec['startup_s']:5.2f} s  "
                      f"rss {rec['peak_rss_mb']:6.0f} MB  idle {rec['idle_cpu_pct']:4.1f} %", flush=True)

    longdoc: dict[str, list[dict[str, Any]]] = {}
    long_systems = [s for s in runnable if s.long and runs[s.name] and "error" not in runs[s.name][0]]
    if long_lengths and long_systems:
        doc = work / "longdoc.txt"
        doc.write_text(long_document(max(long_lengths)), encoding="utf-8")
        for n in long_lengths:  # one fresh process per (system, length), lengths outermost
            for s in long_systems:
                rec = run_worker({"task": "longdoc", "kind": s.kind, "params": s.params, "doc": str(doc),
                                  "length": n}, work / "spec.json")
                longdoc.setdefault(s.name, []).append(rec)
                print(f"  long {n:6d} tokens {s.name:32s} " + (f"FAILED {rec['error'][:200]}" if "error" in rec else
                      f"{rec['seconds']:7.2f} s  peak RSS {rec['peak_rss_mb']:6.0f} MB"), flush=True)

    accuracy: dict[str, Any] = {}
    if a.accuracy:
        for s in runnable:
            if s.group == "minilm" and s.accuracy and runs[s.name] and "error" not in runs[s.name][0]:
                print(f"  SciFact {s.name} ...", flush=True)
                accuracy[s.name] = scifact(s, work)
                print(f"    {accuracy[s.name]}", flush=True)

    load_end = os.getloadavg()
    record = {
        "stamp": stamp, "host": host, "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        "machine": machine(), "loadavg_start": load_start, "loadavg_end": load_end,
        "wall_s": time.perf_counter() - t_run, "rounds": rounds, "n_texts": n_texts, "n_queries": n_queries,
        "idle_s": idle_s, "max_length": MAX_LENGTH, "mteb_scifact": MTEB_SCIFACT_MINILM, "prepare": status,
        "prepare_log": log, "skipped": skipped, "tokens": tokens,
        "group_limits": {g: list(limits[g]) for g in tokens}, "longdoc": longdoc,
        "systems": [{"name": s.name, "label": s.label, "group": s.group, "kind": s.kind, "precision": s.precision,
                     "fp32_ref": s.fp32_ref, "params": s.params, "needs": list(s.needs)} for s in chosen],
        "runs": runs, "accuracy": accuracy,
    }
    record["cosine"] = report.cosines(record, work)
    base = RESULTS / f"{stamp}-{host}"
    base.with_suffix(".json").write_text(json.dumps(record, indent=1))
    chart = report.chart(record, base.with_suffix(".png"))
    md = report.markdown(record, chart)
    base.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {base}.md, .json" + (", .png" if chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
