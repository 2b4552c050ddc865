"""What `python -m bench` measures on: the texts, their token counts, and a record of the machine.

The corpus is SciFact (``bench/data/scifact``, MTEB protocol) documents and queries interleaved, so lengths
run from ~8 to the 256-token cap (every system truncates at 256, the model's max_seq_length); token counts are
the real (unpadded, truncated) counts from the model's own tokenizer.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.retrieval import SCIFACT

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"
MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length and the MTEB protocol's; every system truncates here
MTEB_SCIFACT_MINILM = 64.51  # published MTEB nDCG@10 of all-MiniLM-L6-v2 on SciFact


def load_corpus(n_texts: int, n_queries: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(mixed corpus of ``n_texts`` texts, ``n_queries`` short queries for the latency test).

    The corpus repeats three kinds of text in input order, as a real stream mixes them: a SciFact query (8-40
    tokens; once half the queries are used, a 8-30-word document prefix instead), a whole document (truncated
    at 256 tokens by every system) and a document prefix of 8-200 words (a passage chunk). So lengths spread
    over 8-256 tokens instead of piling up at the cap. The latency queries are the other half of the queries
    (the end of the file), so they are not in the corpus.
    """
    import random

    from bench.retrieval import load_task

    task = load_task(SCIFACT)
    rng = random.Random(seed)
    queries, docs = task.queries, task.docs
    in_corpus = queries[: len(queries) // 2]
    corpus: list[str] = []
    qi = di = 0
    while len(corpus) < n_texts:
        slot = len(corpus) % 3
        if slot == 0 and qi < len(in_corpus):
            corpus.append(in_corpus[qi])
            qi += 1
            continue
        words = docs[di % len(docs)].split()
        di += 1
        if slot == 1:
            corpus.append(" ".join(words))
        else:
            k = rng.randint(8, 30) if slot == 0 else rng.randint(8, 200)
            corpus.append(" ".join(words[:k]))
    latency = queries[len(queries) // 2:][::-1]
    return corpus, (latency * (n_queries // max(1, len(latency)) + 1))[:n_queries]


def token_counts(tokenizer_json: Path, texts: list[str], max_length: int = MAX_LENGTH) -> list[int]:
    """Real token counts (special tokens included, truncated at ``max_length``) with the model's tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    return [min(len(e.ids), max_length) for e in tok.encode_batch(texts)]


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("cpu family", "model\t")) and ":" in line:
                key = "family" if "family" in line else "model_number"
                flags.add(f"{key}={line.split(':', 1)[1].strip()}")
            elif line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
    fam = next((f.split("=", 1)[1] for f in flags if f.startswith("family=")), "?")
    return {"cpu": model, "cpu_family": fam, "isa": [f for f in wanted if f in flags],
            "logical_cpus": os.cpu_count(), "memory_gib": _mem_gib()}


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("bge-edge", "onnxruntime", "tokenizers", "numpy", "torch", "transformers", "sentence-transformers",
                 "optimum", "optimum-onnx", "optimum-intel", "openvino", "nncf", "fastembed", "matplotlib"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "runtime", "bge_edge", "kernels", "export"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "OV_", "ORT_"))}
    return {**cpu_info(), "hostname": platform.node(), "kernel": platform.release(), "versions": versions(),
            "git": git_state(), "env": env}
