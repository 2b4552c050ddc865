"""Linear-memory attention for long inputs: a flash-attention branch in front of every fused Attention.

ONNX Runtime's CPU ``Attention`` (com.microsoft) materialises batch x heads x seq x seq scores: 16 heads
at 8,192 tokens is 4 GiB per layer in fp32. Its ``MultiHeadAttention`` without a mask runs MLAS flash
attention instead (query/key blocks, memory linear in the sequence length), but it takes no padding
mask. So each fused Attention becomes

    If(min(attention_mask) == 1)                       # no padding anywhere in the batch
      then: MatMul(x, W_qkv) -> Split -> MultiHeadAttention(q, k, v, bias)   # flash, linear memory
      else: Attention(x, W_qkv, b_qkv, mask_index)                           # the original node

(INT8 graphs: QAttention, whose branch projects with MatMulIntegerToFloat on the same int8 weights.)

with the weights shared between the branches (no copy). Both compute softmax(QK^T / sqrt(d)) V on the
same projections, so outputs agree to float rounding. The runtime sends long texts alone and
unpadded, which takes the first branch; padded batches of short texts take the second, unchanged.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_linear_attention"]

MS_DOMAIN = "com.microsoft"


def add_linear_attention(model: Any, hidden_size: int) -> int:
    """Wrap every com.microsoft Attention/QAttention node of ``model`` (in place) as described above; returns how many.

    Works on a model loaded without its external data: only nodes move, initializers stay where they are.
    """
    import onnx
    from onnx import TensorProto, helper

    g = model.graph
    mask = next((i.name for i in g.input if i.name == "attention_mask"), None)
    if mask is None:
        raise ValueError("the graph has no 'attention_mask' input; cannot choose the attention branch")
    nodes = list(g.node)
    targets = [n for n in nodes if n.op_type in ("Attention", "QAttention") and n.domain == MS_DOMAIN]
    if not targets:
        return 0
    cond, split = "longattn_unpadded", "longattn_qkv_split"
    prelude = [
        helper.make_node("ReduceMin", [mask], ["longattn_mask_min"], name="longattn_mask_min", keepdims=0),
        helper.make_node("Constant", [], ["longattn_one"], name="longattn_one",
                         value=helper.make_tensor("one", TensorProto.INT64, [], [1])),
        helper.make_node("Equal", ["longattn_mask_min", "longattn_one"], [cond], name="longattn_unpadded"),
    ]
    g.initializer.append(helper.make_tensor(split, TensorProto.INT64, [3], [hidden_size] * 3))
    wrapped = {}
    for n in targets:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        ins = list(n.input)
        if n.op_type == "Attention":  # input, weight, bias, mask_index
            ok = len(ins) == 4 and all(ins)
            tag = n.name or n.output[0]
            project = [helper.make_node("MatMul", ins[:2], [f"{tag}_flash_qkv"], name=f"{tag}_flash_qkv")]
            bias = [ins[2]]
        else:  # QAttention: input, weight, bias, input_scale, weight_scale, mask_index, input_zp, weight_zp[, past]
            ok = len(ins) >= 8 and all(ins[:8]) and not any(ins[8:])
            tag = n.name or n.output[0]
            a_b_scales_zero_points_bias = [ins[0], ins[1], ins[3], ins[4], ins[6], ins[7], ins[2]]
            project = [helper.make_node("MatMulIntegerToFloat", a_b_scales_zero_points_bias, [f"{tag}_flash_qkv"],
                                        name=f"{tag}_flash_qkv", domain=MS_DOMAIN)]
            bias = []  # already added by MatMulIntegerToFloat
        extra = set(attrs) - {"num_heads", "scale", "mask_filter_value"}
        if not ok or extra or len(n.output) != 1:
            raise ValueError(f"{n.op_type} node {n.name!r} has a form this wrap does not handle "
                             f"(inputs {ins}, attributes {sorted(attrs)})")
        mha_attrs = {"num_heads": attrs["num_heads"], **({"scale": attrs["scale"]} if "scale" in attrs else {})}
        flash = helper.make_graph(
            [*project,
             helper.make_node("Split", [f"{tag}_flash_qkv", split], [f"{tag}_flash_{c}" for c in "qkv"],
                              name=f"{tag}_flash_split", axis=2),
             helper.make_node("MultiHeadAttention", [f"{tag}_flash_q", f"{tag}_flash_k", f"{tag}_flash_v", *bias],
                              [f"{tag}_flash_out"], name=f"{tag}_flash", domain=MS_DOMAIN, **mha_attrs)],
            f"{tag}_flash_branch", [], [helper.make_tensor_value_info(f"{tag}_flash_out", TensorProto.FLOAT, None)])
        plain_node = onnx.NodeProto()
        plain_node.CopyFrom(n)
        plain_node.output[0] = f"{tag}_plain_out"
        plain = helper.make_graph([plain_node], f"{tag}_plain_branch", [],
                                  [helper.make_tensor_value_info(f"{tag}_plain_out", TensorProto.FLOAT, None)])
        wrapped[id(n)] = helper.make_node("If", [cond], [n.output[0]], name=f"{tag}_if_unpadded",
                                          then_branch=flash, else_branch=plain)
    del g.node[:]
    g.node.extend(prelude)
    g.node.extend(wrapped.get(id(n), n) for n in nodes)
    return len(targets)


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
