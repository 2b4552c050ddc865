"""bge_edge.ray on a local Ray (one ``ray.init(num_cpus=2)`` for the module, bound to 127.0.0.1, shut down after).

Parity: 2,000 SciFact texts through 2 workers equal ``Embedder.encode`` (tiny BGE-M3, FP32, all three heads, max
abs <= 1e-5; real all-MiniLM-L6-v2 FP32 and INT8 on SciFact titles, slow). Exactly once: a worker killed mid-job,
an ``embed_corpus`` interrupted after two shards and rerun, and the shard check itself.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.data
from bge_edge.runtime import Embedder

from bge_edge.ray import embed_corpus, embed_dataset

N_TEXTS = 2000


@pytest.fixture(scope="module")
def ray_local() -> Any:
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def scifact(scifact_dir: Path) -> list[dict[str, str]]:
    """The first 2,000 SciFact documents: id, title, text (title + " " + text, MTEB's document text)."""
    rows = []
    with gzip.open(scifact_dir / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append({"id": r["_id"], "title": r["title"], "text": (r["title"] + " " + r["text"]).strip()})
            if len(rows) == N_TEXTS:
                break
    return rows


def _table(ds: Any) -> Any:
    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def _by_id(table: Any, ids: list[str]) -> Any:
    got = table.column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(set(got)) == len(got), "every row exactly once"
    pos = {v: i for i, v in enumerate(got)}
    return table.take(pa.array([pos[i] for i in ids]))


def _dense(table: Any) -> np.ndarray:
    col = pa.concat_arrays(table.column("dense_vecs").chunks)
    return col.flatten().to_numpy().reshape(table.num_rows, -1)


def _assert_rows_equal(table: Any, ref: dict[str, Any], atol: float, colbert_atol: float | None = None) -> None:
    np.testing.assert_allclose(_dense(table), ref["dense_vecs"], rtol=0, atol=atol)
    if ref.get("lexical_weights") is not None:
        for got, want in zip(table.column("lexical_weights").to_pylist(), ref["lexical_weights"]):
            assert [k for k, _ in got] == sorted(int(t) for t in want)
            np.testing.assert_allclose([v for _, v in got], [want[str(k)] for k, _ in got], rtol=0, atol=atol)
    if ref.get("colbert_vecs") is not None:
        for got, want in zip(table.column("colbert_vecs").to_pylist(), ref["colbert_vecs"]):
            np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=colbert_atol or atol)


def test_2000_scifact_texts_through_2_workers_equal_embedder_encode(ray_local: Any, m3_artifact: Path,
                                                                     scifact: list[dict[str, str]]) -> None:
    texts = [r["title"] for r in scifact]  # titles: 2,000 real texts that the tiny model embeds in seconds
    ids = [r["id"] for r in scifact]
    ds = ray.data.from_items([{"id": i, "text": t, "n": k} for k, (i, t) in enumerate(zip(ids, texts))])
    out = embed_dataset(ds, m3_artifact, precision="fp32", return_sparse=True, return_colbert_vecs=True,
                        concurrency=2, batch_size=200)
    table = _by_id(_table(out), ids)
    assert table.column("n").to_pylist() == list(range(N_TEXTS))  # other columns kept, row for row
    assert str(table.schema.field("dense_vecs").type) == "fixed_size_list<item: float>[32]"
    assert str(table.schema.field("lexical_weights").type).startswith("map<int32, float")
    ref = Embedder(m3_artifact, precision="fp32").encode(texts, return_sparse=True, return_colbert_vecs=True)
    _assert_rows_equal(table, ref, atol=1e-5)


def test_colbert_float16_halves_storage_within_1e3(ray_local: Any, m3_artifact: Path,
                                                   scifact: list[dict[str, str]]) -> None:
    texts = [r["title"] for r in scifact[:100]]
    ds = ray.data.from_items([{"id": str(k), "text": t} for k, t in enumerate(texts)])
    table = _table(embed_dataset(ds, m3_artifact, precision="fp32", return_colbert_vecs=True, concurrency=1,
                                 colbert_dtype="float16"))
    table = _by_id(table, [str(k) for k in range(len(texts))])
    assert str(table.schema.field("colbert_vecs").type.value_type.value_type) == "halffloat"
    ref = Embedder(m3_artifact, precision="fp32").encode(texts, return_colbert_vecs=True)
    _assert_rows_equal(table, ref, atol=1e-5, colbert_atol=1e-3)


def test_killing_a_worker_mid_job_still_yields_every_row_exactly_once(ray_local: Any, m3_artifact: Path,
                                                                      scifact: list[dict[str, str]]) -> None:
    rows = scifact[:400]  # full documents: ~10 s of work for the two workers, so the kill lands mid-job
    ds = ray.data.from_items([{"id": r["id"], "text": r["text"]} for r in rows])
    out = embed_dataset(ds, m3_artifact, precision="fp32", concurrency=2, batch_size=10)
    parts, killed, rows_before_kill = [], None, 0
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
        parts.append(batch)
        if killed is None:
            rows_before_kill = sum(p.num_rows for p in parts)
            killed = _kill_one_worker()
    assert killed is not None, "no embedding worker process found to kill"
    assert rows_before_kill < len(rows), "the kill came after every row was back"
    table = _by_id(pa.concat_tables(parts), [r["id"] for r in rows])  # asserts exactly once
    ref = Embedder(m3_artifact, precision="fp32").encode([r["text"] for r in rows])
    _assert_rows_equal(table, ref, atol=1e-5)


def _kill_one_worker() -> int | None:
    """SIGKILL one Ray Data worker process of *this* test's Ray (a descendant of this process), return its pid."""
    me = os.getpid()
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            procs[int(d.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)

    def mine(pid: int) -> bool:
        while pid > 1:
            pid = procs.get(pid, (1, ""))[0]
            if pid == me:
                return True
        return False

    for pid, (_, cmd) in procs.items():
        if "MapWorker" in cmd and "_EmbedWorker" in cmd and mine(pid):
            os.kill(pid, signal.SIGKILL)
            return pid
    return None


def test_a_worker_whose_artifact_differs_fails_the_job_naming_both_digests(ray_local: Any, m3_artifact: Path,
                                                                          tmp_path: Path) -> None:
    art = tmp_path / "m3"
    shutil.copytree(m3_artifact, art)
    ds = ray.data.from_items([{"text": "hello"}])
    out = embed_dataset(ds, art, precision="fp32", concurrency=1)  # the driver reads the digest now
    manifest = art / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")  # the copy the worker will read differs
    with pytest.raises(Exception) as e:
        out.take_all()
    msg = str(e.value)
    assert "this node holds a different artifact" in msg and "the driver's copy has" in msg


def test_bad_rows_fail_the_dataset_naming_their_ids(ray_local: Any, m3_artifact: Path) -> None:
    ds = ray.data.from_items([{"id": "a", "text": "ok"}, {"id": "b", "text": ""}, {"id": "c", "text": None},
                              {"id": "d", "text": "fine"}])
    with pytest.raises(Exception) as e:
        embed_dataset(ds, m3_artifact, precision="fp32", concurrency=1, batch_size=4).take_all()
    msg = str(e.value)
    assert "id 'b': text is empty" in msg and "id 'c': text is missing (null)" in msg
    assert "'a'" not in msg.split("row(s) have no text")[1]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _read_out(out: Path) -> Any:
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"]
    return pa.concat_tables([pq.read_table(out / s["file"]) for s in m["shards"]]), m


def test_embed_corpus_rerun_after_an_interruption_completes_without_duplicates(
        ray_local: Any, m3_artifact: Path, scifact: list[dict[str, str]], tmp_path: Path) -> None:
    rows = [{"id": r["id"], "text": r["title"]} for r in scifact]
    rows[3]["text"] = ""  # a bad row: errors.jsonl, not a failure
    src = _write_jsonl(tmp_path / "corpus.jsonl", rows)
    out = tmp_path / "out"
    done: list[int] = []

    def interrupt_after_two(k: int) -> None:
        done.append(k)
        if len(done) == 2:
            raise KeyboardInterrupt

    kw: dict[str, Any] = dict(precision="fp32", return_sparse=True, concurrency=2, shard_rows=250, batch_size=50,
                              progress=None)
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(src, m3_artifact, out, on_shard=interrupt_after_two, **kw)
    first = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert len(first) == 2 and not json.loads((out / "manifest.json").read_text())["complete"]
    (out / ".shard-00005.parquet.999.tmp").write_bytes(b"half a shard")  # what a crash mid-write leaves
    stamps = {n: (out / n).stat().st_mtime_ns for n in first}

    r = embed_corpus(src, m3_artifact, out, **kw)
    before = sum(249 if n == "shard-00000.parquet" else 250 for n in first)  # row 3 of shard 0 is bad
    assert r.shards == 8 and r.shards_skipped == 2 and r.rows == N_TEXTS - 1 - before
    assert {n: (out / n).stat().st_mtime_ns for n in first} == stamps  # finished shards were not rewritten
    assert not list(out.glob(".*.tmp"))
    table, manifest = _read_out(out)
    good = [x for x in rows if x["text"]]
    assert table.column("id").to_pylist() == [x["id"] for x in good]  # every row once, in input order
    assert manifest["rows"] == N_TEXTS - 1 and manifest["bad_rows"] == 1
    assert [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()] == \
        [{"row": 3, "id": rows[3]["id"], "reason": "text is empty"}]
    ref = Embedder(m3_artifact, precision="fp32").encode([x["text"] for x in good], return_sparse=True)
    _assert_rows_equal(table, ref, atol=1e-5)

    with pytest.raises(Exception, match="different job"):  # resuming with other settings is refused
        embed_corpus(src, m3_artifact, out, **{**kw, "shard_rows": 100})


def test_cli_embed_corpus_joins_a_cluster_with_address_and_feeds_packed_index(
        ray_local: Any, m3_artifact: Path, scifact: list[dict[str, str]], tmp_path: Path) -> None:
    from bge_edge.ray import index_from_parquet

    rows = [{"_id": r["id"], "text": r["title"], "year": k} for k, r in enumerate(scifact[:300])]
    rows[10]["text"] = None
    rows[11]["text"] = 7
    src = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "text": r["text"] if isinstance(r["text"], str) else None}
                                         for r in rows]), src)
    out = tmp_path / "out"
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "bge_edge.cli", "embed-corpus", str(src), "--artifact", str(m3_artifact), "--out",
           str(out), "--address", address, "--sparse", "--colbert", "--colbert-dtype", "float16", "--precision",
           "fp32", "--shard-rows", "128", "--concurrency", "1"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rows/s" in r.stderr and "2 bad row(s)" in r.stderr, r.stderr[-2000:]
    table, manifest = _read_out(out)
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{k}.parquet" for k in range(3)]
    assert table.column("year").to_pylist() == [k for k in range(300) if k not in (10, 11)]
    assert set(manifest["column_bytes"]) == {"dense_vecs", "lexical_weights", "colbert_vecs"}
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["id"]) for e in errors] == [(10, rows[10]["_id"]), (11, rows[11]["_id"])]
    assert time.perf_counter() - t0 < 300

    index = index_from_parquet(out, colbert_dtype="float16")
    assert len(index) == 298 and index.modes == ("dense", "sparse", "colbert")
    model = Embedder(m3_artifact, precision="fp32")
    q = model.encode(rows[42]["text"], return_sparse=True, return_colbert_vecs=True)
    idx, _ = index.search(q["dense_vecs"], q["lexical_weights"], q["colbert_vecs"], k=1)
    assert int(idx[0]) == 40  # row 42 of the input is document 40 (rows 10 and 11 were bad)


def test_missing_ray_extra_names_the_pip_install() -> None:
    code = ("import importlib.util as u; f = u.find_spec\n"
            "u.find_spec = lambda n, *a: None if n == 'ray' else f(n, *a)\n"
            "import bge_edge.ray")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "pip install 'bge-edge[ray]'" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_real_minilm_on_scifact_titles_equals_embedder(ray_local: Any, minilm_artifact: Path,
                                                       scifact: list[dict[str, str]], precision: str) -> None:
    """Real weights, 500 SciFact titles (~12k tokens per pass on 2 shared cores): rows from 2 workers x 100-row
    batches equal one encode call's to 1e-5, at FP32 and at INT8 (per-token activation scales: a row does not
    depend on its batch neighbours, export/int8.py)."""
    rows = scifact[:500]
    ids, texts = [r["id"] for r in rows], [r["title"] for r in rows]
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in zip(ids, texts)])
    ref = Embedder(minilm_artifact, precision=precision).encode(texts)["dense_vecs"]
    got = _dense(_by_id(_table(embed_dataset(ds, minilm_artifact, precision=precision, concurrency=2,
                                             batch_size=100)), ids))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_index_from_parquet_equals_add_of_the_same_encode(m3_artifact: Path, tmp_path: Path) -> None:
    from bge_edge.kernels import KernelInputError, PackedIndex
    from conftest import PARITY_TEXTS

    from bge_edge.ray import encoded_table, index_from_parquet

    model = Embedder(m3_artifact, precision="fp32")
    res = model.encode(PARITY_TEXTS, return_sparse=True, return_colbert_vecs=True)
    cols = encoded_table(res, model.manifest.hidden_size)
    half = len(PARITY_TEXTS) // 2
    for k, sl in enumerate((slice(0, half), slice(half, None))):  # two shards, read back in name order
        pq.write_table(pa.table({n: a[sl] for n, a in cols.items()}), tmp_path / f"part-{k}.parquet")
    got = index_from_parquet(tmp_path)
    want = PackedIndex()
    want.add(**res)
    assert len(got) == len(want) == len(PARITY_TEXTS)
    q = model.encode("dense sparse and multi vector", return_sparse=True, return_colbert_vecs=True)
    for w in ((1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1)):
        a = got.search(q["dense_vecs"], q["lexical_weights"], q["colbert_vecs"], k=5, weights=w)
        b = want.search(q["dense_vecs"], q["lexical_weights"], q["colbert_vecs"], k=5, weights=w)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-6)
    only_dense = index_from_parquet(tmp_path / "part-0.parquet", modes=["dense"])
    assert only_dense.modes == ("dense",) and len(only_dense) == half
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text('{"format": "bge-edge-corpus", "complete": false}')
    with pytest.raises(KernelInputError, match="not finished"):
        index_from_parquet(tmp_path / "out")


def test_packed_index_add_packed_equals_add_and_names_bad_offsets() -> None:
    from bge_edge.kernels import KernelInputError, PackedIndex

    rng = np.random.default_rng(0)
    dense = rng.standard_normal((3, 8)).astype(np.float32)
    lex = [{"7": 0.5, "2": 0.25}, {}, {"2": 1.0}]
    col = [rng.standard_normal((k, 8)).astype(np.float32) for k in (1, 4, 2)]
    a, b = PackedIndex(), PackedIndex()
    a.add(dense, lex, col)
    b.add_packed(dense, (np.array([7, 2, 2]), np.array([0.5, 0.25, 1.0], np.float32), np.array([0, 2, 2, 3])),
                 (np.concatenate(col), np.array([0, 1, 5, 7])))
    q = rng.standard_normal(8).astype(np.float32)
    for k in ("dense", "sparse", "colbert"):
        kw = {"query_dense": q} if k == "dense" else {"query_sparse": {"2": 1.0, "7": 2.0}} if k == "sparse" \
            else {"query_colbert": col[1]}
        np.testing.assert_allclose(a.search(**kw, k=3)[1], b.search(**kw, k=3)[1], rtol=0, atol=1e-6)
    with pytest.raises(KernelInputError, match="colbert offsets"):
        PackedIndex().add_packed(colbert=(np.concatenate(col), np.array([0, 1, 1, 7])))  # an empty document
    with pytest.raises(KernelInputError, match="one entry per document"):
        PackedIndex().add_packed(dense, colbert=(np.concatenate(col), np.array([0, 7])))


def test_jsonl_shard_parsing_keeps_every_field_and_names_bad_lines() -> None:
    from bge_edge.ray.corpus import ROW, _parse_shard

    lines = ['{"id": 1, "text": "a"}', '{"id": 2, "text": "b", "lang": "en"}', "[1, 2]", "not json",
             '{"_id": "x", "text": "  "}', '{"id": 6, "text": 5}']
    table, errors = _parse_shard(3, lines, 10, "text", None)
    assert table.column_names == ["id", "text", "lang", ROW]
    assert table.column("lang").to_pylist() == [None, "en"] and table.column(ROW).to_pylist() == [30, 31]
    assert [(e["row"], e["id"], e["reason"].split(" (")[0]) for e in errors] == [
        (32, None, "a JSON list, not an object"), (33, None, "not JSON"), (34, "x", "text is empty"),
        (35, 6, "text is int, not a string")]
