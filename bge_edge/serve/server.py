"""``bge-edge serve``: check settings, bind, run uvicorn, drain on SIGTERM/SIGINT.

Start-up refuses, before binding and with one line, a missing artifact, a precision it lacks and
contradictory limits. The model loads after the socket is bound, so GET /health answers at once and
GET /ready turns 200 once the model is loaded and warmed up.

Shutdown: the first SIGTERM or SIGINT stops taking inference requests (503 ``shutting_down`` with
``Connection: close``) while the socket stays open, lets every accepted request finish (at most
``--shutdown-timeout`` seconds), then stops uvicorn and exits 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from types import FrameType
from typing import Any

from bge_edge.runtime.errors import BgeEdgeError, MissingExtraError

from .config import ConfigError, ServeConfig

__all__ = ["run", "bind"]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one); BgeEdgeError when it cannot."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BgeEdgeError(f"--host {host!r} does not resolve: {e}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise BgeEdgeError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port "
                           f"(or stop the process using it)") from None
    sock.set_inheritable(True)
    return sock


def run(config: ServeConfig) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MissingExtraError(f"`bge-edge serve` needs the [serve] extra ({e.name} is missing): "
                                f"pip install 'bge-edge[serve]'") from None
    from bge_edge.runtime import read_manifest

    from .app import create_app
    from .engine import EmbedderEngine, RerankerEngine

    if not config.artifact:
        raise ConfigError("refusing to start: no artifact folder; pass DIR or set BGE_EDGE_ARTIFACT.")
    manifest = read_manifest(config.artifact)
    if config.precision is not None:
        manifest.graph(config.precision, "onnx")
    config = config.check(manifest.max_length)
    engine_cls: Any = RerankerEngine if manifest.kind == "reranker" else EmbedderEngine
    load_reranker = None
    if config.reranker:
        if manifest.kind == "reranker":
            raise ConfigError(f"refusing to start: {config.artifact} is itself a reranker; --reranker adds one beside "
                              f"an embedder (bge-edge serve EMBEDDER_DIR --reranker RERANKER_DIR).")
        rr_manifest = read_manifest(config.reranker)
        if rr_manifest.kind != "reranker":
            raise ConfigError(f"refusing to start: --reranker {config.reranker} holds a {rr_manifest.kind!r} "
                              f"embedding model, not a reranker (export BAAI/bge-reranker-v2-m3 or similar).")
        if config.precision is not None:
            rr_manifest.graph(config.precision, "onnx")
        rr_dir = config.reranker

        def load_reranker() -> Any:
            return RerankerEngine.load(rr_dir, config.precision, config.device, config.threads)

    level = config.log_level.lower()
    if level not in ("critical", "error", "warning", "info", "debug"):
        raise ConfigError(f"refusing to start: --log-level {config.log_level!r} is not one of critical, error, "
                          f"warning, info, debug.")
    logging.basicConfig(level=level.upper(), format="%(levelname)s: %(message)s")
    if not config.loopback and not config.api_key:
        print(f"bge-edge: warning: listening on {config.host} (not loopback) without --api-key: anyone who can "
              f"reach this port can use the model", file=sys.stderr)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    app = create_app(config, lambda: engine_cls.load(config.artifact, config.precision, config.device,
                                                     config.threads), load_reranker)
    st = app.serve

    class Server(uvicorn.Server):
        exit_code = 0

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if st.draining or self.should_exit:
                self.should_exit = self.force_exit = True
            else:
                print(f"bge-edge: signal {sig}: draining {st.active} accepted request(s), refusing new ones",
                      file=sys.stderr, flush=True)
                st.begin_drain()

        async def on_tick(self, counter: int) -> bool:
            if st.draining and not self.should_exit and (
                    st.idle or time.monotonic() - st.drain_started > config.shutdown_timeout):
                if not st.idle:
                    print(f"bge-edge: shutdown timeout ({config.shutdown_timeout} s): {st.active} request(s) "
                          f"cut off", file=sys.stderr, flush=True)
                self.should_exit = True
            return await super().on_tick(counter)

    def fatal(msg: str) -> None:
        server.exit_code = 2
        server.should_exit = True

    st.on_fatal = fatal
    ucfg = uvicorn.Config(app, lifespan="on", log_level=level, access_log=config.access_log, server_header=False,
                          timeout_graceful_shutdown=max(1, int(config.shutdown_timeout)), log_config=None)
    server = Server(ucfg)
    shown = f"[{host}]" if ":" in host else host
    print(f"bge-edge: serving {config.artifact} on http://{shown}:{port} (pid {os.getpid()}); GET /ready turns 200 "
          f"when the model is loaded", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    print(f"bge-edge: stopped: {st.accepted} inference request(s) accepted, {st.finished} finished "
          f"({st.ok} ok), {st.refused_draining} refused while draining", file=sys.stderr, flush=True)
    if server.exit_code:
        raise BgeEdgeError(f"cannot serve {config.artifact}: {st.load_error}")
    return 0

