"""One benchmark worker: load ONE system in this fresh process, measure it, print one JSON line.

    python -m bench.systems SPEC.json

The spec names the system (``kind`` + ``params``) and the task:
  speed    import + load + first embedding, corpus throughput, idle CPU, batch-1 query latency, peak RSS
  scifact  encode the whole SciFact corpus and its queries (MTEB protocol, max length 256) into an .npz
  longdoc  one document of exactly ``length`` tokens (every system truncates the same long text there):
           the time of that one encode call and the process's peak RSS (model included)

Only the standard library is imported before the start-up clock starts: the clock covers importing the
system's library (numpy included), loading the model and embedding one text. Kinds:
  edge       bge_edge.runtime.Embedder (ONNX Runtime or OpenVINO), sort_by_length on or off; ``heads: all``
             also computes the sparse and ColBERT outputs (BGE-M3), as a hybrid-retrieval user does
  flag       FlagEmbedding's BGEM3FlagModel (the reference implementation, PyTorch FP32 on the CPU)
  naive      plain onnxruntime on bge-edge's graph: default session, input order, fixed batches padded to the
             batch's longest text (what one writes without bge-edge)
  st         sentence-transformers, backend torch / onnx / openvino, with a model file chosen by ``file_name``
  fastembed  fastembed's TextEmbedding on a local folder (no download)
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any, Callable  # noqa: E402

Encode = Callable[[list], Any]


def cpu_seconds() -> float:
    """utime + stime of this process, all threads (from /proc/self/stat, no psutil)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(key + ":")).split()[1]) / 1024


def peak_rss_mb() -> float:
    """This worker's own peak RSS (VmHWM); ru_maxrss would start at the parent's RSS, inherited at fork."""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    """This process's RSS now (VmRSS)."""
    return _status_mb("VmRSS")


# ---- loaders: each returns (encode(list of texts) -> (n, H) float32 L2-normalised, info) ---------------------


def load_edge(p: dict[str, Any]) -> tuple[Encode, dict[str, Any]]:
    from bge_edge.runtime import Embedder

    m = Embedder(p["artifact"], precision=p["precision"], threads=p.get("threads"),
                 backend=p.get("backend", "onnxruntime"), streams=int(p.get("streams", 1)),
                 shapes=p.get("shapes", "dynamic"))
    sort, max_length = bool(p.get("sort", True)), int(p["max_length"])
    kw: dict[str, Any] = {"max_length": max_length, "sort_by_length": sort}
    if p.get("batch_size"):
        kw["batch_size"] = int(p["batch_size"])

    if p.get("heads") == "all":
        kw.update(return_sparse=True, return_colbert_vecs=True)

    def encode(texts: list) -> Any:
        return m.encode(texts, **kw)["dense_vecs"]

    if m.backend == "openvino":
        threads: Any = m.providers[0]
    else:
        threads = m._session.get_session_options().intra_op_num_threads  # noqa: SLF001  (what the runtime chose)
    return encode, {"threads": threads, "providers": m.providers,
                    "batching": "sorted by length, token budget, buckets" if sort else "input order, token budget"}


def load_naive(p: dict[str, Any]) -> tuple[Encode, dict[str, Any]]:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    sess = ort.InferenceSession(p["graph"], providers=["CPUExecutionProvider"])  # library defaults
    tok = Tokenizer.from_file(p["tokenizer"])
    tok.enable_truncation(int(p["max_length"]))
    tok.enable_padding(pad_id=int(p.get("pad_id", 0)))  # pad to the longest text of each batch
    bs = int(p.get("batch_size", 32))

    def encode(texts: list) -> Any:
        out = []
        for i in range(0, len(texts), bs):
            encs = tok.encode_batch(texts[i:i + bs])
            ids = np.array([e.ids for e in encs], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
            out.append(sess.run(["dense"], {"input_ids": ids, "attention_mask": mask})[0])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    threads = sess.get_session_options().intra_op_num_threads
    return encode, {"threads": threads or "ORT default (cores)", "batching": f"input order, fixed batch {bs}"}


def load_st(p: dict[str, Any]) -> tuple[Encode, dict[str, Any]]:
    backend = p.get("backend", "torch")
    threads = p.get("threads")
    if backend == "torch" and threads:
        import torch

        torch.set_num_threads(int(threads))
    from sentence_transformers import SentenceTransformer

    kwargs: dict[str, Any] = dict(p.get("model_kwargs") or {})
    m = SentenceTransformer(p["model"], device="cpu", backend=backend, model_kwargs=kwargs or None,
                            local_files_only=True)
    m.max_seq_length = int(p["max_length"])
    bs = int(p.get("batch_size", 32))

    def encode(texts: list) -> Any:
        return m.encode(texts, batch_size=bs, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False)

    info: dict[str, Any] = {"batching": f"sorted by characters, batch {bs}"}
    if backend == "torch":
        import torch

        info["threads"] = torch.get_num_threads()
    elif backend == "openvino":
        try:  # what OpenVINO compiled: threads and execution precision (bf16 by default on AVX512-BF16/AMX CPUs)
            compiled = m[0].auto_model.request
            compiled = compiled if hasattr(compiled, "get_property") else compiled.get_compiled_model()
            prec = str(compiled.get_property("INFERENCE_PRECISION_HINT")).split("'")[1::2] or ["?"]
            info["threads"] = f"{compiled.get_property('INFERENCE_NUM_THREADS')} ({prec[0]} execution)"
        except Exception as e:  # noqa: BLE001 - informational only
            info["threads"] = f"? ({type(e).__name__})"
    else:
        info["threads"] = "ORT default (cores)"
    return encode, info


def load_fastembed(p: dict[str, Any]) -> tuple[Encode, dict[str, Any]]:
    import numpy as np
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    name = p["model_name"]
    if not any(d.get("model") == name for d in TextEmbedding.list_supported_models()):
        TextEmbedding.add_custom_model(model=name, pooling=PoolingType.MEAN, normalization=True,
                                       sources=ModelSource(hf=name), dim=int(p["dim"]), model_file=p["model_file"])
    m = TextEmbedding(model_name=name, specific_model_path=p["folder"], threads=p.get("threads"),
                      cache_dir=p.get("cache_dir"))
    bs = int(p.get("batch_size", 256))

    def encode(texts: list) -> Any:
        return np.stack(list(m.embed(texts, batch_size=bs))).astype(np.float32)

    return encode, {"threads": p.get("threads") or "ORT default (cores)", "batching": f"input order, batch {bs}"}


def load_flag(p: dict[str, Any]) -> tuple[Encode, dict[str, Any]]:
    from FlagEmbedding import BGEM3FlagModel

    m = BGEM3FlagModel(p["model"], use_fp16=False, devices="cpu", normalize_embeddings=True)
    heads = p.get("heads") == "all"
    kw: dict[str, Any] = {"max_length": int(p["max_length"]), "return_dense": True, "return_sparse": heads,
                          "return_colbert_vecs": heads}

    def encode(texts: list) -> Any:  # its own default batch size (256), sorted by length inside
        return m.encode(texts, **kw)["dense_vecs"]

    import torch

    return encode, {"threads": torch.get_num_threads(), "batching": "sorted by length, batch 256 (its defaults)"}


LOADERS = {"edge": load_edge, "naive": load_naive, "st": load_st, "fastembed": load_fastembed, "flag": load_flag}


# ---- tasks -----------------------------------------------------------------------------------------------------


def task_speed(spec: dict[str, Any], t_import: float) -> dict[str, Any]:
    corpus_texts: list[str] = json.loads(open(spec["corpus"], encoding="utf-8").read())
    queries: list[str] = json.loads(open(spec["queries"], encoding="utf-8").read())
    if spec.get("limit"):  # a group on a slower model runs on a prefix (the corpus mixes lengths evenly)
        corpus_texts, queries = corpus_texts[: spec["limit"][0]], queries[: spec["limit"][1]]
    first_text = queries[0] if queries else "hello"
    t = time.perf_counter()
    encode, info = LOADERS[spec["kind"]](spec["params"])
    t_load = time.perf_counter()
    first = encode([first_text])
    t_first = time.perf_counter()
    wall_first = time.time()
    rec: dict[str, Any] = {"import_s": t - t_import, "load_s": t_load - t, "first_s": t_first - t_load,
                           "startup_s": t_first - T0, "info": info, "dim": int(first.shape[1])}
    if spec.get("t_spawn"):
        rec["process_start_s"] = wall_first - float(spec["t_spawn"])
    import numpy as np

    encode(corpus_texts[: min(32, len(corpus_texts))])  # warm-up: one batch, same for every system
    if spec["params"].get("warm_corpus"):  # a long-running process's view: one untimed pass first
        t = time.perf_counter()
        encode(corpus_texts)
        rec["warm_corpus_s"] = time.perf_counter() - t
    t = time.perf_counter()
    emb = np.asarray(encode(corpus_texts), dtype=np.float32)
    rec["corpus_s"] = time.perf_counter() - t
    rec["rss_after_corpus_mb"] = peak_rss_mb()
    # Idle CPU of the loaded model, right after work (when thread pools that spin would show it).
    c0, w0 = cpu_seconds(), time.perf_counter()
    time.sleep(float(spec.get("idle_s", 3.0)))
    rec["idle_cpu_pct"] = 100.0 * (cpu_seconds() - c0) / (time.perf_counter() - w0)
    for q in queries[:5]:
        encode([q])
    lat = []
    for q in queries:
        t = time.perf_counter()
        encode([q])
        lat.append(time.perf_counter() - t)
    rec["latency_ms"] = [x * 1000 for x in lat]
    rec["peak_rss_mb"] = peak_rss_mb()
    if spec.get("save_embeddings"):
        np.save(spec["save_embeddings"], emb)
    return rec


def task_scifact(spec: dict[str, Any], t_import: float) -> dict[str, Any]:
    import numpy as np

    from bench.retrieval import load_task

    task = load_task(spec["scifact"])
    encode, info = LOADERS[spec["kind"]](spec["params"])
    t = time.perf_counter()
    docs = np.asarray(encode(task.docs), dtype=np.float32)
    queries = np.asarray(encode(task.queries), dtype=np.float32)
    dt = time.perf_counter() - t
    np.savez(spec["out"], docs=docs, queries=queries)
    return {"encode_s": dt, "info": info, "peak_rss_mb": peak_rss_mb()}


def task_longdoc(spec: dict[str, Any], t_import: float) -> dict[str, Any]:
    text = open(spec["doc"], encoding="utf-8").read()
    encode, info = LOADERS[spec["kind"]](dict(spec["params"], max_length=int(spec["length"])))
    encode(["a short warm-up text"])
    rss_before = rss_mb()
    t = time.perf_counter()
    encode([text])
    return {"length": int(spec["length"]), "seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": rss_before, "info": info}


def main() -> int:
    spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    tasks = {"speed": task_speed, "scifact": task_scifact, "longdoc": task_longdoc}
    rec = tasks[spec["task"]](spec, T0)
    rec["loadavg_end"] = os.getloadavg()
    print("BENCH-RESULT " + json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
