"""``embed_corpus`` (``bge-edge embed-corpus``): a JSON lines or Parquet file -> Parquet shards, exactly once.

How exactly-once and resume work:
- The input is cut into shards of ``shard_rows`` consecutive rows: shard k is rows [k*S, (k+1)*S) of
  the file, so a row belongs to one shard and the cut never depends on timing or on Ray.
- Shard k is finished when ``shard-0000k.parquet`` exists. It is written only when all of its rows
  are back (each row carries its input position; the set must be exactly the shard's good rows, each
  once), to a temporary name first and renamed, so a crash leaves no half-written shard under a
  finished name. Its bad rows go to ``shard-0000k.errors.jsonl`` before the rename.
- A rerun reads ``manifest.json``, refuses when the input, the artifact or the settings differ, skips
  finished shards and embeds only the others. Leftover temporary files are deleted.
- A Ray worker that dies is replaced and its batches re-run (Ray Data's actor-pool defaults); the
  shard check above turns any duplicate or loss into an error instead of a wrong shard.

Bad rows (missing, non-string or empty text; a JSON line that is not an object) never stop the job:
they are written with their id and reason to ``errors.jsonl`` and counted in the manifest.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bge_edge.runtime.errors import BgeEdgeError, InputError
from bge_edge.runtime.integrity import sha256_file
from bge_edge.runtime.manifest import read_manifest

from .dataset import COLBERT_DTYPES, ID_COLUMNS, OUTPUT_COLUMNS, check_texts, embed_dataset

__all__ = ["embed_corpus", "CorpusResult", "DEFAULT_SHARD_ROWS", "MANIFEST", "FORMAT"]

FORMAT = "bge-edge-corpus"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Rows per output file. Without ColBERT 10,000 rows are ~16 MB (MiniLM) to ~50 MB (BGE-M3 dense + sparse);
# ColBERT keeps ~200 x 1024 values per 200-token passage (~400 KB in float16), so its shards hold 1,000 rows.
DEFAULT_SHARD_ROWS = 10_000
DEFAULT_SHARD_ROWS_COLBERT = 1_000
# Shards handed to Ray at once (a "wave"): max(MIN_SHARDS_PER_WAVE, SHARDS_PER_WORKER x workers). The driver holds
# a wave's input and the outputs of its unfinished shards; each wave starts its workers afresh (model load).
SHARDS_PER_WORKER = 2
MIN_SHARDS_PER_WAVE = 8
ROW = "__bge_edge_row"  # input position, carried through Ray and dropped before writing


@dataclass
class CorpusResult:
    """What one ``embed_corpus`` call did."""

    out: Path
    shards: int = 0
    shards_skipped: int = 0  # finished by an earlier run
    rows: int = 0  # rows embedded by this call
    bad_rows: int = 0  # over the whole corpus, from errors.jsonl
    seconds: float = 0.0
    ray_start_seconds: float = 0.0  # ray.init (local start or connect), inside `seconds`
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def _errors_name(k: int) -> str:
    return f"shard-{k:05d}.errors.jsonl"


def _input_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")):
        return "jsonl"
    raise InputError(f"{path}: cannot tell the format from the name; use .jsonl / .jsonl.gz (JSON lines, one "
                     f"object per line) or .parquet.")


def _raw_shards(path: Path, fmt: str, shard_rows: int) -> Iterator[tuple[int, Any]]:
    """(k, raw rows of shard k): a list of JSON lines (unparsed) or a pyarrow Table. Blank lines are not rows."""
    if fmt == "parquet":
        pf = pq.ParquetFile(path)
        buf: list[pa.RecordBatch] = []
        have, k = 0, 0
        for rb in pf.iter_batches(batch_size=min(shard_rows, 65_536)):
            buf.append(rb)
            have += rb.num_rows
            while have >= shard_rows:
                t = pa.Table.from_batches(buf)
                yield k, t.slice(0, shard_rows)
                rest = t.slice(shard_rows)
                buf, have, k = rest.to_batches(), rest.num_rows, k + 1
        if have:
            yield k, pa.Table.from_batches(buf, schema=pf.schema_arrow)
        return
    opener: Any = gzip.open if path.name.lower().endswith(".gz") else open
    lines: list[str] = []
    k = 0
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            lines.append(line)
            if len(lines) == shard_rows:
                yield k, lines
                lines, k = [], k + 1
    if lines:
        yield k, lines


def _parse_shard(k: int, raw: Any, shard_rows: int, text_column: str, id_column: str | None,
                 ) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Good rows of shard k as a Table with their input positions in ROW, and error records for the bad ones."""
    first = k * shard_rows
    errors: list[dict[str, Any]] = []
    if isinstance(raw, pa.Table):
        table = raw
        if text_column not in table.column_names:
            raise InputError(f"the input has no column {text_column!r} (columns: {table.column_names}); "
                             f"pass --text-column.")
        bad = check_texts(table.column(text_column).to_pylist())
        id_col = id_column or next((c for c in ID_COLUMNS if c in table.column_names), None)
        ids = table.column(id_col).to_pylist() if id_col and id_col in table.column_names else None
        for i, why in bad:
            errors.append({"row": first + i, "id": ids[i] if ids else None, "reason": why})
        keep = np.ones(table.num_rows, bool)
        keep[[i for i, _ in bad]] = False
        table = table.append_column(ROW, pa.array(np.arange(first, first + table.num_rows, dtype=np.int64)))
        return table.filter(pa.array(keep)), errors
    rows: list[dict[str, Any]] = []
    positions: list[int] = []
    for i, line in enumerate(raw):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append({"row": first + i, "id": None, "reason": f"not JSON ({e.msg} at column {e.colno})"})
            continue
        if not isinstance(obj, dict):
            errors.append({"row": first + i, "id": None, "reason": f"a JSON {type(obj).__name__}, not an object"})
            continue
        bad = check_texts([obj.get(text_column)])
        if bad:
            id_col = id_column or next((c for c in ID_COLUMNS if c in obj), None)
            errors.append({"row": first + i, "id": obj.get(id_col) if id_col else None, "reason": bad[0][1]})
            continue
        rows.append(obj)
        positions.append(first + i)
    columns = dict.fromkeys(k for r in rows for k in r)  # every field any row has, first-seen order
    try:
        table = pa.Table.from_pydict({c: [r.get(c) for r in rows] for c in columns})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"shard {k} (input rows {first}..{first + len(raw) - 1}): the JSON objects do not fit one "
                         f"table ({e}); give every row the same fields with the same types.") from None
    return table.append_column(ROW, pa.array(positions, pa.int64())), errors


def _job_record(input_path: Path, artifact: Path, precision: str | None, text_column: str, shard_rows: int,
                return_sparse: bool, return_colbert_vecs: bool, colbert_dtype: str) -> dict[str, Any]:
    m = read_manifest(artifact)
    return {"input": {"path": str(input_path), "size": input_path.stat().st_size, "sha256": sha256_file(input_path)},
            "artifact": {"path": str(artifact), "manifest_sha256": sha256_file(artifact / "manifest.json"),
                         "model": m.source.get("model_id"), "kind": m.kind, "hidden_size": m.hidden_size},
            "precision": precision, "text_column": text_column, "shard_rows": shard_rows,
            "heads": ["dense"] + (["sparse"] if return_sparse else []) + (["colbert"] if return_colbert_vecs else []),
            "colbert_dtype": colbert_dtype if return_colbert_vecs else None}


def _identity(job: Any) -> dict[str, Any]:
    """The job record without file paths: moving the input or the artifact does not make it another job."""
    if not isinstance(job, dict):
        return {}
    return {k: ({kk: vv for kk, vv in v.items() if kk != "path"} if isinstance(v, dict) else v)
            for k, v in job.items()}


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class _Progress:
    """One stderr line per finished shard (and per 5 s at most otherwise): rows done, rows/s, shards."""

    def __init__(self, total_shards: int, skipped: int, stream: Any) -> None:
        self.total, self.skipped, self.stream = total_shards, skipped, stream
        self.t0 = self.last = time.perf_counter()
        self.rows = self.shards = 0

    def update(self, rows: int, shard_done: bool) -> None:
        self.rows += rows
        self.shards += shard_done
        now = time.perf_counter()
        if self.stream is None or not (shard_done or now - self.last > 5):
            return
        self.last = now
        rate = self.rows / max(now - self.t0, 1e-9)
        end = "\r" if getattr(self.stream, "isatty", lambda: False)() else "\n"
        total = f"/{self.total}" if self.total else ""
        print(f"bge-edge: {self.skipped + self.shards}{total} shards done, {self.rows:,} rows embedded, "
              f"{rate:,.0f} rows/s", file=self.stream, end=end, flush=True)


def embed_corpus(input_path: str | os.PathLike[str], artifact: str | os.PathLike[str], out: str | os.PathLike[str],
                 *, address: str | None = None, concurrency: int | None = None,
                 threads_per_worker: int | None = None, return_sparse: bool = False,
                 return_colbert_vecs: bool = False, colbert_dtype: str = "float32", text_column: str = "text",
                 id_column: str | None = None, precision: str | None = None, shard_rows: int | None = None,
                 batch_size: int | None = None, progress: Any = sys.stderr,
                 on_shard: Callable[[int], None] | None = None) -> CorpusResult:
    """Embed ``input_path`` into Parquet shards under ``out`` (see the module docstring); resumable.

    address: a Ray cluster to join (None: the running Ray of this process, else a local one started and
    stopped here). The artifact must be at the same path on every node. shard_rows: rows per output file
    (default 10,000; 1,000 with ColBERT). on_shard(k) is called after shard k is on disk.
    """
    import ray
    import ray.data

    t_start = time.perf_counter()
    src, art, dst = Path(input_path).resolve(), Path(artifact).resolve(), Path(out)
    if not src.is_file():
        raise InputError(f"input {src} is not a file; give a .jsonl/.jsonl.gz or .parquet file.")
    fmt = _input_format(src)
    if shard_rows is None:
        shard_rows = DEFAULT_SHARD_ROWS_COLBERT if return_colbert_vecs else DEFAULT_SHARD_ROWS
    if not isinstance(shard_rows, int) or isinstance(shard_rows, bool) or shard_rows < 1:
        raise InputError(f"shard_rows must be a positive integer, got {shard_rows!r}.")
    if colbert_dtype not in COLBERT_DTYPES:
        raise InputError(f"colbert_dtype must be one of {COLBERT_DTYPES}, got {colbert_dtype!r}.")
    job = _job_record(src, art, precision, text_column, shard_rows, return_sparse, return_colbert_vecs,
                      colbert_dtype)
    dst.mkdir(parents=True, exist_ok=True)
    mpath = dst / MANIFEST
    if mpath.is_file():
        try:
            old = json.loads(mpath.read_text(encoding="utf-8"))
        except ValueError as e:
            raise BgeEdgeError(f"{mpath} is not valid JSON ({e}); it is not a bge-edge output folder.") from None
        if old.get("format") != FORMAT or _identity(old.get("job")) != _identity(job):
            diff = sorted(k for k in job if _identity(old.get("job")).get(k) != _identity(job)[k])
            raise InputError(f"{dst} holds the output of a different job (differs in {diff}); resume needs the "
                             f"same input, artifact and settings. Use a new --out or delete {dst}.")
    else:
        if any(dst.glob("shard-*.parquet")):
            raise InputError(f"{dst} holds shards but no {MANIFEST}; use an empty --out folder.")
        _write_json_atomic(mpath, {"format": FORMAT, "version": FORMAT_VERSION, "complete": False, "job": job})
    for stale in dst.glob(".shard-*.tmp"):  # a temp shard of an interrupted run: never a finished shard
        stale.unlink()

    started_ray = False
    t_ray = time.perf_counter()
    if address is not None:
        ray.init(address=address)
        started_ray = True
    elif not ray.is_initialized():
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        started_ray = True
    res_ray_start = time.perf_counter() - t_ray
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # our own progress line instead
    res = CorpusResult(out=dst, ray_start_seconds=res_ray_start)
    try:
        threads = threads_per_worker or 1
        workers = concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
        pending: list[tuple[int, Any]] = []
        n_shards = 0
        prog = _Progress(-(-pq.read_metadata(src).num_rows // shard_rows) if fmt == "parquet" else 0, 0, progress)

        def run(wave: list[tuple[int, Any]]) -> None:
            parsed = {k: _parse_shard(k, raw, shard_rows, text_column, id_column) for k, raw in wave}
            _embed_wave(parsed, dst, art, workers, threads, precision, text_column, return_sparse,
                        return_colbert_vecs, colbert_dtype, id_column, batch_size, prog, on_shard, res)

        for k, raw in _raw_shards(src, fmt, shard_rows):
            n_shards = k + 1
            if (dst / _shard_name(k)).is_file():
                res.shards_skipped += 1
                prog.skipped += 1
                continue
            pending.append((k, raw))
            if len(pending) >= max(MIN_SHARDS_PER_WAVE, workers * SHARDS_PER_WORKER):
                run(pending)
                pending = []
        if pending:
            run(pending)
    finally:
        ctx.enable_progress_bars = bars
        if started_ray:
            ray.shutdown()
    res.shards = n_shards
    res.manifest = _finish(dst, job, n_shards)
    res.bad_rows = res.manifest["bad_rows"]
    res.seconds = time.perf_counter() - t_start
    return res


def _embed_wave(parsed: dict[int, tuple[pa.Table, list[dict[str, Any]]]], dst: Path, art: Path, workers: int,
                threads: int, precision: str | None, text_column: str, return_sparse: bool,
                return_colbert_vecs: bool, colbert_dtype: str, id_column: str | None, batch_size: int | None,
                prog: _Progress, on_shard: Callable[[int], None] | None, res: CorpusResult) -> None:
    """Embed some shards on Ray and write each one as soon as all of its rows are back."""
    import ray.data

    expected = {k: t.column(ROW).to_numpy() for k, (t, _) in parsed.items()}
    got: dict[int, list[pa.Table]] = {k: [] for k in parsed}
    counts = dict.fromkeys(parsed, 0)
    for k, (t, errs) in parsed.items():
        if t.num_rows == 0:  # every row bad: the shard is its errors file
            _write_shard(dst, k, [t], expected[k], errs)
            prog.update(0, True)
            if on_shard:
                on_shard(k)
    tables = [t for t, _ in parsed.values() if t.num_rows]
    if not tables:
        return
    ds = ray.data.from_arrow(tables)
    ds = embed_dataset(ds, art, text_column=text_column, precision=precision, return_sparse=return_sparse,
                       return_colbert_vecs=return_colbert_vecs, concurrency=workers, threads_per_worker=threads,
                       batch_size=batch_size, colbert_dtype=colbert_dtype, id_column=id_column)
    bounds = sorted((int(v[0]), k) for k, v in expected.items() if v.size)
    starts = np.array([b for b, _ in bounds])
    keys = [k for _, k in bounds]
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    try:
        _collect(batches, starts, keys, expected, got, counts, parsed, dst, prog, on_shard, res)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops the Ray execution (and frees its workers) when interrupted
    missing = [k for k in got if counts[k] < expected[k].shape[0]]
    if missing:
        raise BgeEdgeError(f"Ray returned fewer rows than sent for shard(s) {missing}; nothing was written for "
                           f"them. Rerun the same command to retry them.")


def _collect(batches: Any, starts: np.ndarray, keys: list[int], expected: dict[int, np.ndarray],
             got: dict[int, list[pa.Table]], counts: dict[int, int], parsed: dict[int, Any], dst: Path,
             prog: _Progress, on_shard: Callable[[int], None] | None, res: CorpusResult) -> None:
    for batch in batches:
        rows = batch.column(ROW).to_numpy()
        which = np.searchsorted(starts, rows, side="right") - 1
        for j in np.unique(which):
            k = keys[int(j)]
            part = batch.filter(pa.array(which == j))
            got[k].append(part)
            counts[k] += part.num_rows
            done = counts[k] >= expected[k].shape[0]
            if done:
                _write_shard(dst, k, got.pop(k), expected[k], parsed[k][1])
                res.rows += counts[k]
            prog.update(part.num_rows, done)
            if done and on_shard:
                on_shard(k)


def _write_shard(dst: Path, k: int, parts: list[pa.Table], expected_rows: np.ndarray,
                 errors: list[dict[str, Any]]) -> None:
    table = pa.concat_tables(parts).sort_by(ROW)
    rows = table.column(ROW).to_numpy()
    if rows.shape != expected_rows.shape or not np.array_equal(rows, np.sort(expected_rows)):
        dup = int(rows.shape[0] - np.unique(rows).shape[0])
        raise BgeEdgeError(f"shard {k}: got {rows.shape[0]} rows ({dup} duplicated) for {expected_rows.shape[0]} "
                           f"sent; refusing to write it. Rerun the same command to retry this shard.")
    table = table.drop_columns([ROW])
    if errors:
        _write_json_lines(dst / _errors_name(k), errors)
    else:
        (dst / _errors_name(k)).unlink(missing_ok=True)
    final = dst / _shard_name(k)
    tmp = dst / f".{final.name}.{os.getpid()}.tmp"
    # Dictionary encoding suits the input's columns, not float vectors: on them it adds ~53 % (MiniLM dense: 2,355
    # vs 1,539 bytes/row for 1,536 raw bytes), so it is kept for the input's columns only.
    pq.write_table(table, tmp, use_dictionary=[c for c in table.column_names if c not in OUTPUT_COLUMNS])
    os.replace(tmp, final)  # the shard is finished only now


def _write_json_lines(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def _finish(dst: Path, job: dict[str, Any], n_shards: int) -> dict[str, Any]:
    """Write errors.jsonl and the manifest (shard list, row counts, column types, sizes) once every shard exists."""
    shards, errors = [], []
    rows = 0
    schema = None
    for k in range(n_shards):
        f = dst / _shard_name(k)
        if not f.is_file():
            raise BgeEdgeError(f"{f} is missing after the run; rerun the same command to finish it.")
        meta = pq.read_metadata(f)
        schema = schema or pq.read_schema(f)
        e = dst / _errors_name(k)
        errs = [json.loads(x) for x in e.read_text(encoding="utf-8").splitlines()] if e.is_file() else []
        errors.extend(errs)
        rows += meta.num_rows
        shards.append({"file": f.name, "rows": meta.num_rows, "bad_rows": len(errs), "bytes": f.stat().st_size})
    _write_json_lines(dst / "errors.jsonl", errors)
    columns = {}
    if schema is not None:
        columns = {n: str(schema.field(n).type) for n in schema.names if n in OUTPUT_COLUMNS}
        sizes = {n: sum(_column_bytes(dst / s["file"], n) for s in shards) for n in columns}
    else:
        sizes = {}
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "complete": True, "job": job, "rows": rows,
                "bad_rows": len(errors), "errors_file": "errors.jsonl", "columns": columns,
                "column_bytes": sizes, "shards": shards}
    _write_json_atomic(dst / MANIFEST, manifest)
    return manifest


def _column_bytes(path: Path, name: str) -> int:
    """Compressed bytes of one column in one Parquet file (sum over row groups)."""
    meta = pq.read_metadata(path)
    total = 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            if col.path_in_schema.split(".")[0] == name:
                total += col.total_compressed_size
    return total
