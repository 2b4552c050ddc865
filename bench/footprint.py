"""What `pip install bge-edge` (the runtime, no extras) really installs: every distribution and its size on disk.

    python -m bench.footprint            # prints the table and writes bench/results/footprint.md

Builds this checkout into a fresh virtual environment (network to PyPI, or a warm pip cache), then reads each
installed distribution's RECORD to add up its files. ``resolve_runtime()`` is the cheap half (pip's resolver,
nothing installed) that the tests compare with the README's list.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TOOLING = {"pip", "setuptools", "wheel"}  # what a fresh venv brings before bge-edge, not part of its footprint


def resolve_runtime() -> list[str]:
    """Names (lower case) of the distributions `pip install <this checkout>` would install into an empty venv."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), str(REPO)], check=True, capture_output=True, text=True)
        items = json.loads(report.read_text())["install"]
    return sorted(i["metadata"]["name"].lower().replace("_", "-") for i in items)


def measure() -> tuple[list[tuple[str, str, int]], float]:
    """[(name, version, bytes on disk)] of a fresh runtime install, and the install's wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        py = venv / "bin" / "python"
        t = time.perf_counter()
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(REPO)], check=True)
        took = time.perf_counter() - t
        code = ("import importlib.metadata as m, json, os\n"
                "out = []\n"
                "for d in m.distributions():\n"
                "    size = 0\n"
                "    for f in d.files or []:\n"
                "        p = d.locate_file(f)\n"
                "        size += os.path.getsize(p) if os.path.isfile(p) else 0\n"
                "    out.append((d.metadata['Name'].lower().replace('_', '-'), d.version, size))\n"
                "print(json.dumps(out))\n")
        rows = json.loads(subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True,
                                         cwd=tmp).stdout)  # not the checkout: its egg-info would count twice
    return sorted((r for r in rows if r[0] not in TOOLING), key=lambda r: -r[2]), took


def main() -> None:
    rows, took = measure()
    total = sum(r[2] for r in rows)
    lines = ["# Runtime install footprint (`pip install bge-edge`, no extras)", "",
             f"- **Machine**: {platform.machine()}, {platform.system()} {platform.release()}; "
             f"Python {platform.python_version()}; measured {time.strftime('%Y-%m-%d')}",
             f"- **Install**: {took:.0f} s into a fresh venv (from PyPI or the pip cache); pip/setuptools/wheel "
             f"not counted",
             f"- **Total**: {len(rows)} distributions, {total / 1e6:.0f} MB on disk", "",
             "| distribution | version | MB on disk |", "|---|---|---|"]
    lines += [f"| {n} | {v} | {b / 1e6:.1f} |" for n, v, b in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "footprint.md").write_text(text)


if __name__ == "__main__":
    main()
