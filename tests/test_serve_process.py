"""The real thing: `bge-edge serve` as a process on a free 127.0.0.1 port. Query it, talk to it with the
`openai` client, check it idles at ~0 CPU, and send SIGTERM mid-load: no accepted request may be lost.
Loopback only; every request loop is bounded in count and time."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from bge_edge.runtime import Embedder  # noqa: E402

TEXTS = ["hello world", "the model encodes every passage into dense vectors", "模型将每个段落编码"]
KEY = "test-key-0123456789"


class Server:
    def __init__(self, proc: subprocess.Popen[str], url: str, log: list[str]) -> None:
        self.proc, self.url, self.log = proc, url, log


@contextmanager
def serve(artifact: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 90) -> Iterator[Server]:
    cmd = [sys.executable, "-m", "bge_edge.cli", "serve", str(artifact), "--host", "127.0.0.1", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    log: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            if "serving" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(timeout), "\n".join(log)
        url = re.search(r"http://127\.0\.0\.1:\d+", "\n".join(log)).group(0)  # type: ignore[union-attr]
        end = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, "\n".join(log)
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "server never became ready:\n" + "\n".join(log)
            time.sleep(0.05)
        yield Server(proc, url, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def keyed(m3_artifact: Path) -> Iterator[Server]:
    with serve(m3_artifact, "--precision", "fp32", env={"BGE_EDGE_API_KEY": KEY}) as s:
        yield s


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_real_server_answers_and_idles(keyed: Server, m3_artifact: Path) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.post("/embed_dense", json={"inputs": TEXTS}).status_code == 401  # key from BGE_EDGE_API_KEY
        r = c.post("/embed_all", json={"inputs": TEXTS}, headers=auth)
        assert r.status_code == 200 and len(r.json()["colbert_vecs"]) == 3
        ref = Embedder(m3_artifact, precision="fp32", hash_cache=False).encode(TEXTS)["dense_vecs"]
        assert np.abs(np.array(r.json()["dense_vecs"]) - ref).max() < 1e-6
        metrics = c.get("/metrics", headers=auth).text
        assert 'bge_edge_requests_total{endpoint="/embed_all",code="200"} 1' in metrics
    if sys.platform.startswith("linux"):
        time.sleep(0.3)
        before = _cpu_seconds(keyed.proc.pid)
        time.sleep(2.0)
        idle = _cpu_seconds(keyed.proc.pid) - before
        assert idle < 0.1, f"idle server used {idle:.3f} s of CPU in 2 s"


RAW = [  # hostile bytes on the socket: the HTTP layer (uvicorn + h11) answers or hangs up, never 5xx, never dies
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST /embed_dense HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /embed_dense HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /embed_dense HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /embed_dense HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(2000)) + b"\r\n",
    b"POST /embed_dense HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
    b"\r\nContent-Length: 999999999\r\n\r\n{",
    b"GET /\x00\xff HTTP/1.1\r\nHost: x\r\n\r\n",
]


def test_malformed_http_on_the_socket_never_gets_5xx(keyed: Server) -> None:
    host, port = keyed.url.rsplit("/", 1)[1].split(":")
    answers = []
    for raw in RAW:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            try:
                sock.sendall(raw)
                sock.shutdown(socket.SHUT_WR)
                head = sock.recv(64)
            except (ConnectionResetError, BrokenPipeError):
                head = b""  # hung up on us: fine
        if head:
            assert head.startswith(b"HTTP/1.1 ") and int(head.split()[1]) < 500, (raw[:60], head)
        answers.append(int(head.split()[1]) if head else "hung up")
    assert answers.count(400) >= 5, answers  # the malformed ones are refused as such
    print(f"raw HTTP answers: {answers}")
    assert httpx.get(keyed.url + "/ready", timeout=10).status_code == 200
    assert keyed.proc.poll() is None


def test_openai_client_is_compatible(keyed: Server, m3_artifact: Path) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    ref = Embedder(m3_artifact, precision="fp32", hash_cache=False).encode(TEXTS)["dense_vecs"]
    res = client.embeddings.create(model="bge-m3", input=TEXTS)  # the client asks for base64 by default
    assert [d.index for d in res.data] == [0, 1, 2] and res.usage.prompt_tokens > 0
    np.testing.assert_allclose(np.array([d.embedding for d in res.data]), ref, atol=1e-6)
    res = client.embeddings.create(model="bge-m3", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(np.array(res.data[0].embedding), ref[0], atol=1e-6)
    assert client.models.list().data[0].id == res.model
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong-key-000", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="bge-m3", input="x")


@pytest.mark.slow
def test_sigterm_mid_load_loses_no_accepted_request(m3_artifact: Path) -> None:
    clients, per_client, texts = 12, 400, [f"passage {i} " + "about proteins and cells " * 6 for i in range(16)]
    results: list[list[Any]] = [[] for _ in range(clients)]
    signalled = threading.Event()
    sent_at: list[float] = []

    def client(k: int, url: str) -> None:
        end = time.monotonic() + 60
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(per_client):
                if time.monotonic() > end:
                    break
                try:
                    r = c.post("/embed_dense", json={"inputs": texts})
                except httpx.TransportError as e:  # connection closed by the stopped server
                    results[k].append((signalled.is_set(), type(e).__name__))
                    return
                ok = r.status_code == 200 and np.array(r.json()["dense_vecs"]).shape[0] == len(texts)
                results[k].append((signalled.is_set(), r.status_code if r.status_code != 200 or ok else "bad"))
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "shutting_down"
                    return

    with serve(m3_artifact, "--precision", "fp32") as s:
        threads = [threading.Thread(target=client, args=(k, s.url), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        end = time.monotonic() + 30
        while sum(len(r) for r in results) < 3 * clients:
            assert time.monotonic() < end, "no load"
            time.sleep(0.01)
        signalled.set()
        sent_at.append(time.monotonic())
        s.proc.send_signal(signal.SIGTERM)
        rc = s.proc.wait(60)
        for t in threads:
            t.join(60)
        stopped = next(line for line in s.log if "stopped:" in line)
    outcomes = [o for r in results for o in r]
    assert rc == 0, "\n".join(s.log)
    assert not any("Traceback" in line for line in s.log), "\n".join(s.log)
    assert not [o for o in outcomes if not o[0] and o[1] != 200], "errors before the signal"
    assert "bad" not in [o[1] for o in outcomes]
    m = re.search(r"(\d+) inference request\(s\) accepted, (\d+) finished \((\d+) ok\), (\d+) refused", stopped)
    assert m, stopped
    accepted, finished, ok, refused = map(int, m.groups())
    answered = sum(1 for o in outcomes if o[1] == 200)
    assert accepted == finished == ok == answered, (stopped, answered)  # every accepted request reached its client
    assert sum(1 for o in outcomes if o[1] == 503) == refused >= 1  # new requests during the drain got 503
    assert any(o[0] and o[1] == 200 for o in outcomes), "no request was in flight at the signal"
    after = {}
    for o in outcomes:
        if o[0]:
            after[o[1]] = after.get(o[1], 0) + 1
    print(f"{stopped}; client outcomes after SIGTERM: {after}")


def test_busy_port_refuses_to_start(m3_artifact: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "bge_edge.cli", "serve", str(m3_artifact), "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "bge_edge.cli", "serve", str(m3_artifact), "--max-input-tokens",
                        "100000"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--max-input-tokens 100000 > the model's max length" in r.stderr
