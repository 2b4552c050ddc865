"""Long documents on BGE-M3: the flash-attention branch vs the plain fused Attention, time and peak RSS.

    python -m bench.longdoc ARTIFACT [--lengths 512 2048 8192] [--precisions fp32 int8] [--threads N]

ARTIFACT is a BGE-M3 export (e.g. a full-shape random one: ``python -m bench.longdoc --build``
runs ``python -m bench.prepare src-m3`` and ``edge-m3`` first: bench/.cache/artifacts/bge-m3-random, ~10 min,
~16 GB RAM).
Each cell runs in a fresh process: load the graph, run one document of L tokens with all three
outputs, report wall time of that run and the process's peak RSS (model included).
  flash  the graph as exported, fed the document unpadded (what the runtime does for L > 512)
  plain  the same graph fed one extra masked padding column: the fused Attention with its L x L scores
  nowrap a copy of the graph with every If replaced by its plain branch (the pre-flash export), unpadded
The last table checks that the If costs nothing on short padded batches (8 x 128 tokens, median of 5).
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CELL = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
path, mode, L, threads, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.enable_mem_pattern = False
so.add_session_config_entry("session.intra_op.allow_spinning", "0"); so.log_severity_level = 3
def hwm():  # own peak RSS in MB (ru_maxrss would start at the parent's, inherited at fork)
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM:")).split()[1]) / 1024
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
load_rss = hwm()
ids = np.random.default_rng(0).integers(5, 250, (batch, L)); ids[:, 0] = 0; ids[:, -1] = 2
mask = np.ones_like(ids)
if mode == "plain":
    ids = np.concatenate([ids, np.ones((batch, 1), ids.dtype)], axis=1)
    mask = np.concatenate([mask, np.zeros((batch, 1), mask.dtype)], axis=1)
times = []
for _ in range(int(sys.argv[6])):
    t = time.perf_counter()
    sess.run(["dense", "sparse", "colbert"], {"input_ids": ids, "attention_mask": mask})
    times.append(time.perf_counter() - t)
print(json.dumps({"load_rss_mb": load_rss, "peak_rss_mb": hwm(),
                  "times": times}))
"""


def unwrapped_copy(graph_path: Path, work: Path) -> Path:
    """The graph with every If replaced by its else (plain Attention) branch, beside links to its data files."""
    import onnx
    from bge_edge.export.longattn import remove_linear_attention

    model = onnx.load(str(graph_path), load_external_data=False)
    if remove_linear_attention(model) == 0:
        raise SystemExit(f"{graph_path} has no linear-attention branch to remove; export it with this bge-edge")
    for f in graph_path.parent.iterdir():
        if f.name.startswith(graph_path.name + ".") and f.suffix == ".data":
            try:  # ORT refuses external data behind a symlink; a hard link costs no space
                os.link(f, work / f.name)
            except OSError:
                shutil.copyfile(f, work / f.name)
    out = work / graph_path.name
    onnx.save_model(model, str(out))
    return out


def cell(path: Path, mode: str, length: int, threads: int, batch: int = 1, repeat: int = 1) -> dict:
    r = subprocess.run([sys.executable, "-c", _CELL, str(path), mode, str(length), str(threads), str(batch),
                        str(repeat)], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:120],
                "returncode": r.returncode}
    return json.loads(r.stdout.strip().splitlines()[-1])


def build_full_m3() -> Path:
    """The bench's full-shape random BGE-M3 export (``python -m bench.prepare src-m3`` then ``edge-m3``)."""
    from bench import prepare as prep

    for step in ("src-m3", "edge-m3"):
        subprocess.run([sys.executable, "-m", "bench.prepare", step], cwd=ROOT, check=True)
    return prep.M3_EDGE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", type=Path, default=ROOT / "bench/.cache/artifacts/bge-m3-random")
    ap.add_argument("--build", action="store_true", help="build and export the full-shape random BGE-M3 first")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    ap.add_argument("--modes", nargs="+", default=["flash", "plain", "nowrap"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    art = build_full_m3() if a.build else a.artifact
    import onnxruntime
    from bge_edge.runtime.manifest import read_manifest

    man = read_manifest(art)
    print(f"# Long documents: {man.source.get('model_id')} (hidden {man.hidden_size}, {man.attention_heads} heads)")
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}, onnxruntime "
          f"{onnxruntime.__version__}, intra-op threads {a.threads}; one process per cell; peak RSS includes "
          f"the model\n")
    rows, results = [], []
    with tempfile.TemporaryDirectory(dir=art.parent) as tmp:  # same filesystem: hard links work
        for prec in a.precisions:
            g = man.graph(prec)
            path = art / g.file
            nowrap = None
            if "nowrap" in a.modes:
                (Path(tmp) / prec).mkdir()
                nowrap = unwrapped_copy(path, Path(tmp) / prec)
            for L in a.lengths:
                for mode in a.modes:
                    p = nowrap if mode == "nowrap" else path
                    assert p is not None
                    r = cell(p, "flash" if mode == "nowrap" else mode, L, a.threads)
                    results.append({"precision": prec, "length": L, "mode": mode, **r})
                    if "error" in r:
                        rows.append(f"| {prec} | {L:,} | {mode} | failed: {r['error']} | | |")
                    else:
                        rows.append(f"| {prec} | {L:,} | {mode} | {r['times'][0]:.2f} | {r['peak_rss_mb']:,.0f} | "
                                    f"{r['peak_rss_mb'] - r['load_rss_mb']:,.0f} |")
                    print(rows[-1], flush=True)
            if nowrap is not None:
                medians: dict[str, list[float]] = {"flash": [], "nowrap": []}
                for _ in range(3):  # alternate the two graphs: single runs differ by as much as the effect
                    for m in medians:  # 127 tokens + 1 masked column: a padded batch, the plain branch
                        r = cell(nowrap if m == "nowrap" else path, "plain", 127, a.threads, batch=8, repeat=6)
                        if "error" not in r:
                            medians[m].append(statistics.median(r["times"][1:]) * 1000)
                for m, v in medians.items():
                    if v:
                        results.append({"precision": prec, "short_batch": "8x128", "graph": m, "median_ms": v})
                        print(f"short padded batch 8x128, {prec}, {'with If' if m == 'flash' else 'no If'}: "
                              f"{' / '.join(f'{x:.0f}' for x in v)} ms (median of 5 runs, 3 alternating rounds)",
                              flush=True)
    print("\n| precision | tokens | path | time s | peak RSS MB | RSS over load MB |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    out = a.json or ROOT / "bench/results" / f"longdoc-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"artifact": str(art), "threads": a.threads, "results": results}, indent=1))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
