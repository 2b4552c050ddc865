"""Server settings: one frozen dataclass, the CLI flags with their ``BGE_EDGE_*`` twins, and the start-up checks.

Cheap to import (stdlib and the runtime's exception classes): the ``bge-edge`` parser imports it for every command.
Precedence: command-line flag > environment variable > documented default.

Limits and their arithmetic (defaults sized for a 2-core sidecar; raise them on bigger hosts):
  max_request_bytes    2,000,000   bounds JSON parsing and tokenisation work per request (~2 MB of text)
  max_inputs           256         texts (or pairs) per request; OpenAI allows 2,048, TEI 32
  max_input_tokens     model max   tokens per text, special tokens included (8,192 M3, 512 v1.5, 256 MiniLM)
  max_request_tokens   65,536      tokens in one request, all texts (or both sides of every pair) after truncation:
                                   bounds one request's inference time (~75 s for BGE-M3 INT8 on 2 cores at
                                   ~850 tok/s) and its ColBERT output (65,536 x 1,024 x 4 B = 256 MiB of float32,
                                   ~750 MB as JSON); 256 full-length MiniLM texts (256 x 256) fit exactly.
                                   Must hold one text of max_input_tokens.
  max_merge_inputs     256         texts merged into one Embedder.encode call (the runtime re-batches them
                                   by its padded-token budget, MAX_BATCH_TOKENS = 8,192)
  max_merge_tokens     16,384      real tokens merged into one encode call: a small request never waits
                                   behind more than ~2 runtime batches of others' work
  max_queue_inputs     4,096       texts waiting for the model; beyond it requests get 429 + Retry-After.
                                   Must hold one full request (>= max_inputs), else a legal request could
                                   never be accepted.
  max_concurrent       512         HTTP requests being parsed/served at once (429 beyond): with 2 MB
                                   bodies this bounds buffered request bytes to ~1 GB.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

from bge_edge.runtime.errors import BgeEdgeError

__all__ = ["ServeConfig", "ConfigError", "ENV_PREFIX", "add_serve_arguments", "config_from_args"]

ENV_PREFIX = "BGE_EDGE_"
MAX_SHUTDOWN_TIMEOUT = 86_400.0  # one day: longer is a mistake (uvicorn takes whole seconds, inf overflows)


class ConfigError(BgeEdgeError, ValueError):
    """Contradictory or invalid server settings; the message names the setting, its value and the fix."""


@dataclass(frozen=True)
class ServeConfig:
    artifact: str = ""
    reranker: str | None = None           # a reranker artifact served beside the embedder (/rerank, /v1/rerank)
    host: str = "127.0.0.1"
    port: int = 8080
    precision: str | None = None          # None: the runtime's choice (int8 on CPU when exported)
    device: str = "cpu"
    threads: int | None = None            # None: physical cores
    api_key: str | None = None
    model_name: str | None = None         # None: the manifest's source model id
    max_request_bytes: int = 2_000_000
    max_inputs: int = 256
    max_input_tokens: int | None = None   # None: the model's max length
    max_request_tokens: int = 65_536
    truncate: bool = False                # False: inputs over max_input_tokens get 413
    batch_wait_ms: float = 2.0
    max_merge_inputs: int = 256
    max_merge_tokens: int = 16_384
    max_queue_inputs: int = 4_096
    max_concurrent: int = 512
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    access_log: bool = False

    def check(self, model_max_length: int | None = None) -> ServeConfig:
        """Refuse contradictory settings (``ConfigError``); with the model's max length, resolve
        ``max_input_tokens`` and check it against the model. Returns the resolved config."""
        problems: list[str] = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        need(0 <= self.port <= 65535, f"--port {self.port} is not a TCP port (0-65535; 0 picks a free one)")
        for name in ("max_request_bytes", "max_inputs", "max_request_tokens", "max_merge_inputs", "max_merge_tokens",
                     "max_queue_inputs", "max_concurrent"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"--{_flag(name)} must be an integer >= 1, got {v!r}")
        need(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads!r}")
        need(0 <= self.batch_wait_ms <= 1000,
             f"--batch-wait-ms must be between 0 and 1000 ms, got {self.batch_wait_ms!r}")
        need(isinstance(self.shutdown_timeout, (int, float)) and math.isfinite(self.shutdown_timeout)
             and 0 <= self.shutdown_timeout <= MAX_SHUTDOWN_TIMEOUT,
             f"--shutdown-timeout must be a finite number of seconds from 0 to {MAX_SHUTDOWN_TIMEOUT:,.0f}, got "
             f"{self.shutdown_timeout!r}")
        need(self.max_request_bytes >= 1024,
             f"--max-request-bytes {self.max_request_bytes} < 1024: no useful request fits")
        if not problems:
            need(self.max_queue_inputs >= self.max_inputs,
                 f"--max-queue-inputs {self.max_queue_inputs} < --max-inputs {self.max_inputs}: a request with "
                 f"the allowed number of inputs could never be queued; raise --max-queue-inputs or lower --max-inputs")
            need(self.max_queue_inputs >= self.max_merge_inputs,
                 f"--max-queue-inputs {self.max_queue_inputs} < --max-merge-inputs {self.max_merge_inputs}: "
                 f"batches could never fill; lower --max-merge-inputs")
        if self.api_key is not None:
            need(len(self.api_key) >= 8 and self.api_key.strip() == self.api_key,
                 "--api-key must be at least 8 characters without surrounding whitespace")
        mit = self.max_input_tokens
        need(mit is None or (isinstance(mit, int) and mit >= 2),
             f"--max-input-tokens must be an integer >= 2, got {mit!r}")
        if model_max_length is not None and not problems:
            if mit is None:
                mit = model_max_length
            need(mit <= model_max_length,
                 f"--max-input-tokens {mit} > the model's max length {model_max_length} (manifest of "
                 f"{self.artifact}); the model cannot read longer inputs: use at most {model_max_length}")
        if mit is not None and not problems:
            need(self.max_request_tokens >= mit,
                 f"--max-request-tokens {self.max_request_tokens} < --max-input-tokens {mit}: one text of the "
                 f"allowed length could never be served; raise --max-request-tokens or lower --max-input-tokens")
        if problems:
            raise ConfigError("refusing to start: " + "; ".join(problems) + ".")
        return ServeConfig(**{**asdict(self), "max_input_tokens": mit})

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    def public(self) -> dict[str, Any]:
        """Settings safe to show on /info (no API key)."""
        d = asdict(self)
        d["api_key"] = "set" if self.api_key else None
        return d


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _bool(s: str | bool) -> bool:
    if isinstance(s, bool):
        return s
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (1/0, yes/no, on/off), got {s!r}")


def _optional(conv: Callable[[str], Any]) -> Callable[[str], Any]:
    def f(s: str) -> Any:
        return None if s.strip().lower() in ("", "auto", "none") else conv(s)
    f.__name__ = conv.__name__
    return f


# name: (type, help). Defaults come from ServeConfig; every flag reads BGE_EDGE_<NAME> when not given.
_FLAGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "reranker": (_optional(str), "a reranker artifact folder (bge-reranker-*) to serve beside the embedder: "
                                 "POST /rerank and /v1/rerank (a reranker passed as the artifact serves those alone)"),
    "host": (str, "address to bind; keep loopback for a sidecar (anything else needs --api-key to be safe)"),
    "port": (int, "TCP port (0 picks a free one; the bound address is printed)"),
    "precision": (_optional(str), "graph precision: fp32, int8, fp16 (auto: int8 on CPU when exported)"),
    "device": (str, "cpu, cuda, cuda:N or auto"),
    "threads": (_optional(int), "intra-op threads (auto: physical cores)"),
    "api_key": (_optional(str), "require 'Authorization: Bearer KEY' on every endpoint except /health, /ready "
                                "and /openapi.json (prefer the environment variable to the flag)"),
    "model_name": (_optional(str), "model name reported by /v1/embeddings and /v1/models (auto: manifest id)"),
    "max_request_bytes": (int, "largest request body in bytes (413 beyond)"),
    "max_inputs": (int, "most texts, or pairs for /score, in one request (413 beyond)"),
    "max_input_tokens": (_optional(int), "most tokens per text, special tokens included (auto: the model's "
                                         "max length); longer texts get 413 unless truncation is on"),
    "max_request_tokens": (int, "most tokens in one request, all texts (or both sides of every pair) after "
                                "truncation (413 beyond)"),
    "truncate": (_bool, "truncate texts over --max-input-tokens instead of answering 413 (requests may "
                        "override with \"truncate\": true/false)"),
    "batch_wait_ms": (float, "when the model is idle, how long a batch may wait for requests still being read (ms)"),
    "max_merge_inputs": (int, "most texts merged into one Embedder.encode call"),
    "max_merge_tokens": (int, "most real tokens merged into one Embedder.encode call"),
    "max_queue_inputs": (int, "most texts waiting for the model (429 + Retry-After beyond)"),
    "max_concurrent": (int, "most HTTP requests in progress at once (429 beyond)"),
    "shutdown_timeout": (float, "on SIGTERM/SIGINT, seconds to let accepted requests finish (new ones get 503)"),
    "log_level": (str, "critical, error, warning, info or debug"),
    "access_log": (_bool, "log one line per request"),
}


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` flags; each default shows its environment twin and the built-in default."""
    defaults = ServeConfig()
    env_art = os.environ.get(ENV_PREFIX + "ARTIFACT")
    p.add_argument("artifact", nargs="?" if env_art else None, default=env_art,
                   help=f"artifact folder (env {ENV_PREFIX}ARTIFACT)")
    for name, (conv, text) in _FLAGS.items():
        env = ENV_PREFIX + name.upper()
        default = getattr(defaults, name)
        shown = ("none" if name == "api_key" else "auto") if default is None else \
            ("on" if default is True else "off" if default is False else default)
        kw: dict[str, Any] = {"type": conv, "dest": name, "help": f"{text} [env {env}; default {shown}]"}
        raw = os.environ.get(env)
        kw["default"] = default if raw is None else raw  # argparse applies `type` to string defaults
        if conv is _bool:
            kw["nargs"] = "?"
            kw["const"] = True
        p.add_argument(f"--{_flag(name)}", **kw)


def config_from_args(a: argparse.Namespace) -> ServeConfig:
    names = {f.name for f in fields(ServeConfig)}
    values = {k: v for k, v in vars(a).items() if k in names}
    for k, v in values.items():  # a string default from the environment that argparse did not convert
        if isinstance(v, str) and k in _FLAGS and _FLAGS[k][0] is not str:
            try:
                values[k] = _FLAGS[k][0](v)
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise ConfigError(f"{ENV_PREFIX}{k.upper()}={v!r}: {e}") from None
    return ServeConfig(**values)
