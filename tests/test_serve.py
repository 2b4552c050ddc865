"""Serving logic without a model: a fake engine that sleeps, blocks and fails on demand makes batching,
queue-full, readiness, draining and auth deterministic. Also settings checks, CLI flags and metrics."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import numpy as np
import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from bge_edge.runtime.errors import ArtifactError, BackendError, InputError  # noqa: E402

from bge_edge.serve import ConfigError, ServeConfig, create_app  # noqa: E402

H = 8


class FakeEngine:
    """An Engine with vectors derived from the text; ``gate`` holds inference, ``delay`` slows it,
    texts containing "boom" raise BackendError and "crash" a RuntimeError."""

    def __init__(self, kind: str = "m3", max_length: int = 64, delay: float = 0.0, blocked: bool = False) -> None:
        self.model_id, self.kind, self.hidden_size, self.max_length = "fake-model", kind, H, max_length
        self.heads = ("dense", "sparse", "colbert") if kind == "m3" else ("dense",)
        self.delay = delay
        self.gate = threading.Event()
        if not blocked:
            self.gate.set()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        for k, t in enumerate(texts):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"input[{k}] holds a lone surrogate") from None
        return [len(t.split()) + 2 for t in texts]

    @staticmethod
    def vector(text: str) -> np.ndarray:
        v = np.frombuffer(hashlib.sha256(text.encode("utf-8", "replace")).digest()[: 4 * H], dtype=np.uint32)
        v = v.astype(np.float32) / 2**32 - 0.5
        return v / np.linalg.norm(v)

    def encode(self, texts: list[str], max_length: int, dense: bool, sparse: bool, colbert: bool) -> dict[str, Any]:
        with self.lock:
            self.calls.append(list(texts))
        self.entered.set()
        assert self.gate.wait(10), "test never released the fake engine"
        if self.delay:
            import time

            time.sleep(self.delay)
        if any("boom" in t for t in texts):
            raise BackendError("inference failed on a batch (fake)")
        if any("crash" in t for t in texts):
            raise RuntimeError("unexpected bug (fake)")
        return {"dense_vecs": np.stack([self.vector(t) for t in texts]) if dense else None,
                "lexical_weights": [{str(len(t)): 0.5} for t in texts] if sparse else None,
                "colbert_vecs": [np.tile(self.vector(t), (min(len(t.split()) + 1, max_length - 1), 1))
                                 for t in texts] if colbert else None}

    def score(self, pairs: list[tuple[str, str]], max_length: int, weights: Sequence[float] | None) -> dict[str, Any]:
        self.encode([p[0] for p in pairs] + [p[1] for p in pairs], max_length, True, False, False)
        d = [float(self.vector(q) @ self.vector(p)) for q, p in pairs]
        return {"dense": d} if self.kind != "m3" else {k: d for k in ("dense", "sparse", "colbert", "sparse+dense",
                                                                       "colbert+sparse+dense")}

    def id_to_token(self, weights: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{f"tok{k}": v for k, v in d.items()} for d in weights]

    def warmup(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"artifact": "fake", "kind": self.kind, "precision": "fp32", "backend": "fake", "max_length": 64}


@asynccontextmanager
async def running(app: Any, ready: bool = True) -> AsyncIterator[Any]:
    """Run the app's lifespan and yield an in-process httpx client (no sockets)."""
    star = app.app
    async with star.router.lifespan_context(star):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve.test",
                                     timeout=20) as c:
            if ready:
                await wait_for(lambda: app.serve.ready or app.serve.load_error is not None)
                assert app.serve.ready, app.serve.load_error
            yield c


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.002)


def make(engine: FakeEngine | None = None, **cfg: Any) -> tuple[Any, FakeEngine]:
    engine = engine or FakeEngine()
    return create_app(ServeConfig(artifact="fake", **cfg), lambda: engine), engine


def error_of(r: Any) -> dict[str, str]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    return body["error"]


# ---- micro-batching ---------------------------------------------------------------------------------


def test_concurrent_requests_merge_into_one_encode_call_and_split_back() -> None:
    app, eng = make(FakeEngine(blocked=True))

    async def main() -> None:
        async with running(app) as c:
            eng.gate.set()  # warm-up does not call encode on the fake; first request runs alone
            eng.gate.clear()
            first = asyncio.create_task(c.post("/embed_dense", json={"inputs": "first"}))
            await asyncio.to_thread(eng.entered.wait, 5)
            texts = [[f"req {i} text {k}" for k in range(i + 1)] for i in range(5)]
            rest = [asyncio.create_task(c.post("/embed_dense", json={"inputs": t})) for t in texts]
            await wait_for(lambda: app.serve.batcher.queued_jobs == 5)
            eng.gate.set()
            r0, *rs = await asyncio.gather(first, *rest)
            assert r0.status_code == 200 and all(r.status_code == 200 for r in rs)
            assert eng.calls == [["first"], [t for ts in texts for t in ts]]  # 5 requests -> one encode call
            for ts, r in zip(texts, rs):
                got = np.array(r.json()["dense_vecs"])
                assert got.shape == (len(ts), H)
                np.testing.assert_allclose(got, np.stack([FakeEngine.vector(t) for t in ts]), atol=1e-7)
            m = (await c.get("/metrics")).text
            assert "bge_edge_batch_requests_bucket{le=\"8\"} 2" in m

    asyncio.run(main())


def test_merge_limits_cut_batches_by_inputs_and_tokens() -> None:
    app, eng = make(FakeEngine(blocked=True), max_merge_inputs=4, max_merge_tokens=1000)

    async def main() -> None:
        async with running(app) as c:
            first = asyncio.create_task(c.post("/embed_dense", json={"inputs": "x"}))
            await asyncio.to_thread(eng.entered.wait, 5)
            rest = [asyncio.create_task(c.post("/embed_dense", json={"inputs": [f"a{i}", f"b{i}"]})) for i in range(3)]
            await wait_for(lambda: app.serve.batcher.queued_jobs == 3)
            eng.gate.set()
            assert all(r.status_code == 200 for r in await asyncio.gather(first, *rest))
            assert [len(x) for x in eng.calls] == [1, 4, 2]  # 2 + 2 fit in 4, the third request goes next

    asyncio.run(main())


def test_idle_model_waits_only_for_requests_still_arriving() -> None:
    app, eng = make(batch_wait_ms=1000)

    async def slow_body(text: str) -> AsyncIterator[bytes]:
        await asyncio.sleep(0.05)
        yield json.dumps({"inputs": text}).encode()

    async def main() -> None:
        clock = asyncio.get_running_loop().time
        async with running(app) as c:
            t0 = clock()
            assert (await c.post("/embed_dense", json={"inputs": "alone"})).status_code == 200
            assert clock() - t0 < 0.5  # nobody else arriving: no wait
            t0 = clock()
            a = asyncio.create_task(c.post("/embed_dense", json={"inputs": "a"}))
            b = asyncio.create_task(c.post("/embed_dense", content=slow_body("b")))  # still being read when a is queued
            assert all(r.status_code == 200 for r in await asyncio.gather(a, b))
            assert eng.calls == [["alone"], ["a", "b"]]
            assert clock() - t0 < 0.5  # b's arrival ended the wait, not the 1 s timeout
            t0 = clock()
            bad = asyncio.create_task(c.post("/embed_dense", content=slow_body("")))  # arrives, then fails validation
            c2 = asyncio.create_task(c.post("/embed_dense", json={"inputs": "c"}))
            r_bad, r_c = await asyncio.gather(bad, c2)
            assert r_bad.status_code == 400 and r_c.status_code == 200 and eng.calls[-1] == ["c"]
            assert clock() - t0 < 0.5  # the refusal woke the batcher
            assert app.serve.arriving == 0 and app.serve.active == 0

    asyncio.run(main())


def test_score_and_heads_use_the_same_queue() -> None:
    app, eng = make()

    async def main() -> None:
        async with running(app) as c:
            r = await c.post("/score", json={"pairs": [["q", "p"], ["q2", "p2"]], "weights": [0.4, 0.2, 0.4]})
            assert r.status_code == 200 and set(r.json()["scores"]) == {"dense", "sparse", "colbert", "sparse+dense",
                                                                         "colbert+sparse+dense"}
            r = await c.post("/embed_all", json={"inputs": ["one two"], "return_tokens": True})
            body = r.json()
            assert body["lexical_weights"] == [{"tok7": 0.5}] and np.array(body["colbert_vecs"][0]).shape == (3, H)
            assert eng.calls[-1] == ["one two"]  # all three heads in one call

    asyncio.run(main())


def test_failing_request_does_not_fail_its_batch_mates() -> None:
    app, eng = make(FakeEngine(blocked=True))

    async def main() -> None:
        async with running(app) as c:
            first = asyncio.create_task(c.post("/embed_dense", json={"inputs": "hold"}))
            await asyncio.to_thread(eng.entered.wait, 5)
            names = ["fine one", "boom", "fine two", "crash"]
            rest = [asyncio.create_task(c.post("/embed_dense", json={"inputs": n})) for n in names]
            await wait_for(lambda: app.serve.batcher.queued_jobs == 4)
            eng.gate.set()
            r0, ok1, boom, ok2, crash = await asyncio.gather(first, *rest)
            assert r0.status_code == ok1.status_code == ok2.status_code == 200
            assert boom.status_code == 500 and error_of(boom)["code"] == "inference_failed"
            assert crash.status_code == 500 and error_of(crash)["code"] == "internal_error"
            assert "Traceback" not in crash.text and "unexpected bug" not in crash.text
            assert (await c.get("/ready")).status_code == 200

    asyncio.run(main())


def test_a_fault_in_the_batching_loop_fails_only_its_batch() -> None:
    app, eng = make()

    async def main() -> None:
        async with running(app) as c:
            b = app.serve.batcher
            real, faults = b._observe, []

            def broken(name: str, value: float) -> None:
                if not faults:
                    faults.append(name)
                    raise RuntimeError("bug in the batching loop (fake)")
                real(name, value)

            b._observe = broken
            r = await asyncio.wait_for(c.post("/embed_dense", json={"inputs": "x"}), 5)  # answered, not left hanging
            assert r.status_code == 500 and error_of(r)["code"] == "internal_error" and faults
            r = await asyncio.wait_for(c.post("/embed_dense", json={"inputs": "y"}), 5)
            assert r.status_code == 200 and (await c.get("/ready")).status_code == 200

    asyncio.run(main())


def test_queue_full_gives_429_with_retry_after() -> None:
    app, eng = make(FakeEngine(blocked=True), max_queue_inputs=4, max_inputs=4, max_merge_inputs=4)

    async def main() -> None:
        async with running(app) as c:
            first = asyncio.create_task(c.post("/embed_dense", json={"inputs": "running"}))
            await asyncio.to_thread(eng.entered.wait, 5)
            queued = asyncio.create_task(c.post("/embed_dense", json={"inputs": ["a", "b", "c"]}))
            await wait_for(lambda: app.serve.batcher.pending_inputs == 3)
            r = await c.post("/embed_dense", json={"inputs": ["d", "e"]})
            assert r.status_code == 429
            err = error_of(r)
            assert err["code"] == "queue_full" and "max_queue_inputs 4" in err["message"]
            assert "3 texts" in err["message"]
            assert int(r.headers["retry-after"]) >= 1
            eng.gate.set()
            assert (await first).status_code == 200 and (await queued).status_code == 200
            assert (await c.post("/embed_dense", json={"inputs": ["d", "e"]})).status_code == 200
            assert 'bge_edge_errors_total{status="429",error="queue_full"} 1' in (await c.get("/metrics")).text

    asyncio.run(main())


def test_too_many_concurrent_requests_gives_429() -> None:
    app, eng = make(FakeEngine(blocked=True), max_concurrent=2)

    async def main() -> None:
        async with running(app) as c:
            held = [asyncio.create_task(c.post("/embed_dense", json={"inputs": f"x{i}"})) for i in range(2)]
            await wait_for(lambda: app.serve.concurrent == 2)
            r = await c.post("/embed_dense", json={"inputs": "y"})
            assert r.status_code == 429 and error_of(r)["code"] == "too_many_concurrent_requests"
            assert "max_concurrent 2" in error_of(r)["message"] and r.headers["retry-after"] == "1"
            eng.gate.set()
            assert all(x.status_code == 200 for x in await asyncio.gather(*held))

    asyncio.run(main())


# ---- readiness, shutdown, auth ----------------------------------------------------------------------


def test_not_ready_until_loaded_and_warmed_up() -> None:
    loaded = threading.Event()
    eng = FakeEngine()

    def load() -> FakeEngine:
        assert loaded.wait(10)
        return eng

    app = create_app(ServeConfig(artifact="fake"), load)

    async def main() -> None:
        async with running(app, ready=False) as c:
            assert (await c.get("/health")).json() == {"status": "ok"}
            r = await c.get("/ready")
            assert r.status_code == 503 and error_of(r)["code"] == "not_ready"
            r = await c.post("/v1/embeddings", json={"input": "x"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and error_of(r)["code"] == "not_ready"
            assert (await c.get("/info")).json()["ready"] is False
            loaded.set()
            await wait_for(lambda: app.serve.ready)
            assert (await c.get("/ready")).status_code == 200
            assert (await c.post("/v1/embeddings", json={"input": "x"})).status_code == 200

    asyncio.run(main())


def test_load_failure_is_reported_and_fatal() -> None:
    def load() -> FakeEngine:
        raise ArtifactError("/nowhere has no manifest.json")

    app = create_app(ServeConfig(artifact="fake"), load)
    fatal: list[str] = []
    app.serve.on_fatal = fatal.append

    async def main() -> None:
        async with running(app, ready=False) as c:
            await wait_for(lambda: bool(fatal))
            r = await c.get("/ready")
            assert r.status_code == 503 and "no manifest.json" in error_of(r)["message"]
            assert fatal == ["/nowhere has no manifest.json"]

    asyncio.run(main())


def test_contradictory_limits_found_after_load_are_fatal() -> None:
    app = create_app(ServeConfig(artifact="fake", max_input_tokens=100), lambda: FakeEngine(max_length=64))

    async def main() -> None:
        async with running(app, ready=False) as c:
            await wait_for(lambda: app.serve.load_error is not None)
            assert "--max-input-tokens 100 > the model's max length 64" in error_of(await c.get("/ready"))["message"]

    asyncio.run(main())


def test_draining_finishes_accepted_requests_and_refuses_new_ones() -> None:
    app, eng = make(FakeEngine(blocked=True))
    st = app.serve

    async def main() -> None:
        async with running(app) as c:
            running_req = asyncio.create_task(c.post("/embed_dense", json={"inputs": "in flight"}))
            await asyncio.to_thread(eng.entered.wait, 5)
            queued = asyncio.create_task(c.post("/embed_all", json={"inputs": ["queued"]}))
            await wait_for(lambda: st.batcher.queued_jobs == 1)
            st.begin_drain()
            r = await c.post("/embed_dense", json={"inputs": "late"})
            assert r.status_code == 503 and error_of(r)["code"] == "shutting_down"
            assert r.headers["connection"] == "close"
            assert (await c.get("/ready")).status_code == 503
            assert (await c.get("/health")).status_code == 200
            assert not st.idle
            eng.gate.set()
            a, b = await asyncio.gather(running_req, queued)
            assert a.status_code == b.status_code == 200 and len(b.json()["colbert_vecs"]) == 1
            assert st.idle and (st.accepted, st.finished, st.ok, st.refused_draining) == (2, 2, 2, 1)

    asyncio.run(main())


def test_stopping_fails_queued_requests_with_503_not_500() -> None:
    app, eng = make(FakeEngine(blocked=True))

    async def main() -> None:
        star = app.app
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            async with star.router.lifespan_context(star):
                await wait_for(lambda: app.serve.ready)
                first = asyncio.create_task(c.post("/embed_dense", json={"inputs": "a"}))
                await asyncio.to_thread(eng.entered.wait, 5)
                queued = asyncio.create_task(c.post("/embed_dense", json={"inputs": "b"}))
                await wait_for(lambda: app.serve.batcher.queued_jobs == 1)
            eng.gate.set()  # lifespan exited (shutdown timeout passed): the queued request is failed cleanly
            r = await queued
            assert r.status_code == 503 and error_of(r)["code"] == "shutting_down"
            await first

    asyncio.run(main())


def test_api_key() -> None:
    app, _ = make(api_key="s3cret-key")

    async def main() -> None:
        async with running(app) as c:
            for path in ("/health", "/ready", "/openapi.json"):
                assert (await c.get(path)).status_code == 200
            r = await c.post("/embed_dense", json={"inputs": "x"})
            assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
            r = await c.get("/metrics", headers={"Authorization": "Bearer wrong-key"})
            assert r.status_code == 401 and "wrong API key" in error_of(r)["message"]
            ok = {"Authorization": "Bearer s3cret-key"}
            assert (await c.post("/embed_dense", json={"inputs": "x"}, headers=ok)).status_code == 200
            assert (await c.get("/info", headers=ok)).json()["auth"] == "bearer"
            assert "s3cret" not in (await c.get("/info", headers=ok)).text

    asyncio.run(main())


# ---- settings -----------------------------------------------------------------------------------------


def test_contradictory_settings_refuse_to_start() -> None:
    with pytest.raises(ConfigError, match=r"--max-queue-inputs 10 < --max-inputs 20"):
        ServeConfig(max_queue_inputs=10, max_inputs=20).check()
    with pytest.raises(ConfigError, match=r"--max-input-tokens 1000 > the model's max length 512"):
        ServeConfig(max_input_tokens=1000).check(512)
    with pytest.raises(ConfigError, match=r"--port 70000.*--batch-wait-ms must be between 0 and 1000"):
        ServeConfig(port=70000, batch_wait_ms=-1).check()
    with pytest.raises(ConfigError, match=r"--max-request-tokens 100 < --max-input-tokens 512: one text"):
        ServeConfig(max_request_tokens=100).check(512)
    with pytest.raises(ConfigError, match="--api-key must be at least 8"):
        ServeConfig(api_key="short").check()
    assert ServeConfig().check(256).max_input_tokens == 256
    assert ServeConfig(max_input_tokens=100).check(256).max_input_tokens == 100


def test_every_flag_has_an_environment_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    from bge_edge.cli import build_parser
    from bge_edge.serve.config import _FLAGS, config_from_args

    help_text = subprocess.run([sys.executable, "-m", "bge_edge.cli", "serve", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    for name in _FLAGS:
        assert f"--{name.replace('_', '-')}" in help_text and f"BGE_EDGE_{name.upper()}" in help_text.replace("\n", "")
    monkeypatch.setenv("BGE_EDGE_MAX_INPUTS", "12")
    monkeypatch.setenv("BGE_EDGE_TRUNCATE", "yes")
    monkeypatch.setenv("BGE_EDGE_PORT", "9999")
    monkeypatch.setenv("BGE_EDGE_THREADS", "auto")
    cfg = config_from_args(build_parser().parse_args(["serve", "art", "--port", "7000"]))
    assert (cfg.max_inputs, cfg.truncate, cfg.port, cfg.threads, cfg.host) == (12, True, 7000, None, "127.0.0.1")
    monkeypatch.setenv("BGE_EDGE_ARTIFACT", "/from/env")
    assert config_from_args(build_parser().parse_args(["serve"])).artifact == "/from/env"


def test_cli_refuses_contradictory_settings_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bge_edge.cli", "serve", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("bge-edge: error:") and "Traceback" not in r.stderr


def test_cli_works_without_the_serve_extra(bert_artifact: Path, tmp_path: Path) -> None:
    """encode/info/verify never import starlette or uvicorn (not even the parser); serve names the extra."""
    texts = tmp_path / "in.txt"
    texts.write_text("hello\nworld\n", encoding="utf-8")
    code = (
        "import importlib.abc, io, contextlib, json, sys\n"
        "class NoServeExtra(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('starlette', 'uvicorn'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoServeExtra())\n"
        "from bge_edge.cli import main\n"
        f"art = {str(bert_artifact)!r}\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    rcs = [main(['info', art]), main(['verify', art]), main(['encode', art, '--input', {str(texts)!r}])]\n"
        "lines = out.getvalue().splitlines()\n"
        "assert len([x for x in lines if x.startswith('{\"index\"')]) == 2, lines\n"
        "rcs.append(main(['serve', art]))\n"
        "print(json.dumps({'rcs': rcs, 'loaded': [m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'uvicorn')]}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "BGE_EDGE_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == {"rcs": [0, 0, 0, 2], "loaded": []}
    assert "bge-edge: error: `bge-edge serve` needs the [serve] extra" in r.stderr
    assert "pip install 'bge-edge[serve]'" in r.stderr and "Traceback" not in r.stderr


# ---- metrics ------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? '
                     r'(-?[0-9.e+-]+|\+Inf|NaN)$')


def parse_prometheus(text: str) -> dict[str, float]:
    """Check every line of the exposition format; return {series: value}."""
    out: dict[str, float] = {}
    typed: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge", "histogram") and name not in typed
            typed.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        base = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        assert m.group(1) in typed or base in typed, f"sample without # TYPE: {line!r}"
        series, value = line.rsplit(" ", 1)
        out[series] = float(value)
    return out


def test_metrics_exposition_format() -> None:
    app, _ = make()

    async def main() -> None:
        async with running(app) as c:
            for i in range(3):
                assert (await c.post("/embed_dense", json={"inputs": [f"w{i} x", "y"]})).status_code == 200
            await c.post("/embed_dense", json={"inputs": []})
            await c.post("/embed_dense", content=b"{bad")
            await c.get('/no/such/"path')
            r = await c.get("/metrics")
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            s = parse_prometheus(r.text)
            assert s['bge_edge_requests_total{endpoint="/embed_dense",code="200"}'] == 3
            assert s['bge_edge_requests_total{endpoint="/embed_dense",code="400"}'] == 1
            assert s['bge_edge_requests_total{endpoint="other",code="404"}'] == 1
            assert s['bge_edge_errors_total{status="422",error="invalid_json"}'] == 1
            assert s['bge_edge_tokens_total{endpoint="/embed_dense"}'] == 3 * (4 + 3)
            assert s['bge_edge_inputs_total{endpoint="/embed_dense"}'] == 6
            assert s["bge_edge_queue_depth"] == 0 and s["bge_edge_ready"] == 1
            assert s['bge_edge_batch_inputs_bucket{le="+Inf"}'] == s["bge_edge_batch_inputs_count"] == 3
            assert s["bge_edge_batch_inputs_sum"] == 6
            prefix = 'bge_edge_request_duration_seconds_bucket{endpoint="/embed_dense"'
            buckets = [v for k, v in s.items() if k.startswith(prefix)]
            assert buckets == sorted(buckets) and buckets[-1] == 5  # cumulative, +Inf == count
            assert s["process_resident_memory_bytes"] > 1e6

    asyncio.run(main())


def test_metrics_label_values_are_escaped() -> None:
    from bge_edge.serve.metrics import Registry

    reg = Registry()
    reg.counter("x_total", "help", ("a",)).inc('q"uo\\te\nnl')
    line = [ln for ln in reg.render().splitlines() if ln.startswith("x_total{")][0]
    assert line == 'x_total{a="q\\"uo\\\\te\\nnl"} 1'
    parse_prometheus(reg.render())


def test_openai_shape_and_base64_are_little_endian_float32() -> None:
    app, _ = make()

    async def main() -> None:
        async with running(app) as c:
            r = await c.post("/v1/embeddings", json={"input": ["a b", "c"], "model": "whatever",
                                                     "encoding_format": "base64"})
            body = r.json()
            assert body["object"] == "list" and body["model"] == "fake-model"
            assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
            import base64

            v = np.frombuffer(base64.b64decode(body["data"][1]["embedding"]), dtype="<f4")
            np.testing.assert_array_equal(v, FakeEngine.vector("c"))
            r = await c.post("/v1/embeddings", json={"input": "a b"})
            assert np.allclose(r.json()["data"][0]["embedding"], FakeEngine.vector("a b"), atol=1e-8)

    asyncio.run(main())


def test_json_numbers_keep_float32_precision() -> None:
    from bge_edge.serve.app import _floats

    x = np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    back = np.array(json.loads(json.dumps(_floats(x))), dtype=np.float64)
    assert np.abs(back - x).max() <= 5e-9
