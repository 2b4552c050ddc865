"""INT8 for ONNX Runtime on CPU: every activation quantised per token, so a text's output never depends on its batch.

ONNX Runtime's dynamic quantisation computes one activation scale over the whole batch: a text's vector then
changes with its neighbours and its padding (3e-2 on MiniLM, issue 18). This recipe gives every token row its
own scale, computed in the graph, and keeps everything else per channel and constant:

  x (a MatMul input) -> Mul(1/s)                       SmoothQuant: per-channel factors s = amax_x^a / amax_W^(1-a),
                                                       calibrated on CALIBRATION_TEXTS; W' = diag(s) W
                     -> per row: scale = max|x| / 127, uint8 = round(x / scale) + 128
                        (GELU outputs, >= -0.17: x + 0.17, scale = max / 255, uint8 from 0: twice the resolution;
                        the shift's constant product with W' goes into the next bias)
                     -> MatMulIntegerToFloat(uint8, int8 W' per column) * row scale

Rows are flattened to 2-D around the MatMul so that one QuantizeLinear (per axis 0, the row scales) does the divide,
round and clip in one pass; an attention output's 1/s is folded into the V projection instead of a Mul (softmax(QK) V
is linear in V's channels). These elementwise passes, not the GEMMs, are what per-token costs over ONNX Runtime's
dynamic recipe (bench/results/int8.md), so each one removed is measured speed.

Attention keeps fp32 softmax in MultiHeadAttention; its Q, K and V projections are three quantised MatMuls. The
word-embedding table (a plain Gather) is int8 per row. On AVX2 without VNNI, ONNX Runtime's u8 x s8 kernel adds
adjacent pairs of products in int16 (vpmaddubsw) and saturates when both are large; the weights are quantised so
that |q[2j] + q[2j+1]| <= 128 in every column, which bounds every pair sum by 255 * 128 < 2^15. That costs a
fraction of a bit in a few columns and makes one graph exact on every x86 host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ALPHA", "write_int8", "to_multihead", "value_projections", "recipe"]

MS = "com.microsoft"
ALPHA = 0.5  # SmoothQuant migration strength: measured best for MiniLM among 0.3-0.8 (bench/results/int8.md)
GELU_MIN = 0.17  # erf-GELU's minimum is -0.16997 (tanh-GELU's -0.17004 rounds inside the uint8 clip)
PAIR_LIMIT = 128  # |q0 + q1| bound for adjacent int8 weights: 255 * 128 = 32,640 < 32,767


def recipe(embeddings: str, kept_fp32: list[str], alpha: float, n_texts: int) -> dict[str, Any]:
    """The manifest's description of a graph written by `write_int8`."""
    return {"method": "bge-edge per-token int8 (MatMulIntegerToFloat)",
            "weights": f"int8 per output channel, symmetric, adjacent pairs |q0+q1| <= {PAIR_LIMIT} "
                       "(no int16 saturation on AVX2)",
            "activations": "uint8 per token row, computed at run time: symmetric with zero point 128; GELU "
                           f"outputs shifted by +{GELU_MIN} from 0",
            "smoothing": f"SmoothQuant alpha {alpha}, calibrated on {n_texts} texts",
            "attention": "MultiHeadAttention fp32 (Q/K/V projections quantised unless kept fp32)",
            "embeddings": embeddings, "kept_fp32": kept_fp32, "batch_invariant": True}


# ---------------------------------------------------------------- graph rewrites (in place, nodes and weights)

def to_multihead(model: Any) -> int:
    """Each fused ``Attention`` -> MatMuls x W_q, x W_k, x W_v + ``MultiHeadAttention`` (same weights, bias, mask).

    The projection becomes a plain MatMul that the row quantiser can take; the rest computes the same softmax.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes, n = [], 0
    for node in g.node:
        if node.op_type != "Attention" or node.domain != MS:
            nodes.append(node)
            continue
        ins = list(node.input)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len(ins) != 4 or not all(ins) or set(attrs) - {"num_heads", "scale", "mask_filter_value"}:
            raise ValueError(f"Attention node {node.name!r} has a form this rewrite does not handle "
                             f"(inputs {ins}, attributes {sorted(attrs)})")
        tag = _tag(node)
        hidden = numpy_helper.to_array(inits[ins[1]]).shape[1] // 3 if ins[1] in inits else None
        if hidden is None:
            raise ValueError(f"Attention node {node.name!r} has no constant Q/K/V weight")
        w = numpy_helper.to_array(inits[ins[1]])
        if sum(1 for nd in g.node for i in nd.input if i == ins[1]) == 1:
            g.initializer.remove(inits[ins[1]])
        mha_attrs = {k: v for k, v in attrs.items() if k in ("num_heads", "scale", "mask_filter_value")}
        for j, c in enumerate("qkv"):  # three MatMuls, not one + Split: no copy of the projections
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[:, j * hidden:(j + 1) * hidden]),
                                                         f"{tag}_w{c}"))
            nodes.append(helper.make_node("MatMul", [ins[0], f"{tag}_w{c}"], [f"{tag}_{c}"], name=f"{tag}_{c}"))
        nodes.append(helper.make_node("MultiHeadAttention", [f"{tag}_q", f"{tag}_k", f"{tag}_v", ins[2], ins[3]],
                                      list(node.output), name=f"{tag}_mha", domain=MS, **mha_attrs))
        n += 1
    del g.node[:]
    g.node.extend(nodes)
    return n


def _tag(attention: Any) -> str:
    return str(attention.name or attention.output[0])


def value_projections(model: Any) -> list[str]:
    """Names `to_multihead` gives the V projections of ``model``'s fused Attention nodes (for ``keep_fp32``).

    The V projection carries a LayerNorm output's quantisation error linearly into the residual stream; in fp32 it
    removes a third of MiniLM's INT8 cosine loss for 1/12 of the GEMM work (bench/results/int8.md, attribution).
    """
    return [f"{_tag(n)}_v" for n in model.graph.node if n.op_type == "Attention" and n.domain == MS]


def _quantizable(model: Any, keep_fp32: set[str]) -> list[Any]:
    """MatMuls with a constant 2-D float weight, not named in ``keep_fp32``."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.name not in keep_fp32
            and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
            and inits[n.input[1]].data_type == 1]


def smooth(model: Any, absmax: dict[str, np.ndarray], alpha: float, keep_fp32: set[str]) -> dict[str, np.ndarray]:
    """SmoothQuant: per input channel k, x_k / s_k and W[k, :] * s_k for every quantised MatMul reading x."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list[Any]] = {}
    for n in _quantizable(model, keep_fp32):
        readers.setdefault(n.input[0], []).append(n)
    muls, factors = {}, {}
    uses: dict[str, int] = {}
    for nd in g.node:
        for i in nd.input:
            uses[i] = uses.get(i, 0) + 1
    for x, mms in readers.items():
        ws = [numpy_helper.to_array(inits[m.input[1]]) for m in mms]
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        s = (np.maximum(absmax[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)).astype(np.float32)
        for m, w in zip(mms, ws):
            if uses.get(m.input[1]) != 1:
                raise ValueError(f"weight {m.input[1]!r} is shared; cannot smooth it for one reader")
            inits[m.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), m.input[1]))
        factors[x] = s
        if _fold_into_value(g, inits, uses, x, s):
            continue
        inv = f"{x}_smooth_inv"
        g.initializer.append(numpy_helper.from_array((1 / s).astype(np.float32), inv))
        muls[x] = helper.make_node("Mul", [x, inv], [f"{x}_smooth"], name=f"{x}_smooth")
        for m in mms:
            m.input[0] = f"{x}_smooth"
    _insert_before_first_reader(model, muls)
    return factors


def _fold_into_value(g: Any, inits: dict[str, Any], uses: dict[str, int], x: str, s: np.ndarray) -> bool:
    """x / s for an attention output x, folded into the V projection (columns and bias): softmax(QK) V is linear
    in V's channels, so no Mul node is needed. False (nothing changed) unless x comes from such a MultiHeadAttention."""
    from onnx import numpy_helper

    mha = next((nd for nd in g.node if x in nd.output and nd.op_type == "MultiHeadAttention"), None)
    if mha is None or len(mha.input) < 4 or mha.input[3] not in inits or uses.get(mha.input[3]) != 1:
        return False
    v = next((nd for nd in g.node if mha.input[2] in nd.output and nd.op_type == "MatMul"), None)
    if v is None or v.input[1] not in inits or uses.get(v.input[1]) != 1 or uses.get(v.output[0]) != 1:
        return False
    w, bias = numpy_helper.to_array(inits[v.input[1]]), numpy_helper.to_array(inits[mha.input[3]]).copy()
    h = w.shape[1]
    if bias.shape != (3 * h,) or s.shape != (h,):
        return False
    bias[2 * h:] /= s
    inits[v.input[1]].CopyFrom(numpy_helper.from_array((w / s[None, :]).astype(np.float32), v.input[1]))
    inits[mha.input[3]].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), mha.input[3]))
    return True


def _insert_before_first_reader(model: Any, new: dict[str, Any]) -> None:
    """Put each node of ``new`` (keyed by the tensor it reads) just before the first node that reads its output."""
    g = model.graph
    out: list[Any] = []
    pending = dict(new)
    for node in g.node:
        for x, nd in list(pending.items()):
            if nd.output[0] in node.input:
                out.append(nd)
                del pending[x]
        out.append(node)
    out.extend(pending.values())
    del g.node[:]
    g.node.extend(out)


def pair_safe_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output column, symmetric int8 of ``w`` [K, N] with |q[2j] + q[2j+1]| <= PAIR_LIMIT; (q, scale [N])."""
    even = w if w.shape[0] % 2 == 0 else np.vstack([w, np.zeros((1, w.shape[1]), w.dtype)])
    scale = np.maximum(np.abs(w).max(axis=0) / 127, np.abs(even[0::2] + even[1::2]).max(axis=0) / PAIR_LIMIT)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.round(even / scale), -127, 127).astype(np.int32)
    for _ in range(4):  # rounding can push a pair one past the bound: step the larger magnitude back
        over = np.abs(q[0::2] + q[1::2]) > PAIR_LIMIT
        if not over.any():
            break
        first = np.abs(q[0::2]) >= np.abs(q[1::2])
        q[0::2] -= (over & first) * np.sign(q[0::2])
        q[1::2] -= (over & ~first) * np.sign(q[1::2])
    if (np.abs(q[0::2] + q[1::2]) > PAIR_LIMIT).any():
        raise AssertionError("pair bound not met after rounding")  # cannot happen: each step lowers |q0+q1| by 1
    return q[: w.shape[0]].astype(np.int8), scale


def quantize_rows(model: Any, keep_fp32: set[str], opset: int, static: dict[str, float] | None = None) -> int:
    """Every quantisable MatMul -> per-row activation quantisation + MatMulIntegerToFloat; returns how many.

    ``static``: inputs quantised with one constant scale instead (uint8 around 128): no row scale, no rescale.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    producer = {o: n for n in g.node for o in n.output}

    def const(arr: np.ndarray, name: str) -> str:
        t = numpy_helper.from_array(arr, name)
        g.initializer.append(t)
        inits[name] = t
        return name

    one = const(np.array(1.0, np.float32), "rowq_one")
    eps = const(np.array(1e-30, np.float32), "rowq_eps")
    zp128, zp0 = const(np.array(128, np.uint8), "rowq_zp128"), const(np.array(0, np.uint8), "rowq_zp0")
    inv127, inv255 = const(np.array(1 / 127, np.float32), "rowq_inv127"), const(np.array(1 / 255, np.float32),
                                                                                 "rowq_inv255")
    axes = const(np.array([-1], np.int64), "rowq_axes") if opset >= 18 else None
    flat, column = const(np.array([-1], np.int64), "rowq_flat"), const(np.array([-1, 1], np.int64), "rowq_column")

    def per_row(op: str, x: str, y: str) -> Any:
        """``op`` (ReduceMax / ReduceMin) over the last axis, kept: one value per token row."""
        if axes is None:
            return helper.make_node(op, [x], [y], name=y, keepdims=1, axes=[-1])
        return helper.make_node(op, [x, axes], [y], name=y, keepdims=1)

    def gelu_shift(x: str) -> np.ndarray | None:
        """The shift that makes ``x`` non-negative, if x is a GELU output (or one times positive constants)."""
        p = producer.get(x)
        if p is not None and "Gelu" in p.op_type:
            return np.array(GELU_MIN, np.float32)
        if (p is not None and p.op_type == "Mul" and p.input[0] in producer and "Gelu" in producer[p.input[0]].op_type
                and p.input[1] in inits):
            k = numpy_helper.to_array(inits[p.input[1]])
            if (k > 0).all():
                return (GELU_MIN * k).astype(np.float32)
        return None

    # x -> (uint8, row scale, zero point, shift, leading dims of x)
    quantized: dict[str, tuple[str, str, str, np.ndarray | None, str]] = {}
    before: dict[int, list[Any]] = {}
    replace: dict[int, list[Any]] = {}
    todo = _quantizable(model, keep_fp32)
    for k, n in enumerate(todo):
        x, p = n.input[0], f"rowq{k}"
        if x not in quantized and static and x in static:
            t = const(np.array(static[x], np.float32), f"{p}_static_scale")
            before[id(n)] = [helper.make_node("QuantizeLinear", [x, t, zp128], [f"{p}_u8"], name=f"{p}_u8")]
            quantized[x] = (f"{p}_u8", t, zp128, None, "")
        elif x not in quantized:
            c = gelu_shift(x)
            if c is None:  # max |x| = max(max x, -min x): two read-only reductions, no |x| tensor written
                nodes = [per_row("ReduceMax", x, f"{p}_hi"), per_row("ReduceMin", x, f"{p}_lo"),
                         helper.make_node("Neg", [f"{p}_lo"], [f"{p}_nlo"], name=f"{p}_nlo"),
                         helper.make_node("Max", [f"{p}_hi", f"{p}_nlo"], [f"{p}_max"], name=f"{p}_max"),
                         helper.make_node("Mul", [f"{p}_max", inv127], [f"{p}_s0"], name=f"{p}_s0")]
                shifted, zp = x, zp128
            else:
                shift = const(c, f"{p}_shift")
                nodes = [helper.make_node("Add", [x, shift], [f"{p}_shifted"], name=f"{p}_shifted"),
                         per_row("ReduceMax", f"{p}_shifted", f"{p}_max"),
                         helper.make_node("Mul", [f"{p}_max", inv255], [f"{p}_s0"], name=f"{p}_s0")]
                shifted, zp = f"{p}_shifted", zp0
            # rows flattened to 2-D so QuantizeLinear divides by each row's scale itself (per axis 0): no Div pass
            rows = const(np.array([-1, numpy_helper.to_array(inits[n.input[1]]).shape[0]], np.int64), f"{p}_rows")
            nodes += [helper.make_node("Max", [f"{p}_s0", eps], [f"{p}_scale"], name=f"{p}_scale"),
                      helper.make_node("Reshape", [f"{p}_scale", flat], [f"{p}_sflat"], name=f"{p}_sflat"),
                      helper.make_node("Shape", [f"{p}_sflat"], [f"{p}_n"], name=f"{p}_n"),
                      helper.make_node("Expand", [zp, f"{p}_n"], [f"{p}_zp"], name=f"{p}_zp"),
                      helper.make_node("Reshape", [shifted, rows], [f"{p}_x2"], name=f"{p}_x2"),
                      helper.make_node("QuantizeLinear", [f"{p}_x2", f"{p}_sflat", f"{p}_zp"], [f"{p}_u8"],
                                       name=f"{p}_u8", axis=0),
                      helper.make_node("Reshape", [f"{p}_scale", column], [f"{p}_s2"], name=f"{p}_s2"),
                      helper.make_node("Shape", [x], [f"{p}_lead"], name=f"{p}_lead", end=-1)]
            before[id(n)] = nodes
            quantized[x] = (f"{p}_u8", f"{p}_s2", zp, c, f"{p}_lead")
        xq, scale, zp, c, lead = quantized[x]
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        q, ws = pair_safe_int8(w)
        wq, wsn = const(q, f"{p}_weight_int8"), const(ws, f"{p}_weight_scale")
        y = n.output[0]
        if static and x in static:
            replace[id(n)] = [helper.make_node("MatMulIntegerToFloat", [xq, wq, scale, wsn, zp], [n.output[0]],
                                               name=f"{p}_int", domain=MS)]
            continue
        n_out = const(np.array([w.shape[1]], np.int64), f"{p}_cols")
        nodes = [helper.make_node("MatMulIntegerToFloat", [xq, wq, one, wsn, zp], [f"{p}_int"], name=f"{p}_int",
                                  domain=MS),
                 helper.make_node("Concat", [lead, n_out], [f"{p}_shape"], name=f"{p}_shape", axis=0)]
        y2 = f"{p}_y2"
        if c is None:
            nodes.append(helper.make_node("Mul", [f"{p}_int", scale], [y2], name=f"{p}_rescale"))
        else:  # (x + c) W = x W + c W: subtract c W' (with the quantised W', as the kernel uses) from the bias
            correction = -(np.broadcast_to(c, (w.shape[0],)).astype(np.float64) @ (q.astype(np.float64) * ws))
            users = readers.get(y, [])
            bias = users[0].input[4] if (len(users) == 1 and users[0].op_type == "SkipLayerNormalization"
                                         and len(users[0].input) > 4 and users[0].input[4] in inits) else None
            if bias is not None:  # into the SkipLayerNormalization's bias: no Add; a shared bias (e.g. several
                b = numpy_helper.to_array(inits[bias]).astype(np.float64)  # all-zero ones) gets its own copy
                users[0].input[4] = const((b + correction).astype(np.float32), f"{p}_bias")
                nodes.append(helper.make_node("Mul", [f"{p}_int", scale], [y2], name=f"{p}_rescale"))
            else:
                corr = const(correction.astype(np.float32), f"{p}_shift_correction")
                nodes += [helper.make_node("Mul", [f"{p}_int", scale], [f"{p}_rescaled"], name=f"{p}_rescale"),
                          helper.make_node("Add", [f"{p}_rescaled", corr], [y2], name=f"{p}_unshift")]
        nodes.append(helper.make_node("Reshape", [y2, f"{p}_shape"], [y], name=f"{p}_unflat", allowzero=1))
        replace[id(n)] = nodes
    out = []
    for n in g.node:
        out += before.get(id(n), [])
        out += replace.get(id(n), [n])
    del g.node[:]
    g.node.extend(out)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    return len(todo)


def quantize_embedding_rows(model: Any) -> list[str]:
    """A plain Gather from a float table [V, H] -> int8 rows with one scale per row; returns the tables done."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    done, out = [], []
    for n in g.node:
        t = inits.get(n.input[0]) if n.op_type == "Gather" else None
        if t is None or len(t.dims) != 2 or t.data_type != 1 or t.dims[0] < 1000:
            out.append(n)
            continue
        w = numpy_helper.to_array(t).astype(np.float32)
        scale = np.abs(w).max(axis=1) / 127
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        p = n.name or n.output[0]
        g.initializer.extend([numpy_helper.from_array(np.round(w / scale[:, None]).astype(np.int8), f"{p}_int8"),
                              numpy_helper.from_array(scale, f"{p}_row_scale")])
        out += [helper.make_node("Gather", [f"{p}_int8", n.input[1]], [f"{p}_q"], name=f"{p}_q", axis=0),
                helper.make_node("Gather", [f"{p}_row_scale", n.input[1]], [f"{p}_s"], name=f"{p}_s", axis=0),
                helper.make_node("Cast", [f"{p}_q"], [f"{p}_f"], name=f"{p}_f", to=1),
                helper.make_node("Unsqueeze", [f"{p}_s", f"{p}_axis"], [f"{p}_s1"], name=f"{p}_s1"),
                helper.make_node("Mul", [f"{p}_f", f"{p}_s1"], list(n.output), name=f"{p}_dequant")]
        g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{p}_axis"))
        done.append(t.name)
    del g.node[:]
    g.node.extend(out)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    return done


# ---------------------------------------------------------------- calibration and the whole recipe

def calibrate(fp32: Path, names: list[str], ids: list[list[int]]) -> dict[str, np.ndarray]:
    """Per channel, the max |value| of each tensor in ``names`` over the texts ``ids`` (one text per run, unpadded)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(fp32), load_external_data=False)  # nodes; big weights stay in the .data file
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
                              if n not in have)
    tmp = fp32.with_name(fp32.stem + ".calibration.onnx")  # beside the fp32 file: external data resolves
    try:
        onnx.save_model(model, str(tmp))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    finally:
        tmp.unlink(missing_ok=True)
    del model
    amax: dict[str, np.ndarray] = {}
    for x in ids:
        a = np.array([x], np.int64)
        for name, v in zip(names, sess.run(names, {"input_ids": a, "attention_mask": np.ones_like(a)})):
            m = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0)
            amax[name] = np.maximum(amax[name], m) if name in amax else m
    return amax


def write_int8(fp32: Path, out: Path, ids: list[list[int]], keep_fp32: list[str],
               alpha: float = ALPHA, static_norm: float | None = None) -> tuple[list[str], dict[str, Any]]:
    """The int8 graph of the fused fp32 graph ``fp32``, written to ``out``; returns (extra files, manifest recipe).

    ``ids``: calibration texts (token ids) for the smoothing factors; ``keep_fp32``: MatMul names left in float.
    """
    import onnx

    from .graph import save

    model = onnx.load(str(fp32), load_external_data=True)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    to_multihead(model)
    keep = set(keep_fp32)
    names = sorted({n.input[0] for n in _quantizable(model, keep)})
    absmax = calibrate(fp32, names, ids)
    factors = smooth(model, absmax, alpha, keep)
    static = None
    if static_norm is not None:  # LayerNorm outputs: one calibrated scale (x static_norm) per tensor
        producer = {o: n.op_type for n in model.graph.node for o in n.output}
        static = {f"{x}_smooth": float((absmax[x] / s).max() / 127 * static_norm) for x, s in factors.items()
                  if "LayerNormalization" in producer.get(x, "")}
    quantize_rows(model, keep, opset, static)
    tables = quantize_embedding_rows(model)
    fused = any(n.op_type == "EmbedLayerNormalization" for n in model.graph.node)
    embeddings = ("int8 per row (Gather)" if tables else
                  "fp32 (inside the fused EmbedLayerNormalization)" if fused else "fp32")
    extra = save(model, out)
    return extra, recipe(embeddings, list(keep_fp32), alpha, len(ids))
