"""Peak memory of `bge-edge serve` under concurrent requests with one huge text each (issue 17, item 3).

    python bench/serve_memory.py [ARTIFACT] [--requests 8] [--truncate] [--chars 1950000]

Without ARTIFACT it exports the tiny random BGE-M3 (8,192-token max length, XLM-R-style tokenizer) into a
temporary folder. Starts the server, reads its RSS, fires the requests at once (each body just under the default
2 MB --max-request-bytes), then reads VmHWM (peak RSS) and RSS from /proc: Linux only. Prints one JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def _mb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024)
    raise KeyError(key)


def _text(chars: int) -> str:
    rng = random.Random(0)
    words = "science protein cell gene study results patients effect treatment data model passage retrieval".split()
    out, n = [], 0
    while n < chars:
        out.append(rng.choice(words))
        n += len(out[-1]) + 1
    return " ".join(out)[:chars]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--truncate", action="store_true")
    ap.add_argument("--chars", type=int, default=1_950_000)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bge-edge-serve-memory-"))
    art = a.artifact
    if art is None:
        from bge_edge.export import TINY_M3, build_random_model, export_model

        src = build_random_model(work / "src", TINY_M3, seed=0)
        art = str(export_model(src, work / "m3", ["fp32"], quiet=True) and work / "m3")
    proc = subprocess.Popen([sys.executable, "-m", "bge_edge.cli", "serve", art, "--port", "0", "--precision", "fp32",
                             "--log-level", "warning"], env={**os.environ, "BGE_EDGE_CACHE_DIR": str(work / "cache")},
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    url = ""
    for line in proc.stderr:
        m = re.search(r"http://[\d.]+:\d+", line)
        if m:
            url = m.group(0)
            break
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    while True:
        try:
            if urllib.request.urlopen(url + "/ready", timeout=2).status == 200:
                break
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    before = _mb(proc.pid, "VmRSS")
    body = json.dumps({"input": _text(a.chars), "truncate": a.truncate}).encode()
    codes: list[str] = []
    times: list[float] = []

    def one() -> None:
        t = time.perf_counter()
        req = urllib.request.Request(url + "/v1/embeddings", data=body, headers={"Content-Type": "application/json"})
        try:
            codes.append(str(urllib.request.urlopen(req, timeout=900).status))
        except urllib.error.HTTPError as e:
            codes.append(str(e.code))
        except OSError as e:
            codes.append(type(e).__name__)
        times.append(time.perf_counter() - t)

    threads = [threading.Thread(target=one) for _ in range(a.requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1)
    print(json.dumps({"requests": a.requests, "truncate": a.truncate, "body_bytes": len(body),
                      "codes": sorted(codes), "slowest_s": round(max(times), 2), "rss_before_mb": before,
                      "peak_rss_mb": _mb(proc.pid, "VmHWM"), "rss_after_mb": _mb(proc.pid, "VmRSS")}))
    proc.terminate()
    proc.wait(30)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
