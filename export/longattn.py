"""Linear-memory attention for long inputs: a flash-attention branch in front of every fused Attention.

ONNX Runtime's CPU ``Attention`` (com.microsoft) materialises batch x heads x seq x seq scores: 16 heads
at 8,192 tokens is 4 GiB per layer in fp32. Its ``MultiHeadAttention`` without a mask runs MLAS flash
attention instead (query/key blocks, memory linear in the sequence length), but it takes no padding
mask. So each fused Attention becomes

    If(min(attention_mask) == 1 and seq > 512)         # no padding anywhere in the batch, and long
      then: MatMul(x, W_qkv) -> Split -> MultiHeadAttention(q, k, v, bias)   # flash, linear memory
      else: Attention(x, W_qkv, b_qkv, mask_index)                           # the original node

with the weights shared between the branches (no copy). Both compute softmax(QK^T / sqrt(d)) V on the
same projections, so outputs agree to float rounding. The runtime sends texts over LINEAR_ATTENTION_FROM (512)
tokens alone and unpadded, which takes the first branch; every shorter input takes the second, unchanged, alone
or in a batch: an INT8 graph rounds each activation to its nearest step, and float noise between two attention
kernels (1e-7) can flip a rounding, so one text must see one kernel at every batch size.

The per-token INT8 graph (export/int8.py) projects Q/K/V itself and runs MultiHeadAttention with the padding
mask; its flash branch is the same node without the mask.
"""

from __future__ import annotations

from typing import Any

from bge_edge.runtime.batching import LINEAR_ATTENTION_FROM

__all__ = ["add_linear_attention"]

MS_DOMAIN = "com.microsoft"


def add_linear_attention(model: Any, hidden_size: int) -> int:
    """Wrap every com.microsoft Attention/QAttention node, and MultiHeadAttention with a padding mask, of ``model``
    (in place) as described above; returns how many.

    Works on a model loaded without its external data: only nodes move, initializers stay where they are.
    """
    import onnx
    from onnx import TensorProto, helper

    g = model.graph
    mask = next((i.name for i in g.input if i.name == "attention_mask"), None)
    if mask is None:
        raise ValueError("the graph has no 'attention_mask' input; cannot choose the attention branch")
    nodes = list(g.node)
    targets = [n for n in nodes if n.domain == MS_DOMAIN and (n.op_type in ("Attention", "QAttention") or (
        n.op_type == "MultiHeadAttention" and len(n.input) == 5 and all(n.input)))]
    if not targets:
        return 0
    cond, split = "longattn_unpadded", "longattn_qkv_split"
    prelude = [
        helper.make_node("ReduceMin", [mask], ["longattn_mask_min"], name="longattn_mask_min", keepdims=0),
        helper.make_node("Constant", [], ["longattn_one"], name="longattn_one",
                         value=helper.make_tensor("one", TensorProto.INT64, [], [1])),
        helper.make_node("Equal", ["longattn_mask_min", "longattn_one"], ["longattn_no_padding"],
                         name="longattn_no_padding"),
        helper.make_node("Shape", [mask], ["longattn_shape"], name="longattn_shape", start=1, end=2),
        helper.make_node("Constant", [], ["longattn_from"], name="longattn_from",
                         value=helper.make_tensor("from", TensorProto.INT64, [1], [LINEAR_ATTENTION_FROM])),
        helper.make_node("Greater", ["longattn_shape", "longattn_from"], ["longattn_long"], name="longattn_long"),
        helper.make_node("Squeeze", ["longattn_long"], ["longattn_long_scalar"], name="longattn_long_scalar"),
        helper.make_node("And", ["longattn_no_padding", "longattn_long_scalar"], [cond], name="longattn_unpadded"),
    ]
    if any(n.op_type != "MultiHeadAttention" for n in targets):
        g.initializer.append(helper.make_tensor(split, TensorProto.INT64, [3], [hidden_size] * 3))
    wrapped = {}
    for n in targets:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        ins = list(n.input)
        tag = n.name or n.output[0]
        if n.op_type == "MultiHeadAttention":  # q, k, v, bias, key_padding_mask: the same node without the mask
            unmasked = onnx.NodeProto()
            unmasked.CopyFrom(n)
            del unmasked.input[4:]
            unmasked.name, unmasked.output[0] = f"{tag}_flash", f"{tag}_flash_out"
            wrapped[id(n)] = _if_unpadded(n, cond, tag, [unmasked])
            continue
        if n.op_type == "Attention":  # input, weight, bias, mask_index
            ok = len(ins) == 4 and all(ins)
            project = [helper.make_node("MatMul", ins[:2], [f"{tag}_flash_qkv"], name=f"{tag}_flash_qkv")]
            bias = [ins[2]]
        else:  # QAttention: input, weight, bias, input_scale, weight_scale, mask_index, input_zp, weight_zp[, past]
            ok = len(ins) >= 8 and all(ins[:8]) and not any(ins[8:])
            a_b_scales_zero_points_bias = [ins[0], ins[1], ins[3], ins[4], ins[6], ins[7], ins[2]]
            project = [helper.make_node("MatMulIntegerToFloat", a_b_scales_zero_points_bias, [f"{tag}_flash_qkv"],
                                        name=f"{tag}_flash_qkv", domain=MS_DOMAIN)]
            bias = []  # already added by MatMulIntegerToFloat
        extra = set(attrs) - {"num_heads", "scale", "mask_filter_value"}
        if not ok or extra or len(n.output) != 1:
            raise ValueError(f"{n.op_type} node {n.name!r} has a form this wrap does not handle "
                             f"(inputs {ins}, attributes {sorted(attrs)})")
        mha_attrs = {"num_heads": attrs["num_heads"], **({"scale": attrs["scale"]} if "scale" in attrs else {})}
        wrapped[id(n)] = _if_unpadded(n, cond, tag, [
            *project,
            helper.make_node("Split", [f"{tag}_flash_qkv", split], [f"{tag}_flash_{c}" for c in "qkv"],
                             name=f"{tag}_flash_split", axis=2),
            helper.make_node("MultiHeadAttention", [f"{tag}_flash_q", f"{tag}_flash_k", f"{tag}_flash_v", *bias],
                             [f"{tag}_flash_out"], name=f"{tag}_flash", domain=MS_DOMAIN, **mha_attrs)])
    del g.node[:]
    g.node.extend(prelude)
    g.node.extend(wrapped.get(id(n), n) for n in nodes)
    return len(targets)


def _if_unpadded(n: Any, cond: str, tag: str, flash_nodes: list[Any]) -> Any:
    """If(cond) then ``flash_nodes`` (ending in ``{tag}_flash_out``) else the original node ``n``."""
    import onnx
    from onnx import TensorProto, helper

    flash = helper.make_graph(flash_nodes, f"{tag}_flash_branch", [],
                              [helper.make_tensor_value_info(f"{tag}_flash_out", TensorProto.FLOAT, None)])
    plain_node = onnx.NodeProto()
    plain_node.CopyFrom(n)
    plain_node.output[0] = f"{tag}_plain_out"
    plain = helper.make_graph([plain_node], f"{tag}_plain_branch", [],
                              [helper.make_tensor_value_info(f"{tag}_plain_out", TensorProto.FLOAT, None)])
    return helper.make_node("If", [cond], [n.output[0]], name=f"{tag}_if_unpadded", then_branch=flash,
                            else_branch=plain)


def remove_linear_attention(model: Any) -> int:
    """The inverse of `add_linear_attention` (in place): each If back to its plain node; returns how many.

    Gives the graph as exported before the flash branch existed, for benchmarks that compare the two.
    """
    g = model.graph
    nodes, n = [], 0
    for node in g.node:
        if node.op_type == "If" and node.name.endswith("_if_unpadded"):
            plain = next(a.g for a in node.attribute if a.name == "else_branch").node[0]
            plain.output[0] = node.output[0]
            nodes.append(plain)
            n += 1
        elif not node.name.startswith("longattn_"):
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    split = [i for i in g.initializer if i.name == "longattn_qkv_split"]
    for i in split:
        g.initializer.remove(i)
    return n
