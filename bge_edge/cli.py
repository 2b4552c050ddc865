"""The ``bge-edge`` command: export, encode, rerank, info, verify, serve, bundle, embed-corpus.

Errors that a user can cause print one line (``bge-edge: error: ...``) and exit 2; the export
subcommand imports the heavy ``[export]`` extra only when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bge_edge.runtime.errors import BgeEdgeError

PROGRESS_EVERY = 1024  # texts per chunk in `encode`; progress goes to stderr after each chunk


def _export(a: argparse.Namespace) -> int:
    from bge_edge.export import export_model

    export_model(a.model, a.out, a.precision, kind=a.kind, force=a.force, min_int8_cosine=a.min_int8_cosine,
                 query_instruction=a.query_instruction, max_length=a.max_length, formats=a.format,
                 model_id=a.model_id, int8_recipe=a.int8_recipe)
    return 0


def _read_texts(path: str, jsonl: bool) -> list[str]:
    if path == "-":
        raw = sys.stdin.read()
    else:
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BgeEdgeError(f"cannot read --input {path}: {e}") from None
    lines = raw.splitlines()
    if not jsonl:
        _refuse_empty([(k, t) for k, t in enumerate(lines, 1)])
        return lines
    texts, numbered = [], []
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BgeEdgeError(f"--input line {k} is not JSON ({e}); with --jsonl each line is {{\"text\": ...}}.") \
                from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise BgeEdgeError(f"--input line {k} has no string field \"text\".")
        texts.append(obj["text"])
        numbered.append((k, obj["text"]))
    _refuse_empty(numbered)
    return texts


def _refuse_empty(numbered: list[tuple[int, str]]) -> None:
    """Empty texts are refused, as the server refuses them (400): an empty line is almost always a mistake."""
    empty = [k for k, t in numbered if not t]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise BgeEdgeError(f"--input line(s) {shown} hold an empty text; every text needs at least one character "
                           f"(the server refuses them too). Drop them first, e.g. grep -v '^$'.")


def _encode(a: argparse.Namespace) -> int:
    from bge_edge.runtime import Embedder

    texts = _read_texts(a.input, a.jsonl)
    if a.batch_size < 1:
        raise BgeEdgeError(f"--batch-size must be a positive integer, got {a.batch_size}.")
    if a.max_length is not None and a.max_length < 2:
        raise BgeEdgeError(f"--max-length must be an integer >= 2 (tokens), got {a.max_length}.")
    if a.no_dense and not (a.sparse or a.colbert):
        raise BgeEdgeError("--no-dense leaves nothing to output; add --sparse and/or --colbert (BGE-M3).")
    model = Embedder(a.artifact, precision=a.precision, backend=a.backend, device=a.device, threads=a.threads,
                     streams=a.streams, shapes=a.shapes)
    missing = [flag for flag, head in (("--sparse", "sparse"), ("--colbert", "colbert"))
               if getattr(a, head) and head not in model.manifest.heads]
    if missing:
        raise BgeEdgeError(f"{' and '.join(missing)} need(s) a BGE-M3 artifact; {a.artifact} "
                           f"({model.manifest.source.get('model_id')}, kind {model.manifest.kind!r}) has only the "
                           f"{list(model.manifest.heads)} head(s). Drop {' '.join(missing)}.")
    encode = model.encode_queries if a.queries else model.encode
    out = sys.stdout
    t0, done, tokens, truncated = time.perf_counter(), 0, 0, 0
    for start in range(0, len(texts), PROGRESS_EVERY):
        chunk = texts[start : start + PROGRESS_EVERY]
        res = encode(chunk, batch_size=a.batch_size, max_length=a.max_length, return_dense=not a.no_dense,
                     return_sparse=a.sparse, return_colbert_vecs=a.colbert)
        tokens += model.last_stats.tokens
        truncated += model.last_stats.truncated
        for k in range(len(chunk)):
            # FlagEmbedding's vocabulary, as in Python and the server: dense_vecs, lexical_weights, colbert_vecs
            rec: dict[str, Any] = {"index": start + k}
            if res["dense_vecs"] is not None:
                rec["dense_vecs"] = [round(float(x), 7) for x in res["dense_vecs"][k]]
            if res["lexical_weights"] is not None:
                rec["lexical_weights"] = {t: round(float(w), 7) for t, w in res["lexical_weights"][k].items()}
            if res["colbert_vecs"] is not None:
                rec["colbert_vecs"] = [[round(float(x), 7) for x in row] for row in res["colbert_vecs"][k]]
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        done += len(chunk)
        if len(texts) > PROGRESS_EVERY:
            el = time.perf_counter() - t0
            print(f"bge-edge: encoded {done}/{len(texts)} texts, {tokens / el:,.0f} tokens/s", file=sys.stderr)
    out.flush()
    if truncated:
        print(f"bge-edge: {truncated} of {len(texts)} texts were truncated to the max length", file=sys.stderr)
    return 0


def _rerank(a: argparse.Namespace) -> int:
    from bge_edge.runtime import Reranker

    passages = _read_texts(a.input, a.jsonl)
    model = Reranker(a.artifact, precision=a.precision, backend=a.backend, device=a.device, threads=a.threads)
    ranked = model.rerank(a.query, passages, top_k=a.top_k, batch_size=a.batch_size, max_length=a.max_length,
                          normalize=a.normalize)
    out = sys.stdout
    for i, score in ranked:
        out.write(json.dumps({"index": i, "score": round(score, 8), "text": passages[i]}, ensure_ascii=False) + "\n")
    out.flush()
    if model.last_stats.truncated:
        print(f"bge-edge: {model.last_stats.truncated} of {len(passages)} (query, passage) pairs were truncated to "
              f"{a.max_length} tokens (--max-length)", file=sys.stderr)
    return 0


def _info(a: argparse.Namespace) -> int:
    import onnxruntime as ort

    from bge_edge.runtime import read_manifest
    from bge_edge.runtime.session import build_providers, choose_backend

    m = read_manifest(a.artifact)
    available = ort.get_available_providers()
    try:
        backend, reason = choose_backend(m, a.backend, a.device, None)
        if backend == "openvino":
            chosen, why = ["OpenVINO CPU"], f"backend={a.backend!r}: {reason}"
        else:
            chosen = [p for p, _ in build_providers(a.device, available)]
            why = f"backend={a.backend!r}: {reason}; device={a.device!r}; onnxruntime {ort.__version__} offers " \
                  f"{available}"
    except BgeEdgeError as e:
        backend, chosen, why = "none", [], str(e)
    info = {"artifact": str(a.artifact), "source": dict(m.source), "kind": m.kind, "heads": list(m.heads),
            "pooling": m.pooling, "hidden_size": m.hidden_size, "max_length": m.max_length,
            "query_instruction": m.query_instruction,
            "graphs": [{"file": g.file, "format": g.format, "precision": g.precision, "cpu_target": g.cpu_target,
                        "size_mb": round(sum(m.files[f].size for f in (g.file, *g.external_data)) / 1e6, 1),
                        "quantization": dict(g.quantization), "accuracy": dict(g.accuracy)}
                       for g in m.graphs],
            "backend": backend, "providers": chosen, "why": why, "exporter": dict(m.exporter),
            "created": m.created}
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


def _verify(a: argparse.Namespace) -> int:
    if (Path(a.artifact) / "bundle.json").is_file() or Path(a.artifact).is_file():
        # an air-gapped bundle folder or archive: checked against bundle.json without installing
        from bge_edge.bundle import verify_bundle

        print(verify_bundle(a.artifact))
        return 0
    from bge_edge.runtime import read_manifest
    from bge_edge.runtime.integrity import check_external_data, verify_files

    m = read_manifest(a.artifact)
    root = Path(a.artifact)
    verify_files(root, m, list(m.files), cache_dir=None)
    for g in m.graphs:
        if g.format == "onnx":
            check_external_data(root, g.file, g.external_data)
    unlisted = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                      if p.is_file() and p.name != "manifest.json" and p.relative_to(root).as_posix() not in m.files)
    total = sum(e.size for e in m.files.values())
    print(f"ok: {len(m.files)} files ({total / 1e6:.1f} MB) match manifest.json sizes and SHA-256")
    if unlisted:
        print(f"note: {len(unlisted)} file(s) not in the manifest are ignored by the runtime: {unlisted}")
    return 0


def _bundle(a: argparse.Namespace) -> int:
    from bge_edge.bundle import build_bundle

    r = build_bundle(a.artifact, a.out, platforms=a.platform, pythons=a.python, precisions=a.precision,
                     extras=a.extras or (), archive=a.archive, force=a.force, wheel=a.wheel)
    mb = {k: round(v / 1e6, 1) for k, v in r.sizes.items()}
    print(f"bundle: {', '.join(str(p) for p in r.outputs)}")
    print(f"  targets: {', '.join(t['platform'] + '/cp' + t['python'].replace('.', '') for t in r.targets)}; "
          f"artifact {r.artifact['kind']} at {', '.join(r.artifact['precisions'])}; MB {mb}")
    print(f"  bundle.json SHA-256: {r.bundle_sha256} (give it to the target: install.sh --expect-sha256 ...)")
    print(f"  install offline: {'./' + r.outputs[1].name if a.archive else str(r.outputs[0]) + '/install.sh'}")
    return 0


def _embed_corpus(a: argparse.Namespace) -> int:
    from bge_edge.ray import embed_corpus

    r = embed_corpus(a.input, a.artifact, a.out, address=a.address, concurrency=a.concurrency,
                     threads_per_worker=a.threads_per_worker, return_sparse=a.sparse, return_colbert_vecs=a.colbert,
                     colbert_dtype=a.colbert_dtype, text_column=a.text_column, id_column=a.id_column,
                     precision=a.precision, shard_rows=a.shard_rows, batch_size=a.batch_size)
    print(f"embed-corpus: {r.manifest['rows']:,} rows in {r.shards} shards under {r.out} ({r.shards_skipped} "
          f"finished earlier); this run {r.rows:,} rows in {r.seconds:,.1f} s ({r.rows_per_second:,.0f} rows/s)")
    if r.bad_rows:
        print(f"embed-corpus: {r.bad_rows} bad row(s) skipped, listed with id and reason in "
              f"{r.out / 'errors.jsonl'}", file=sys.stderr)
    return 0


def _serve(a: argparse.Namespace) -> int:
    from bge_edge.serve import run
    from bge_edge.serve.config import config_from_args

    return run(config_from_args(a))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bge-edge", description="Fast, lean BGE embeddings on CPUs.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export a model folder or hub id to an artifact folder (needs [export])")
    e.add_argument("model", help="local Hugging Face folder, or a hub id such as BAAI/bge-m3 (needs network)")
    e.add_argument("--out", required=True, help="artifact folder to create")
    e.add_argument("--precision", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8", "fp16"])
    e.add_argument("--format", nargs="+", default=["onnx"], choices=["onnx", "openvino"],
                   help="graph formats: onnx (ONNX Runtime), openvino (IR; needs the [openvino] extra)")
    e.add_argument("--kind", default="auto", choices=["auto", "m3", "dense", "reranker"],
                   help="auto: reranker for a one-label sequence classifier, m3 for XLM-R, dense for BERT")
    e.add_argument("--force", action="store_true", help="replace an existing --out")
    e.add_argument("--min-int8-cosine", type=float, default=0.99,
                   help="refuse INT8 whose mean dense cosine (rerankers: score Pearson correlation) to FP32 is below "
                        "this (0 for random-weight models)")
    e.add_argument("--int8-recipe", default="per-token", choices=["per-token", "dynamic"],  # export's INT8_RECIPES
                   help="ONNX int8: per-token (default: a text's output never depends on its batch) or dynamic "
                        "(ONNX Runtime's per-batch scales: faster on AVX2 without VNNI, but batch-dependent and "
                        "less close to fp32)")
    e.add_argument("--query-instruction", default=None, help="override the query instruction recorded")
    e.add_argument("--max-length", type=int, default=None, help="override the model's max length")
    e.add_argument("--model-id", default=None,
                   help="the name the artifact carries (manifest, /v1/models, logs); default: the hub id, or what "
                        "the folder says (HF cache path, model card, config.json _name_or_path)")
    e.set_defaults(func=_export)

    c = sub.add_parser("encode", help="encode texts (one per line) to JSON lines")
    c.add_argument("artifact")
    c.add_argument("--input", default="-", help="file with one text per line, or - for stdin (default)")
    c.add_argument("--jsonl", action="store_true", help="input lines are JSON objects with a \"text\" field")
    c.add_argument("--precision", default=None, choices=["fp32", "int8", "fp16"])
    c.add_argument("--backend", default="auto", choices=["onnxruntime", "openvino", "auto"],
                   help="auto: OpenVINO when installed and the artifact has it, else ONNX Runtime")
    c.add_argument("--device", default="cpu")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--streams", type=int, default=1, help="OpenVINO: batches computing at once (throughput)")
    c.add_argument("--shapes", default="dynamic", choices=["dynamic", "bucket"],
                   help="OpenVINO: 'bucket' compiles a plan per bucket length (~0.5 s, ~95 MB each; for large inputs)")
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--max-length", type=int, default=None)
    c.add_argument("--no-dense", action="store_true")
    c.add_argument("--sparse", action="store_true", help="also output lexical weights (BGE-M3)")
    c.add_argument("--colbert", action="store_true", help="also output ColBERT vectors (BGE-M3)")
    c.add_argument("--queries", action="store_true", help="prepend the model's query instruction")
    c.set_defaults(func=_encode)

    r = sub.add_parser("rerank", help="rerank passages (one per line) for a query with a reranker artifact; JSON "
                                      "lines {index, score, text}, best first")
    r.add_argument("artifact", help="reranker artifact folder (bge-reranker-v2-m3, -base, -large)")
    r.add_argument("--query", required=True, help="the query")
    r.add_argument("--input", default="-", help="file with one passage per line, or - for stdin (default)")
    r.add_argument("--jsonl", action="store_true", help="input lines are JSON objects with a \"text\" field")
    r.add_argument("--top-k", type=int, default=None, help="print only the best K (default: all)")
    r.add_argument("--max-length", type=int, default=512,
                   help="tokens per (query, passage) pair, FlagReranker's default 512 (up to the model's limit)")
    r.add_argument("--normalize", action="store_true", help="sigmoid of the raw score (0..1)")
    r.add_argument("--precision", default=None, choices=["fp32", "int8", "fp16"])
    r.add_argument("--backend", default="auto", choices=["onnxruntime", "openvino", "auto"])
    r.add_argument("--device", default="cpu")
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--batch-size", type=int, default=128)
    r.set_defaults(func=_rerank)

    i = sub.add_parser("info", help="describe an artifact and the backend that would run it")
    i.add_argument("artifact")
    i.add_argument("--backend", default="auto", choices=["onnxruntime", "openvino", "auto"])
    i.add_argument("--device", default="cpu")
    i.set_defaults(func=_info)

    v = sub.add_parser("verify", help="check every artifact file against the manifest (size + SHA-256); also "
                                      "accepts an air-gapped bundle folder or .tar.gz (checked against bundle.json)")
    v.add_argument("artifact", help="artifact folder, bundle folder, or bundle archive")
    v.set_defaults(func=_verify)

    b = sub.add_parser("bundle", help="build an air-gapped bundle: wheels for each target + the artifact + "
                                      "install scripts, every file hashed (needs network to PyPI)")
    b.add_argument("artifact", help="artifact folder (from `bge-edge export`)")
    b.add_argument("--out", required=True, help="bundle folder to create (with --archive: OUT.tar.gz)")
    b.add_argument("--platform", action="extend", nargs="+", default=None,
                   help="wheel platform tags, repeatable (default: this machine), e.g. manylinux_2_28_x86_64 "
                        "manylinux_2_28_aarch64 win_amd64 macosx_11_0_arm64")
    b.add_argument("--python", action="extend", nargs="+", default=None,
                   help="CPython versions, repeatable (default: this one), e.g. 3.11 3.12")
    b.add_argument("--precision", action="extend", nargs="+", default=None, choices=["fp32", "int8", "fp16"],
                   help="keep only these graphs of the artifact (default: all)")
    b.add_argument("--extras", action="append", default=None, help="bge-edge extras to include, e.g. serve")
    b.add_argument("--archive", action="store_true",
                   help="write OUT.tar.gz plus OUT.install.sh / OUT.install.ps1 that extract it safely")
    b.add_argument("--wheel", default=None, help="a prebuilt bge-edge wheel (default: build one from the source)")
    b.add_argument("--force", action="store_true", help="replace an existing bundle")
    b.set_defaults(func=_bundle)

    r = sub.add_parser("embed-corpus", help="embed a JSON lines or Parquet corpus into Parquet shards on Ray "
                                            "(needs [ray]); exactly once, a rerun resumes")
    r.add_argument("input", help="a .jsonl / .jsonl.gz file (one JSON object per line) or a .parquet file")
    r.add_argument("--artifact", required=True, help="artifact folder (the same path on every Ray node)")
    r.add_argument("--out", required=True, help="output folder: shard-NNNNN.parquet, manifest.json, errors.jsonl")
    r.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray here)")
    r.add_argument("--concurrency", type=int, default=None, help="workers (default: the cluster's CPUs // threads)")
    r.add_argument("--threads-per-worker", type=int, default=None, help="ONNX Runtime threads per worker (default 1)")
    r.add_argument("--sparse", action="store_true", help="also write lexical_weights (BGE-M3)")
    r.add_argument("--colbert", action="store_true", help="also write colbert_vecs (BGE-M3)")
    r.add_argument("--colbert-dtype", default="float32", choices=["float32", "float16"],
                   help="storage of colbert_vecs: float16 halves it (scores within ~1e-3)")
    r.add_argument("--precision", default=None, choices=["fp32", "int8", "fp16"])
    r.add_argument("--text-column", default="text")
    r.add_argument("--id-column", default=None, help="names bad rows in errors.jsonl (default: id or _id)")
    r.add_argument("--shard-rows", type=int, default=None,
                   help="rows per output shard (default 10000; 1000 with --colbert)")
    r.add_argument("--batch-size", type=int, default=None, help="rows per Ray task (default 256)")
    r.set_defaults(func=_embed_corpus)

    s = sub.add_parser("serve", help="HTTP sidecar: OpenAI-compatible embeddings, sparse, ColBERT, scoring "
                                     "(needs [serve]); every flag has a BGE_EDGE_* environment twin")
    from bge_edge.serve.config import add_serve_arguments

    add_serve_arguments(s)
    s.set_defaults(func=_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BgeEdgeError as e:
        print(f"bge-edge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bge-edge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
